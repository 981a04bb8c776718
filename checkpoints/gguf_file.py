"""GGUF files for llama.cpp (architecture "llama", float32), read and written with the gguf
package, following llama.cpp's convert_hf_to_gguf.py conventions. The q/k rows stay in Meta's
layout, as llama.cpp keeps them (ggml's normal RoPE rotates adjacent pairs)."""
import json
import struct

import numpy as np
import torch

from checkpoints.common import Checkpoint, CheckpointError
from data_paths import vocab_source
from model import ModelArgs
from prompts import PROMPT_FORMAT_KEY, chat_template


GGUF_LAYER_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
                    "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
                    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                    "feed_forward.w3": "ffn_up"}
# the prompt format, as a JSON string under this project's own key (GGUF readers skip unknown keys)
GGUF_PROMPT_FORMAT_KEY = "tinystories.prompt_format"


def gguf_key_map(n_layers):
    """Our state-dict key -> llama.cpp tensor name, in llama.cpp's order."""
    names = {"tok_embeddings.weight": "token_embd.weight"}
    for i in range(n_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    names["norm.weight"] = "output_norm.weight"
    return names


def read_gguf(path) -> Checkpoint:
    """A llama GGUF file with float32 or float16 tensors (what export.py writes). Its q/k rows are
    in Meta's layout already, as llama.cpp keeps them; the tokenizer is looked for as for a .bin."""
    try:
        from gguf import GGUFReader
        reader = GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF needs the gguf package (pip install gguf)") from None
    except (ValueError, OSError, KeyError, IndexError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from None
    if meta.get("general.architecture") != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {meta.get('general.architecture')!r}; only llama is read")
    if "output.weight" in tensors:
        raise CheckpointError(f"{path}: has an untied output.weight; this project's model ties it")
    try:
        args = ModelArgs(dim=int(meta["llama.embedding_length"]), n_layers=int(meta["llama.block_count"]),
                         n_heads=int(meta["llama.attention.head_count"]),
                         n_kv_heads=int(meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])),
                         vocab_size=int(meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
                         hidden_dim=int(meta["llama.feed_forward_length"]),
                         norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                         max_seq_len=int(meta["llama.context_length"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: GGUF metadata lacks or mangles {exc}") from None
    state = {}
    for ours, theirs in gguf_key_map(args.n_layers).items():
        tensor = tensors.get(theirs)
        if tensor is None:
            raise CheckpointError(f"{path}: GGUF file has no tensor {theirs}")
        if tensor.data.dtype not in (np.float32, np.float16):
            raise CheckpointError(f"{path}: tensor {theirs} is {tensor.tensor_type.name}; float32 and float16 are read")
        state[ours] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    state["output.weight"] = state["tok_embeddings.weight"]
    config = {"vocab_source": vocab_source(args.vocab_size), "vocab_size": args.vocab_size}
    if GGUF_PROMPT_FORMAT_KEY in meta:
        try:
            config[PROMPT_FORMAT_KEY] = json.loads(meta[GGUF_PROMPT_FORMAT_KEY])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: {GGUF_PROMPT_FORMAT_KEY} is not JSON ({exc})") from None
    return Checkpoint(path, "gguf", args, state, config, {})


def gguf_token_type(sp, i) -> int:
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_unused(i):
        return 5
    if sp.is_byte(i):
        return 6
    return 1


def write_gguf(path, args, state, tokenizer, name, prompt_format):
    import gguf

    sp = tokenizer.sp
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(0)  # all float32
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(args.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types([gguf_token_type(sp, i) for i in range(sp.get_piece_size())])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(sp.unk_id())
    # an instruct model reads its prompt with no BOS in front (prompts.prompt_ids): llama.cpp
    # must not add one, neither to a raw prompt nor to what the chat template renders
    writer.add_add_bos_token(not prompt_format["is_instruct"])
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_string(GGUF_PROMPT_FORMAT_KEY, json.dumps(prompt_format))
    if chat_template(prompt_format):
        writer.add_chat_template(chat_template(prompt_format))
    for ours, theirs in gguf_key_map(args.n_layers).items():
        writer.add_tensor(theirs, state[ours].detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
