"""The one way in: load_checkpoint(path) tells the format by the file's first bytes (or a
folder's config.json), lets that format's module read it, and checks every weight; load_model
and the tokenizer lookup build on it."""
import os
import struct
from typing import Optional

import torch

from checkpoints import adapter, gguf_file, huggingface, llama2c, project
from checkpoints.common import Checkpoint, CheckpointError, check_weights, torch_load
from data_paths import tokenizer_file_name
from model import Transformer
from tokenizer import Tokenizer, TokenizerError


def load_checkpoint(path: str) -> Checkpoint:
    ckpt = _read_checkpoint(path)
    check_weights(ckpt)
    return ckpt


def _read_checkpoint(path: str) -> Checkpoint:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return huggingface.read_hf_folder(path)
        raise CheckpointError(f"{path}: is a folder without config.json, expected a checkpoint file "
                              f"(.pt or llama2.c .bin) or a Hugging Face Llama folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"GGUF"):
        return gguf_file.read_gguf(path)
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == llama2c.LLAMA2C_MAGIC:
        return llama2c.read_llama2c_bin_versioned(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _read_torch(path)
    return llama2c.read_llama2c_bin_v0(path)


def _read_torch(path) -> Checkpoint:
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a checkpoint dict")
    if obj.get("kind") == "lora_adapter":
        return adapter.read_lora_adapter(path, obj, load_base=load_checkpoint)
    return project.read_project_checkpoint(path, obj)


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """(Transformer in eval mode, Checkpoint) for any checkpoint kind load_checkpoint reads."""
    ckpt = load_checkpoint(path)
    model = Transformer(ckpt.model_args)
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, ckpt


def find_tokenizer(ckpt: Checkpoint, override: Optional[str] = None) -> Optional[str]:
    """The tokenizer a checkpoint was trained with: --tokenizer if given, else the path its
    config names, else tok{N}.model (custom vocab) or tokenizer.model (Llama 2 vocab) next to
    the checkpoint, in data/ or in the working folder."""
    if override:
        return override
    vocab = ckpt.model_args.vocab_size
    here = os.path.dirname(os.path.abspath(ckpt.path))
    names = [tokenizer_file_name(vocab)]
    named = ckpt.config.get("tokenizer")
    if named:
        names.append(os.path.basename(named))  # a checkpoint copied along with its tokenizer
    candidates = ([named] if named else []) + [os.path.join(here, n) for n in names] + \
        [os.path.join("data", names[0]), names[0]]
    return next((c for c in candidates if os.path.isfile(c)), None)


def load_tokenizer_for(ckpt: Checkpoint, override: Optional[str] = None) -> Tokenizer:
    """The checkpoint's tokenizer, checked against the model's vocabulary: --tokenizer if given,
    else a GGUF file's own vocabulary, else the file find_tokenizer finds."""
    vocab = ckpt.model_args.vocab_size
    if override is None and ckpt.extra.get("gguf_vocabulary"):  # a GGUF file carries its own
        tokenizer = gguf_file.GGUFTokenizer(ckpt)
        path = ckpt.path
    else:
        path = find_tokenizer(ckpt, override)
        tokenizer = _tokenizer_file(ckpt, path)
    if tokenizer.vocab_size != vocab:
        raise CheckpointError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but {ckpt.path} "
                              f"has a vocabulary of {vocab}; pass the matching --tokenizer")
    return tokenizer


def _tokenizer_file(ckpt, path) -> Tokenizer:
    vocab = ckpt.model_args.vocab_size
    if path is None:
        raise CheckpointError(f"{ckpt.path}: no tokenizer found for it (looked for "
                              f"{tokenizer_file_name(vocab)} beside it "
                              f"and in data/); pass --tokenizer=PATH to a sentencepiece .model")
    try:
        tokenizer = Tokenizer(path)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    return tokenizer
