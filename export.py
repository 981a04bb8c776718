"""Export a checkpoint to the files other Llama tools read, and import theirs.

    python export.py --checkpoint=out/ckpt.pt --format=llama2c-v0 --out=out/model.bin
    python export.py --checkpoint=out/ckpt.pt --format=llama2c-q8 --out=out/model_q8.bin
    python export.py --checkpoint=out/ckpt.pt --format=hf --out=out/hf_model
    python export.py --checkpoint=out/ckpt.pt --format=gguf --out=out/model.gguf
    python export.py --checkpoint=hf_model/ --format=pt --out=out/from_hf.pt

--checkpoint is anything checkpoint.load_checkpoint reads: this project's checkpoints and LoRA
adapters (merged on the way), llama2.c .pt files and .bin files (versions 0, 1, 2), the original
instruct storyteller's checkpoints, and Hugging Face Llama folders. --tokenizer overrides the
sentencepiece .model the checkpoint names or has beside it.

Formats
- llama2c-v0: llama2.c's legacy float32 file, the one its run.c reads: 7-int header, weights,
  then the RoPE cos/sin tables computed as llama2.c's Python computes them.
- llama2c-v1: llama2.c's version 1 (magic "ak42", 256-byte header, float32, no RoPE tables),
  as its export.py --version=1 writes it (its run.c reads version 0, runq.c version 2).
- llama2c-q8: llama2.c's version 2 (Q8_0), read by its runq.c: norms float32, each matmul weight
  as int8 plus one float32 scale per group (scale = max|w| / 127, q = round(w / scale)). The
  group size starts at 64 and halves until it divides both dim and hidden_dim: runq.c also
  quantizes the activations (dim and hidden_dim long) in groups of the same size and silently
  drops a partial last group.
  All three get the tokenizer in llama2.c's tokenizer.bin format beside them, named after the
  .model (tok512.model -> tok512.bin): ./run model.bin -z tok512.bin, and the prompt format
  (instruct or not, and the prompt encoding) in model.bin.json, which llama2.c's header has no
  room for; the loader reads it back.
- hf: a folder transformers.AutoModelForCausalLM / AutoTokenizer load with no other help:
  config.json (LlamaForCausalLM, tie_word_embeddings true, rope_theta 10000), model.safetensors
  (float32; lm_head is not stored, it is tied to embed_tokens), generation_config.json,
  tokenizer.model (the sentencepiece file itself), tokenizer.json, tokenizer_config.json,
  special_tokens_map.json. Hugging Face's RoPE rotates the two HALVES of each head where
  llama2.c rotates ADJACENT pairs, so wq and wk rows are permuted per head
  (checkpoint.hf_permute_qk: view (heads, head_dim/2, 2, dim), swap axes 1 and 2; wk with
  n_kv_heads); the forward pass is then the same function. tokenizer.json rebuilds
  sentencepiece's BPE for the tokenizers library: the vocabulary in id order, merges = every
  split of a piece into two pieces ranked by the piece's score, byte fallback, a normalizer
  that adds the "▁" prefix and spells spaces "▁" and, when the .model squeezes and trims runs
  of spaces (llama2.c's trained tokenizers do; Llama 2's does not), first does that too. It
  loads as PreTrainedTokenizerFast: LlamaTokenizer rebuilds its own pipeline without that
  normalizer, and reading tokenizer.model needs protobuf. BOS is added, EOS is not, and "<s>"
  typed in text stays text (split_special_tokens), as with sentencepiece.
- gguf: one file for llama.cpp, written with the gguf package, following llama.cpp's
  convert_hf_to_gguf.py conventions for architecture "llama":
  * tensors token_embd, blk.N.attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
    ffn_gate (w1), ffn_down (w2), ffn_up (w3), output_norm, each ".weight"; no output.weight
    because the classifier is tied (llama.cpp then uses token_embd);
  * all float32 (general.file_type 0), each PyTorch (out, in) matrix written row-major as it is,
    which ggml lists as ne = [in, out];
  * attn_q / attn_k in Meta's layout, which is llama2.c's: NOT permuted (llama.cpp's converter
    undoes Hugging Face's permutation; ggml's normal RoPE rotates adjacent pairs);
  * metadata llama.context_length, embedding_length, block_count, feed_forward_length,
    rope.dimension_count (head_dim), rope.freq_base 10000, attention.head_count,
    attention.head_count_kv, attention.layer_norm_rms_epsilon, vocab_size;
  * vocabulary tokenizer.ggml.model "llama" (sentencepiece): tokens are the pieces verbatim
    (with "▁", bytes as "<0xNN>"), scores, token_type (1 normal, 2 unknown, 3 control, 5 unused,
    6 byte), bos/eos/unknown ids, add_bos_token true, add_eos_token false, add_space_prefix true;
  * the prompt format as JSON under tinystories.prompt_format (also the "prompt_format" key of
    the hf format's config.json).
  GGUF has no field for sentencepiece's squeezing of spaces, so with a tokenizer that squeezes
  them (tok512 and the others llama2.c trains) GGUF readers tokenize text with runs of spaces,
  or leading/trailing ones, differently; ordinary story text is unaffected.
- pt: this project's checkpoint (kind "project", model, model_args, config with vocab_size,
  vocab_source and the tokenizer path when one is found, iter_num 0), e.g. to fine-tune a small
  Llama from the Hugging Face Hub with finetune_lora.py.

An existing output is never replaced without --force (into an existing folder, --format=hf
writes only its own files, whatever else is there stays); every file is written under a temporary
name and renamed (a folder likewise), so a reader never sees half an export.
"""
import argparse
import json
import os
import shutil
import struct
import sys

import torch

from checkpoint import (GGUF_PROMPT_FORMAT_KEY, LLAMA2C_MAGIC, find_tokenizer, gguf_key_map, hf_key_map,
                        hf_permute_qk, llama2c_norm_order, llama2c_sidecar_path, llama2c_v0_order,
                        llama2c_weight_order, load_checkpoint, load_tokenizer_for, model_args_dict,
                        save_checkpoint)
import cli
from cli import OneLineParser, UsageError, atomic_write, atomic_write_folder, report_error, run_main, write_json
from data_paths import vocab_source
from prompts import PROMPT_FORMAT_KEY

FORMATS = ("llama2c-v0", "llama2c-v1", "llama2c-q8", "hf", "gguf", "pt")
LLAMA2C_FORMATS = ("llama2c-v0", "llama2c-v1", "llama2c-q8")


def float32_bytes(tensor) -> bytes:
    return tensor.detach().float().contiguous().numpy().astype("<f4").tobytes()


# ---- llama2.c binary files -------------------------------------------------------------------

def llama2c_rope_tables(head_dim, max_seq_len, theta=10000.0):
    """cos and sin exactly as llama2.c's model.py computes them (float32 throughout), which is
    what makes a version-0 export byte-identical to llama2.c's own. torch.cos / torch.sin, not
    torch.polar: polar's real part differs in the last bit for 111 of stories260K's 2048."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len), freqs).float()
    return torch.cos(angles), torch.sin(angles)


def llama2c_config_ints(args):
    # vocab_size is positive: the classifier is always shared in this project
    return struct.pack("<7i", args.dim, args.hidden_dim, args.n_layers, args.n_heads,
                       args.n_kv_heads, args.vocab_size, args.max_seq_len)


def llama2c_versioned_header(args, version, group_size=None) -> bytes:
    header = struct.pack("<Ii", LLAMA2C_MAGIC, version) + llama2c_config_ints(args) + b"\x01"
    if version == 2:
        header += struct.pack("<i", group_size)
    return header + b"\x00" * (256 - len(header))


def write_llama2c_v0(path, args, state):
    cos, sin = llama2c_rope_tables(args.head_dim, args.max_seq_len)
    with open(path, "wb") as f:
        f.write(llama2c_config_ints(args))
        for key in llama2c_v0_order(args.n_layers):
            f.write(float32_bytes(state[key]))
        f.write(float32_bytes(cos))
        f.write(float32_bytes(sin))


def write_llama2c_v1(path, args, state):
    with open(path, "wb") as f:
        f.write(llama2c_versioned_header(args, 1))
        for key in llama2c_norm_order(args.n_layers) + llama2c_weight_order(args.n_layers):
            f.write(float32_bytes(state[key]))


def q8_group_size(args) -> int:
    group_size = 64
    while args.dim % group_size or args.hidden_dim % group_size:
        group_size //= 2
    return group_size


def quantize_q8_0(weight, group_size):
    """(int8 values, float32 scale per group): scale = max|w| / 127, q = round(w / scale).
    An all-zero group gets scale 0 and zeros, where llama2.c would divide by zero."""
    groups = weight.detach().float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / divisor[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def write_llama2c_q8(path, args, state):
    group_size = q8_group_size(args)
    with open(path, "wb") as f:
        f.write(llama2c_versioned_header(args, 2, group_size))
        for key in llama2c_norm_order(args.n_layers):
            f.write(float32_bytes(state[key]))
        for key in llama2c_weight_order(args.n_layers):
            q, scale = quantize_q8_0(state[key], group_size)
            f.write(q.numpy().tobytes())
            f.write(float32_bytes(scale))


LLAMA2C_WRITERS = {"llama2c-v0": write_llama2c_v0, "llama2c-v1": write_llama2c_v1,
                   "llama2c-q8": write_llama2c_q8}


def llama2c_tokenizer_path(out, tokenizer_model):
    name = os.path.splitext(os.path.basename(tokenizer_model))[0] + ".bin"
    return os.path.join(os.path.dirname(os.path.abspath(out)), name)


def export_llama2c_tokenizer(tokenizer, path, force):
    """Write tokenizer.bin beside the model. An existing file that is byte-identical to what we
    would write is left alone; a different one needs --force."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.new")
    tokenizer.export(tmp)
    try:
        if os.path.exists(path):
            with open(path, "rb") as old, open(tmp, "rb") as new:
                if old.read() == new.read():
                    return
            if not force:
                raise UsageError(f"{path}: a different tokenizer file is already there; "
                                 f"pass --force to overwrite it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- Hugging Face folder ---------------------------------------------------------------------

def hf_state_dict(args, state):
    """Our weights under Hugging Face names, wq/wk permuted to its rotate-halves RoPE layout."""
    hf_state = {}
    for ours, theirs in hf_key_map(args.n_layers).items():
        weight = state[ours].detach().float()
        if ours.endswith("attention.wq.weight"):
            weight = hf_permute_qk(weight, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            weight = hf_permute_qk(weight, args.n_kv_heads)
        hf_state[theirs] = weight.contiguous().clone()  # safetensors refuses shared storage
    return hf_state


def hf_config(args, tokenizer, prompt_format):
    return {PROMPT_FORMAT_KEY: prompt_format,  # transformers keeps unknown keys; checkpoint.py reads it
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
            "rms_norm_eps": args.norm_eps, "rope_theta": 10000.0, "rope_scaling": None,
            "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "torch_dtype": "float32", "use_cache": True}


def sentencepiece_collapses_spaces(sp) -> bool:
    """Does the .model remove extra whitespace (its normalizer spec, read here by behaviour since
    the spec itself needs protobuf)?"""
    return sp.encode("a  b") == sp.encode("a b") and sp.encode(" a ") == sp.encode("a")


def bpe_merges(sp):
    """The merges that make a Hugging Face BPE model encode like sentencepiece's BPE: every
    split of a piece into two pieces, ranked by the piece's score, best first (sentencepiece
    merges the adjacent pair whose union scores highest)."""
    normal = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, piece_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-sp.get_score(piece_id), normal[left], normal[right], left, right))
    merges.sort()
    return [[left, right] for _, _, _, left, right in merges]


def hf_tokenizer_json(tokenizer):
    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special_ids = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    bos = pieces[tokenizer.bos_id]
    # sentencepiece's own steps, in its order: (optionally) drop leading and trailing spaces and
    # squeeze runs of them, add the "▁" prefix to non-empty text, then spell spaces as "▁".
    # Only U+0020 counts as a space: tabs and newlines stay as they are.
    steps = []
    if sentencepiece_collapses_spaces(sp):
        steps += [{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
                  {"type": "Replace", "pattern": {"Regex": "\\A | \\z"}, "content": ""}]
    steps += [{"type": "Prepend", "prepend": "\u2581"},
              {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in special_ids],
        "normalizer": {"type": "Sequence", "normalizers": steps},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()] if sp.unk_id() >= 0 else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: i for i, piece in enumerate(pieces)}, "merges": bpe_merges(sp)},
    }


def write_hf_folder(folder, args, state, tokenizer, prompt_format):
    from safetensors.torch import save_file

    weights_path, config_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    save_file(hf_state_dict(args, state), weights_path, metadata={"format": "pt"})
    write_json(config_path, hf_config(args, tokenizer, prompt_format), indent=2)
    shutil.copymode(config_path, weights_path)  # safetensors creates its file private (0600)
    write_json(os.path.join(folder, "generation_config.json"),
               {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}, indent=2)
    shutil.copyfile(tokenizer.model_path, os.path.join(folder, "tokenizer.model"))
    write_json(os.path.join(folder, "tokenizer.json"), hf_tokenizer_json(tokenizer), indent=2)
    sp = tokenizer.sp
    special = {"bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eos_id),
               "unk_token": sp.id_to_piece(sp.unk_id())}
    write_json(os.path.join(folder, "special_tokens_map.json"), special, indent=2)
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
                "add_eos_token": False, "model_max_length": args.max_seq_len,
                # "<s>" typed in text is text, as for sentencepiece; BOS comes from add_bos_token
                "split_special_tokens": True,
                "clean_up_tokenization_spaces": False}, indent=2)


# ---- GGUF ------------------------------------------------------------------------------------

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
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_string(GGUF_PROMPT_FORMAT_KEY, json.dumps(prompt_format))
    for ours, theirs in gguf_key_map(args.n_layers).items():
        writer.add_tensor(theirs, state[ours].detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- this project's checkpoint ---------------------------------------------------------------

def project_checkpoint(ckpt, tokenizer_path):
    state = {key: value for key, value in ckpt.state_dict.items() if key != "output.weight"}
    state["output.weight"] = state["tok_embeddings.weight"]  # tied: torch.save stores it once
    config = dict(ckpt.config)
    config["vocab_size"] = ckpt.model_args.vocab_size
    config["vocab_source"] = vocab_source(ckpt.model_args.vocab_size)
    if tokenizer_path:
        config["tokenizer"] = os.path.abspath(tokenizer_path)
    config[PROMPT_FORMAT_KEY] = ckpt.prompt_format  # the one record, also for a checkpoint from before it
    config.pop("prompt_encoding", None)
    return {"kind": "project", "model": state, "model_args": model_args_dict(ckpt.model_args),
            "config": config, "iter_num": 0}


# ---- command line ----------------------------------------------------------------------------

def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="input: .pt, llama2.c .bin, LoRA adapter, Hugging Face Llama folder")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output file (a folder for --format=hf)")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the checkpoint's own)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (into a folder: only the files the export writes)")
    return p


def check_output(out, fmt, force, inputs=()):
    """cli.check_output's rule: an existing --out only with --force, never an input; into an
    existing folder --format=hf writes its own files and leaves the others there. The llama2.c
    formats also write the prompt-format record beside the .bin."""
    cli.check_output(out, f"--out={out}", force, inputs=inputs, folder=fmt == "hf")
    if fmt in LLAMA2C_FORMATS:
        sidecar = llama2c_sidecar_path(out)
        cli.check_output(sidecar, sidecar, force, inputs=inputs)


def export(checkpoint, fmt, out, tokenizer_path=None, force=False) -> str:
    """Run one export; returns a one-line summary. Raises UsageError or CheckpointError."""
    if fmt not in FORMATS:
        raise UsageError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
    check_output(out, fmt, force, inputs=[checkpoint, tokenizer_path])
    ckpt = load_checkpoint(checkpoint)
    args, state, prompt_format = ckpt.model_args, ckpt.state_dict, ckpt.prompt_format
    if fmt == "pt":
        tokenizer_path = find_tokenizer(ckpt, tokenizer_path)
        save_checkpoint(out, project_checkpoint(ckpt, tokenizer_path))
        return f"wrote {out} (this project's checkpoint, {ckpt.kind} input)"
    tokenizer = load_tokenizer_for(ckpt, tokenizer_path)
    if fmt in LLAMA2C_FORMATS:
        tokenizer_bin = llama2c_tokenizer_path(out, tokenizer.model_path)
        if os.path.abspath(tokenizer_bin) == os.path.abspath(out):
            raise UsageError(f"{out}: is where the tokenizer file goes; name the model differently")
        export_llama2c_tokenizer(tokenizer, tokenizer_bin, force)
        sidecar = llama2c_sidecar_path(out)
        write_json(sidecar, {PROMPT_FORMAT_KEY: prompt_format}, indent=2)
        atomic_write(out, lambda tmp: LLAMA2C_WRITERS[fmt](tmp, args, state))
        return f"wrote {out}, {os.path.basename(sidecar)} (its prompt format) and {tokenizer_bin}"
    if fmt == "hf":
        atomic_write_folder(out, lambda folder: write_hf_folder(folder, args, state, tokenizer, prompt_format))
        return f"wrote {out}/ (Hugging Face LlamaForCausalLM)"
    name = os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]
    atomic_write(out, lambda tmp: write_gguf(tmp, args, state, tokenizer, name, prompt_format))
    return f"wrote {out} (GGUF, float32)"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        print(export(args.checkpoint, args.format, args.out, args.tokenizer, args.force))
    except UsageError as exc:
        return report_error(exc)
    except (OSError, ImportError) as exc:  # a full disk, a read-only folder, gguf not installed
        return report_error(f"exporting {args.checkpoint} to {args.out} failed: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
