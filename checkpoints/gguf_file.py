"""GGUF files for llama.cpp (architecture "llama", float32), read and written with the gguf
package, following llama.cpp's convert_hf_to_gguf.py conventions. The q/k rows stay in Meta's
layout, as llama.cpp keeps them (ggml's normal RoPE rotates adjacent pairs)."""
import json
import os
import struct

import numpy as np
import torch

from checkpoints.common import Checkpoint, CheckpointError
from checkpoints.huggingface import sentencepiece_collapses_spaces
from data_paths import tokenizer_file_name, vocab_source
from model import ModelArgs
from prompts import PROMPT_FORMAT_KEY, chat_template
from tokenizer import Tokenizer


GGUF_LAYER_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
                    "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
                    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                    "feed_forward.w3": "ffn_up"}
# the prompt format, as a JSON string under this project's own key (GGUF readers skip unknown keys)
GGUF_PROMPT_FORMAT_KEY = "tinystories.prompt_format"
# whether the sentencepiece model squeezes runs of spaces, which GGUF has no field for
GGUF_SQUEEZE_SPACES_KEY = "tinystories.remove_extra_whitespaces"


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
    in Meta's layout already, as llama.cpp keeps them; its vocabulary goes into extra (GGUFTokenizer)."""
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
    return Checkpoint(path, "gguf", args, state, config, {"gguf_vocabulary": _vocabulary(meta)})


def _vocabulary(meta):
    """The sentencepiece vocabulary a llama GGUF carries, or None when it has none."""
    if meta.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.tokens" not in meta:
        return None
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    well_formed = (isinstance(tokens, list) and isinstance(scores, list) and isinstance(types, list)
                   and len(tokens) == len(scores) == len(types) and all(isinstance(t, str) for t in tokens)
                   and all(isinstance(x, (int, float)) for x in scores) and all(isinstance(k, int) for k in types)
                   and all(isinstance(i, int) or i is None for i in (bos, eos)))
    if not well_formed:
        return None  # the tokenizer is then looked for as for a .bin
    return {"tokens": tokens, "scores": scores, "types": types, "bos_id": bos, "eos_id": eos,
            "add_space_prefix": bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            "squeeze_spaces": bool(meta.get(GGUF_SQUEEZE_SPACES_KEY, False))}


def _varint(value):
    out = bytearray()
    value &= (1 << 64) - 1  # protobuf writes a negative int32 as its 64-bit two's complement
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number, wire_type, payload):
    if wire_type == 2:  # length-delimited: strings and nested messages
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def sentencepiece_model_proto(vocabulary) -> bytes:
    """A sentencepiece ModelProto (BPE, byte fallback, no normalization rule) holding a GGUF's
    vocabulary, written field by field (sentencepiece_model.proto's numbers) so that reading it
    needs no protobuf package. GGUF token types are sentencepiece's piece types."""
    tokens, types = vocabulary["tokens"], vocabulary["types"]
    pieces = b"".join(_field(1, 2, _field(1, 2, token.encode("utf-8")) + _field(2, 5, struct.pack("<f", score))
                                 + _field(3, 0, _varint(kind)))
                      for token, score, kind in zip(tokens, vocabulary["scores"], types))
    trainer = _field(3, 0, _varint(2)) + _field(4, 0, _varint(len(tokens))) + _field(35, 0, _varint(1))
    if 2 in types:  # the unknown piece
        trainer += _field(40, 0, _varint(types.index(2))) + _field(45, 2, tokens[types.index(2)].encode("utf-8"))
    for id_field, piece_field, key in ((41, 46, "bos_id"), (42, 47, "eos_id")):  # found by name
        if vocabulary[key] is not None and 0 <= vocabulary[key] < len(tokens):
            trainer += _field(id_field, 0, _varint(vocabulary[key])) + \
                _field(piece_field, 2, tokens[vocabulary[key]].encode("utf-8"))
    normalizer = _field(1, 2, b"identity") + _field(3, 0, _varint(vocabulary["add_space_prefix"])) + \
        _field(4, 0, _varint(vocabulary["squeeze_spaces"])) + _field(5, 0, _varint(1))
    return pieces + _field(2, 2, trainer) + _field(3, 2, normalizer)


class GGUFTokenizer(Tokenizer):
    """The Tokenizer of a GGUF file's own vocabulary. model_path is the name its .model would
    have beside the file (exports name the tokenizer after it); model_proto is that file's
    content, which need not exist on disk."""

    def __init__(self, ckpt: Checkpoint):
        from sentencepiece import SentencePieceProcessor

        self.model_proto = sentencepiece_model_proto(ckpt.extra["gguf_vocabulary"])
        self.model_path = os.path.join(os.path.dirname(os.path.abspath(ckpt.path)),
                                       tokenizer_file_name(ckpt.model_args.vocab_size))
        try:
            self.sp = SentencePieceProcessor(model_proto=self.model_proto)
        except Exception as exc:  # sentencepiece raises bare RuntimeError
            raise CheckpointError(f"{ckpt.path}: its vocabulary is not a usable sentencepiece model ({exc})") from None
        self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()


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
    writer.add_bool(GGUF_SQUEEZE_SPACES_KEY, sentencepiece_collapses_spaces(sp))
    if chat_template(prompt_format):
        writer.add_chat_template(chat_template(prompt_format))
    for ours, theirs in gguf_key_map(args.n_layers).items():
        writer.add_tensor(theirs, state[ours].detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
