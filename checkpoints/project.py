"""This project's `.pt` checkpoints, which are llama2.c's and nanoGPT's layout too: a torch.save'd
dict of `model` (the state dict), `model_args` (a plain dict), `config` (the training settings),
`iter_num`, the optimizer... Also the original instruct storyteller's checkpoints (a pickled
ModelArgs, LoRA still as unmerged parametrizations), merged on reading."""
import os
from dataclasses import asdict

import torch

from checkpoints.common import Checkpoint, CheckpointError, model_args_from
from cli import atomic_write
from data_paths import vocab_source
from lora import merge_parametrized_lora
from model import ModelArgs
from prompts import PROMPT_FORMAT_KEY


def read_project_checkpoint(path, obj: dict) -> Checkpoint:
    """The Checkpoint in `obj`, the dict torch_load read from `path` (not a LoRA adapter's)."""
    if "model" not in obj or "model_args" not in obj:
        raise CheckpointError(f"{path}: checkpoint dict lacks 'model' or 'model_args' "
                              f"(keys: {', '.join(map(str, list(obj)[:8]))})")
    if not isinstance(obj["model"], dict) or not all(isinstance(k, str) for k in obj["model"]):
        raise CheckpointError(f"{path}: 'model' is not a dict of named weights")
    state = {k.removeprefix("_orig_mod."): v for k, v in obj["model"].items()}
    args = model_args_from(obj["model_args"], path)
    extra = {k: v for k, v in obj.items() if k not in ("model", "model_args", "config")}
    config = obj.get("config") or {}
    if any(".parametrizations.weight." in k for k in state):
        try:
            state = merge_parametrized_lora(state, float(obj.get("lora_alpha", 1.0)))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: malformed LoRA parametrization ({type(exc).__name__}: {exc})") from None
        kind = "instruct_storyteller"
    else:
        kind = "project" if obj.get("kind") == "project" else "llama2c"
    return Checkpoint(path, kind, args, state, config, extra)


# ---- writing ---------------------------------------------------------------------------------

def save_checkpoint(path: str, checkpoint: dict):
    """Atomically torch.save a checkpoint dict (model, model_args as a plain dict, config...)."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def model_args_dict(args: ModelArgs) -> dict:
    return asdict(args)


def project_checkpoint(ckpt, tokenizer_path):
    """The dict save_checkpoint writes for any Checkpoint (export.py --format=pt)."""
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
