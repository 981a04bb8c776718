"""What every checkpoint format shares: the Checkpoint a reader returns, the one-line
CheckpointError, the check of every weight's name and shape, and torch.load restricted to
tensors and plain data (weights_only) after checking the zip file's CRCs."""
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field, fields
from typing import Dict, Optional

import torch

from cli import UsageError
from data_paths import folder_vocab, instruct_dir, pretokenized_dir
from model import ModelArgs
from prompts import PROMPT_FORMAT_KEY, prompt_format, read_prompt_format


class CheckpointError(UsageError):
    """A file that cannot be read as a checkpoint; the message names the file (exit code 2)."""


@dataclass
class Checkpoint:
    path: str
    kind: str  # project | llama2c | lora_adapter | instruct_storyteller | llama2c_bin_v0/v1/v2 | hf | gguf
    model_args: ModelArgs
    state_dict: Dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)  # training settings (dataset, vocab_size, tokenizer...)
    extra: dict = field(default_factory=dict)  # everything else in the file (optimizer, iter_num...)

    @property
    def prompt_format(self) -> dict:
        """How the model reads its prompt (prompts.prompt_format): the config's record; before
        the record, a model trained on instruct data (config dataset "instruct", or the original
        instruct storyteller's) with its config's prompt_encoding, absent: plain text."""
        try:
            if PROMPT_FORMAT_KEY in self.config:
                return read_prompt_format(self.config[PROMPT_FORMAT_KEY])
            instruct = self.kind == "instruct_storyteller" or self.config.get("dataset") == "instruct"
            return prompt_format(instruct, self.config.get("prompt_encoding") or "plain")
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: config {exc}") from None

    @property
    def training_data(self) -> Optional[str]:
        """The token shard folder the model was trained on (its config's data_dir and dataset),
        if it is still there: its first shard is the validation shard."""
        data_dir, vocab = self.config.get("data_dir"), self.model_args.vocab_size
        if not isinstance(data_dir, str) or self.config.get("dataset") not in ("instruct", "pretrain"):
            return None
        folder = instruct_dir if self.config["dataset"] == "instruct" else pretokenized_dir
        path = folder(data_dir, folder_vocab(vocab, self.config.get("vocab_source")))
        return path if os.path.isdir(path) else None

    @property
    def is_instruct(self) -> bool:
        """Trained on instruction examples (prompt, then BOS, then story)?"""
        return self.prompt_format["is_instruct"]

    @property
    def prompt_encoding(self) -> Optional[str]:
        """How an instruct prompt's text is tokenized (prompts.PROMPT_ENCODINGS); None if plain."""
        return self.prompt_format["prompt_encoding"]


def check_weights(ckpt: Checkpoint):
    """Every weight the model needs, in its shape, and nothing else: a file with odd keys fails
    here in one line, whichever script reads it."""
    expected = weight_shapes(ckpt.model_args)
    expected["output.weight"] = expected["tok_embeddings.weight"]
    for key, value in ckpt.state_dict.items():
        # a weight that is no tensor, or not finite: a corrupt file (a flipped exponent bit in a
        # format without checksums, such as llama2.c's .bin), never a model worth sampling from
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{ckpt.path}: weight {key} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{ckpt.path}: weight {key} holds NaN or infinite values (corrupt file)")
    for key, shape in expected.items():
        if key not in ckpt.state_dict:
            raise CheckpointError(f"{ckpt.path}: has no weight {key}")
        if tuple(ckpt.state_dict[key].shape) != tuple(shape):
            raise CheckpointError(f"{ckpt.path}: {key} is {tuple(ckpt.state_dict[key].shape)}, its "
                                  f"model_args imply {tuple(shape)}")
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: unexpected weights {', '.join(unexpected[:3])}"
                              f"{' ...' if len(unexpected) > 3 else ''}")


def layer_keys(n_layers, suffix):
    return [f"layers.{i}.{suffix}" for i in range(n_layers)]


def weight_shapes(args: ModelArgs):
    """Shape of every weight, by state-dict key."""
    hd, kv = args.head_dim, args.n_kv_heads
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (args.dim,), p + "ffn_norm.weight": (args.dim,),
                       p + "attention.wq.weight": (args.n_heads * hd, args.dim),
                       p + "attention.wk.weight": (kv * hd, args.dim),
                       p + "attention.wv.weight": (kv * hd, args.dim),
                       p + "attention.wo.weight": (args.dim, args.n_heads * hd),
                       p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
                       p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
                       p + "feed_forward.w3.weight": (args.hidden_dim, args.dim)})
    return shapes


# ---- torch files -----------------------------------------------------------------------------

class _PickledModelArgs:
    """Stand-in for the original project's `model.ModelArgs`: takes its fields, runs nothing."""


def verify_zip_crcs(path):
    """torch.save's zip format records a CRC-32 for every member (weights included), but
    torch.load never checks them: a flipped bit in the weights would load as another model. Read
    every member once and compare (a member whose CRC was not recorded, 0, is skipped)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:
                continue
            with archive.open(info) as member:  # zipfile raises BadZipFile on a CRC mismatch
                while member.read(1 << 24):
                    pass


def torch_load(path):
    try:
        if zipfile.is_zipfile(path):
            verify_zip_crcs(path)
        with torch.serialization.safe_globals([(_PickledModelArgs, "model.ModelArgs")]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # never quote torch's own message: it suggests retrying with weights_only=False
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        asks = f"it asks to unpickle {found.group(1)}" if found else "it holds pickled objects other than tensors"
        raise CheckpointError(f"{path}: refused to load ({asks}); only tensors and plain data are read, "
                              f"so code in a checkpoint never runs") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError,
            KeyError, TypeError, AttributeError, IndexError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def model_args_from(raw, path) -> ModelArgs:
    values = vars(raw) if isinstance(raw, _PickledModelArgs) else raw
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: model_args is {type(values).__name__}, expected a dict")
    known = {f.name for f in fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model_args ({exc})") from None
