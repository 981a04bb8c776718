"""Hugging Face Llama folders, read and written: config.json (LlamaForCausalLM), the weights in
model.safetensors (or pytorch_model.bin, read only), and the tokenizer files transformers loads
with no other help. Hugging Face's RoPE rotates the two halves of each head where Meta's (and
llama2.c's) rotates adjacent pairs, so wq and wk rows are permuted per head on the way out and
back on the way in; the forward pass is then the same function."""
import json
import os
import shutil
from typing import Dict

import torch

from checkpoints.common import Checkpoint, CheckpointError, torch_load
from cli import write_json
from data_paths import LLAMA2_VOCAB_SIZE, vocab_source
from model import ModelArgs
from prompts import PROMPT_FORMAT_KEY, chat_template

# The files that make a Hugging Face Llama model: what write_hf_folder writes, and the torch weights
# file read_hf_folder also reads. A folder's hash (adapter.checkpoint_sha256) covers these only.
HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def hf_key_map(n_layers) -> Dict[str, str]:
    """This project's state-dict key -> the Hugging Face LlamaForCausalLM key (lm_head is tied)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    ours_to_hf = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                  "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        for ours, theirs in ours_to_hf.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def hf_permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk from Meta's layout (RoPE rotates adjacent pairs) to Hugging Face's (RoPE rotates
    the two halves of each head): within each head, rows 0,2,4,.. come first, then 1,3,5,..."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of hf_permute_qk."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- reading ---------------------------------------------------------------------------------

def _hf_rope(config):
    """(theta, scaling) from either config style: transformers 4 (rope_theta, rope_scaling) or
    5 (rope_parameters)."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if params.get("rope_type", "default") != "default":
        scaling = params
    return theta, scaling


def _hf_model_args(path, config) -> ModelArgs:
    """ModelArgs for a LlamaForCausalLM config, or a one-line refusal naming what does not fit.
    Missing fields take LlamaConfig's defaults (so a config without tie_word_embeddings is untied)."""
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{path}: config.json says model_type {config.get('model_type')!r}; "
                              f"only Hugging Face Llama models are read")
    theta, scaling = _hf_rope(config)
    dim, n_heads = config.get("hidden_size", 4096), config.get("num_attention_heads", 32)
    refusals = [(config.get("attention_bias", False), "attention biases"),
                (config.get("mlp_bias", False), "MLP biases"),
                (not config.get("tie_word_embeddings", False), "an untied lm_head"),
                (scaling, f"RoPE scaling {scaling}"),
                (float(theta) != 10000.0, f"rope_theta {theta} (only 10000 is supported)"),
                (config.get("hidden_act", "silu") != "silu", f"activation {config.get('hidden_act')}"),
                (config.get("head_dim") not in (None, dim // n_heads),
                 f"head_dim {config.get('head_dim')} != hidden_size / num_attention_heads")]
    problems = [reason for bad, reason in refusals if bad]
    if problems:
        raise CheckpointError(f"{path}: this Llama has {', '.join(problems)}, which this project's "
                              f"Transformer cannot represent")
    try:
        return ModelArgs(dim=dim, n_layers=config.get("num_hidden_layers", 32), n_heads=n_heads,
                         n_kv_heads=config.get("num_key_value_heads") or n_heads,
                         vocab_size=config.get("vocab_size", LLAMA2_VOCAB_SIZE),
                         hidden_dim=config.get("intermediate_size", 11008),
                         norm_eps=config.get("rms_norm_eps", 1e-6),
                         max_seq_len=config.get("max_position_embeddings", 2048))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad config.json ({exc})") from None


def _read_hf_weights(path):
    safetensors_file = os.path.join(path, "model.safetensors")
    torch_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(safetensors_file):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(safetensors_file)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{safetensors_file}: not a readable safetensors file ({exc})") from None
    if os.path.isfile(torch_file):
        weights = torch_load(torch_file)  # weights_only: a hostile pickle cannot run code
        if not isinstance(weights, dict):
            raise CheckpointError(f"{torch_file}: holds a {type(weights).__name__}, expected a state dict")
        return weights
    raise CheckpointError(f"{path}: has config.json but neither model.safetensors nor pytorch_model.bin "
                          f"(sharded weights are not read)")


def read_hf_folder(path) -> Checkpoint:
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    args = _hf_model_args(path, config)
    weights = _read_hf_weights(path)
    state = {}
    for ours, theirs in hf_key_map(args.n_layers).items():
        if theirs not in weights:
            raise CheckpointError(f"{path}: weights lack {theirs}")
        state[ours] = weights[theirs]
    for i in range(args.n_layers):
        wq, wk = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        try:
            state[wq] = hf_unpermute_qk(state[wq], args.n_heads)
            state[wk] = hf_unpermute_qk(state[wk], args.n_kv_heads)
        except RuntimeError:
            raise CheckpointError(f"{path}: layer {i} q_proj/k_proj shapes do not fit config.json") from None
    state["output.weight"] = state["tok_embeddings.weight"]
    tokenizer = os.path.join(path, "tokenizer.model")
    ckpt_config = {"vocab_source": vocab_source(args.vocab_size), "vocab_size": args.vocab_size}
    if os.path.isfile(tokenizer):
        ckpt_config["tokenizer"] = tokenizer
    if PROMPT_FORMAT_KEY in config:  # written by export.py; a folder from elsewhere reads as plain
        ckpt_config[PROMPT_FORMAT_KEY] = config[PROMPT_FORMAT_KEY]
    return Checkpoint(path, "hf", args, state, ckpt_config, {"hf_config": config})


# ---- writing ---------------------------------------------------------------------------------

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
    return {PROMPT_FORMAT_KEY: prompt_format,  # transformers keeps unknown keys; read_hf_folder reads it
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
    if getattr(tokenizer, "model_proto", None):  # a GGUF file's vocabulary: no .model on disk
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(tokenizer.model_proto)
    else:
        shutil.copyfile(tokenizer.model_path, os.path.join(folder, "tokenizer.model"))
    write_json(os.path.join(folder, "tokenizer.json"), hf_tokenizer_json(tokenizer), indent=2)
    sp = tokenizer.sp
    special = {"bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eos_id),
               "unk_token": sp.id_to_piece(sp.unk_id())}
    write_json(os.path.join(folder, "special_tokens_map.json"), special, indent=2)
    template = chat_template(prompt_format)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "model_max_length": args.max_seq_len,
              # "<s>" typed in text is text, as for sentencepiece; BOS comes from add_bos_token.
              # Not so for an instruct model: its chat template ends with the text "<s>", which
              # apply_chat_template must read as BOS
              "split_special_tokens": not template,
              "clean_up_tokenization_spaces": False}
    if template:  # apply_chat_template lays a request out as training did (prompts.CHAT_TEMPLATES)
        config["chat_template"] = template
    write_json(os.path.join(folder, "tokenizer_config.json"), config, indent=2)
