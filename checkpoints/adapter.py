"""LoRA adapter files (`kind: "lora_adapter"`, written by finetune_lora.py): the low-rank
matrices and the base checkpoint they were trained on, named by path and pinned by sha256. On
reading, the adapter is merged into its base, so every script sees one ordinary model."""
import hashlib
import os

from checkpoints.common import Checkpoint, CheckpointError
from cli import file_sha256
from lora import merge_adapters
from prompts import PROMPT_FORMAT_KEY


def checkpoint_sha256(path: str) -> str:
    """sha256 of a checkpoint file; for a folder (a Hugging Face model), of every file in it:
    each one's path inside the folder and its own sha256, in sorted order."""
    if not os.path.isdir(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(full, path)}\0{file_sha256(full)}\n".encode("utf-8"))
    return digest.hexdigest()


def base_reference(base_path: str, folder: str) -> dict:
    """How an adapter (or a LoRA run's last.pt) in `folder` names its base: relative to that
    folder when both lie in one tree (so a moved out/ folder still finds it), and absolute as
    well, for an adapter moved without its base."""
    base, folder = os.path.abspath(base_path), os.path.abspath(folder)
    same_tree = os.path.dirname(os.path.commonpath([base, folder])) != os.path.commonpath([base, folder])
    return {"base_checkpoint": os.path.relpath(base, folder) if same_tree else base,
            "base_checkpoint_absolute": base}


def find_base_checkpoint(path: str, obj: dict) -> str:
    """The base an adapter or a LoRA run's last.pt at `path` names (base_reference): relative to
    its folder first, then the absolute path, then (files from before) as written."""
    recorded = obj.get("base_checkpoint")
    if not isinstance(recorded, str) or not recorded:
        raise CheckpointError(f"{path}: names no base checkpoint")
    here = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(here, recorded), obj.get("base_checkpoint_absolute"), recorded]
    found = next((c for c in candidates if isinstance(c, str) and c and os.path.exists(c)), None)
    if found is None:
        raise CheckpointError(f"{path}: its base checkpoint {recorded!r} is not found")
    return found


def read_lora_adapter(path, obj: dict, load_base) -> Checkpoint:
    """The adapter in `obj` (read from `path`) merged into its base, which load_base reads
    (loading.load_checkpoint, passed in so that this module need not import the dispatch)."""
    base_path = find_base_checkpoint(path, obj)
    if obj.get("base_sha256") and checkpoint_sha256(base_path) != obj["base_sha256"]:
        raise CheckpointError(f"{path}: base checkpoint {base_path} is not the one this adapter "
                              f"was trained on (sha256 differs)")
    if os.path.abspath(base_path) == os.path.abspath(path):
        raise CheckpointError(f"{path}: names itself as its base checkpoint")
    base = load_base(base_path)
    try:
        state = merge_adapters(base.state_dict, obj["lora"], float(obj["lora_alpha"]), bool(obj.get("lora_rslora", False)))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed LoRA adapter ({type(exc).__name__}: {exc})") from None
    own = obj.get("config") or {}
    config = {**base.config, **own}
    if PROMPT_FORMAT_KEY not in own and "dataset" in own:  # an adapter saved before the record
        config.pop(PROMPT_FORMAT_KEY, None)
    extra = {k: v for k, v in obj.items() if k not in ("lora", "config")}
    return Checkpoint(path, "lora_adapter", base.model_args, state, config, extra)
