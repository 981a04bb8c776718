"""LoRA adapter files (`kind: "lora_adapter"`, written by finetune_lora.py): the low-rank
matrices and the base checkpoint they were trained on, named by path and pinned by sha256. On
reading, the adapter is merged into its base, so every script sees one ordinary model."""
import hashlib
import os

from checkpoints.common import Checkpoint, CheckpointError
from checkpoints.huggingface import HF_MODEL_FILES
from cli import file_sha256
from lora import merge_adapters
from prompts import PROMPT_FORMAT_KEY


def checkpoint_sha256(path: str) -> str:
    """sha256 of a checkpoint file; for a folder (a Hugging Face model), of the files that make
    the model (HF_MODEL_FILES, not a .git/ or notes beside them): each one's name and its own
    sha256, in sorted order."""
    if not os.path.isdir(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for name in sorted(HF_MODEL_FILES):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            digest.update(f"{name}\0{file_sha256(full)}\n".encode("utf-8"))
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
    return _locate_base(path, obj)[0]


def _locate_base(path: str, obj: dict):
    """(base path, whether its sha256 is the recorded one; None where none is recorded). Of the
    places find_base_checkpoint tries, the first holding the recorded model wins: an adapter
    copied beside another model's base.pt still finds its own at the absolute path."""
    recorded = obj.get("base_checkpoint")
    if not isinstance(recorded, str) or not recorded:
        raise CheckpointError(f"{path}: names no base checkpoint")
    here = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(here, recorded), obj.get("base_checkpoint_absolute"), recorded]
    found = []
    for candidate in candidates:
        if isinstance(candidate, str) and candidate and os.path.exists(candidate) \
                and os.path.abspath(candidate) not in map(os.path.abspath, found):
            found.append(candidate)
    if not found:
        raise CheckpointError(f"{path}: its base checkpoint {recorded!r} is not found")
    expected = obj.get("base_sha256")
    if not expected:
        return found[0], None
    return next(((c, True) for c in found if checkpoint_sha256(c) == expected), (found[0], False))


def read_lora_adapter(path, obj: dict, load_base) -> Checkpoint:
    """The adapter in `obj` (read from `path`) merged into its base, which load_base reads
    (loading.load_checkpoint, passed in so that this module need not import the dispatch)."""
    base_path, same_base = _locate_base(path, obj)
    if same_base is False:
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
