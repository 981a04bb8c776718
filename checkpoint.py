"""The one place that reads and writes model checkpoints.

`load_checkpoint(path)` understands, whatever the file is called:
- this project's checkpoints and llama2.c's `.pt` checkpoints (the same dict layout: `model`,
  `model_args`, `config`, `iter_num`, ...; a `_orig_mod.` prefix from torch.compile is dropped);
- this project's LoRA adapter files (`kind: "lora_adapter"`), merged into their base on the way;
- the original instruct storyteller's checkpoints (pickled `ModelArgs`, unmerged LoRA
  parametrizations), with the LoRA rank read from the tensor shapes;
- llama2.c's binary model files, versions 0, 1 and 2 (Q8_0, dequantized);
- a Hugging Face Llama folder (config.json + model.safetensors or pytorch_model.bin), with wq/wk
  permuted back from Hugging Face's rotate-halves layout to Meta's adjacent pairs;
- a llama GGUF file with float32 or float16 tensors (what export.py --format=gguf writes).
Every export carries the prompt format (prompts.prompt_format), and each reader here takes it back.
Nothing is unpickled beyond tensors and plain containers (`weights_only=True`), so a hostile
file can fail to load but never run code.
"""
import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Optional

import numpy as np
import torch

from cli import UsageError, atomic_write, file_sha256
from data_paths import LLAMA2_VOCAB_SIZE, tokenizer_file_name, vocab_source
from lora import merge_adapters, merge_parametrized_lora
from model import ModelArgs, Transformer
from prompts import PROMPT_FORMAT_KEY, prompt_format, read_prompt_format
from tokenizer import Tokenizer, TokenizerError

LLAMA2C_MAGIC = 0x616B3432  # "ak42"


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
    def is_instruct(self) -> bool:
        """Trained on instruction examples (prompt, then BOS, then story)?"""
        return self.prompt_format["is_instruct"]

    @property
    def prompt_encoding(self) -> Optional[str]:
        """How an instruct prompt's text is tokenized (prompts.PROMPT_ENCODINGS); None if plain."""
        return self.prompt_format["prompt_encoding"]


# ---- reading ---------------------------------------------------------------------------------

def load_checkpoint(path: str) -> Checkpoint:
    ckpt = _read_checkpoint(path)
    check_weights(ckpt)
    return ckpt


def check_weights(ckpt: Checkpoint):
    """Every weight the model needs, in its shape, and nothing else: a file with odd keys fails
    here in one line, whichever script reads it."""
    expected = _shapes(ckpt.model_args)
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


def _read_checkpoint(path: str) -> Checkpoint:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return _read_hf_folder(path)
        raise CheckpointError(f"{path}: is a folder without config.json, expected a checkpoint file "
                              f"(.pt or llama2.c .bin) or a Hugging Face Llama folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"GGUF"):
        return _read_gguf(path)
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        return _read_llama2c_bin_versioned(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _read_torch(path)
    return _read_llama2c_bin_v0(path)


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """(Transformer in eval mode, Checkpoint) for any checkpoint kind load_checkpoint reads."""
    ckpt = load_checkpoint(path)
    model = Transformer(ckpt.model_args)
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, ckpt


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


def _torch_load(path):
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


def _model_args_from(raw, path) -> ModelArgs:
    values = vars(raw) if isinstance(raw, _PickledModelArgs) else raw
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: model_args is {type(values).__name__}, expected a dict")
    known = {f.name for f in fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model_args ({exc})") from None


def _read_torch(path) -> Checkpoint:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a checkpoint dict")
    if obj.get("kind") == "lora_adapter":
        return _read_lora_adapter(path, obj)
    if "model" not in obj or "model_args" not in obj:
        raise CheckpointError(f"{path}: checkpoint dict lacks 'model' or 'model_args' "
                              f"(keys: {', '.join(map(str, list(obj)[:8]))})")
    if not isinstance(obj["model"], dict) or not all(isinstance(k, str) for k in obj["model"]):
        raise CheckpointError(f"{path}: 'model' is not a dict of named weights")
    state = {k.removeprefix("_orig_mod."): v for k, v in obj["model"].items()}
    args = _model_args_from(obj["model_args"], path)
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


def _read_lora_adapter(path, obj) -> Checkpoint:
    base_path = find_base_checkpoint(path, obj)
    if obj.get("base_sha256") and checkpoint_sha256(base_path) != obj["base_sha256"]:
        raise CheckpointError(f"{path}: base checkpoint {base_path} is not the one this adapter "
                              f"was trained on (sha256 differs)")
    if os.path.abspath(base_path) == os.path.abspath(path):
        raise CheckpointError(f"{path}: names itself as its base checkpoint")
    base = load_checkpoint(base_path)
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


def _read_floats(f, count, path):
    data = f.read(4 * count)
    if len(data) != 4 * count:
        raise CheckpointError(f"{path}: truncated llama2.c model file")
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())


def _llama2c_args(path, header):
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = header
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, max_seq_len) <= 0 or vocab_size == 0 \
            or dim > 1 << 16 or n_layers > 1024 or abs(vocab_size) > 1 << 22 or max_seq_len > 1 << 20:
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch file nor a llama2.c "
                              f"model file with a sane header)")
    try:
        return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=abs(vocab_size), hidden_dim=hidden_dim, max_seq_len=max_seq_len)
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad llama2.c header ({exc})") from None


def layer_keys(n_layers, suffix):
    return [f"layers.{i}.{suffix}" for i in range(n_layers)]


def _shapes(args: ModelArgs):
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


# The order llama2.c's files hold the weights in, shared by the readers here and export.py.

def llama2c_matmul_order(n_layers):
    """Attention matmul weights, all layers' wq, then all wk, wv, wo."""
    return [key for name in ("wq", "wk", "wv", "wo") for key in layer_keys(n_layers, f"attention.{name}.weight")]


def llama2c_ffn_order(n_layers):
    return [key for name in ("w1", "w2", "w3") for key in layer_keys(n_layers, f"feed_forward.{name}.weight")]


def llama2c_v0_order(n_layers):
    """Version 0: everything float32 in layer-type order (the RoPE tables follow)."""
    return (["tok_embeddings.weight"] + layer_keys(n_layers, "attention_norm.weight")
            + llama2c_matmul_order(n_layers) + layer_keys(n_layers, "ffn_norm.weight")
            + llama2c_ffn_order(n_layers) + ["norm.weight"])


def llama2c_norm_order(n_layers):
    """Versions 1 and 2: the norms first (float32 in both)..."""
    return layer_keys(n_layers, "attention_norm.weight") + layer_keys(n_layers, "ffn_norm.weight") + ["norm.weight"]


def llama2c_weight_order(n_layers):
    """...then the matmul weights (float32 in version 1, Q8_0 in version 2)."""
    return ["tok_embeddings.weight"] + llama2c_matmul_order(n_layers) + llama2c_ffn_order(n_layers)


def _check_size(path, expected_end):
    actual = os.path.getsize(path)
    if actual != expected_end:
        raise CheckpointError(f"{path}: llama2.c model file is {actual} bytes, its header implies "
                              f"{expected_end} (truncated or not a model file)")


def _finish_bin(path, kind, args, state, shared):
    if not shared:
        raise CheckpointError(f"{path}: has an unshared classifier; this project's model ties "
                              f"output to the token embedding")
    state["output.weight"] = state["tok_embeddings.weight"]
    config = {"vocab_source": vocab_source(args.vocab_size), "vocab_size": args.vocab_size}
    config.update(read_llama2c_sidecar(path))
    return Checkpoint(path, kind, args, state, config, {})


def llama2c_sidecar_path(bin_path: str) -> str:
    """llama2.c's header has no room for the prompt format: export.py writes it beside the .bin."""
    return bin_path + ".json"


def read_llama2c_sidecar(bin_path) -> dict:
    """{"prompt_format": ...} from the JSON file beside a .bin, or {} where there is none."""
    sidecar = llama2c_sidecar_path(bin_path)
    if not os.path.isfile(sidecar):
        return {}
    try:
        with open(sidecar, encoding="utf-8") as f:
            record = json.load(f)[PROMPT_FORMAT_KEY]
        return {PROMPT_FORMAT_KEY: read_prompt_format(record)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{sidecar}: not a readable prompt format file ({exc})") from None


def _read_llama2c_bin_v0(path) -> Checkpoint:
    with open(path, "rb") as f:
        raw = f.read(28)
        if len(raw) < 28:
            raise CheckpointError(f"{path}: not a checkpoint (too short for any known format)")
        header = struct.unpack("<7i", raw)
        args = _llama2c_args(path, header)
        shared = header[5] > 0
        shapes = _shapes(args)
        hd = args.head_dim
        n_floats = sum(int(np.prod(s)) for s in shapes.values()) + args.max_seq_len * hd \
            + (0 if shared else args.vocab_size * args.dim)
        _check_size(path, 28 + 4 * n_floats)

        def read(key, shape=None):
            shape = shape or shapes.get(key, (args.vocab_size, args.dim))
            return _read_floats(f, int(np.prod(shape)), path).view(shape)

        state = {key: read(key) for key in llama2c_v0_order(args.n_layers)}
        read("freqs", (args.max_seq_len, hd // 2))  # RoPE cos and sin tables: recomputed, not kept
        read("freqs", (args.max_seq_len, hd // 2))
        return _finish_bin(path, "llama2c_bin_v0", args, state, shared)


def _read_llama2c_bin_versioned(path) -> Checkpoint:
    with open(path, "rb") as f:
        raw = f.read(256)
        if len(raw) < 256:
            raise CheckpointError(f"{path}: truncated llama2.c model file (header)")
        version = struct.unpack("<i", raw[4:8])[0]
        if version not in (1, 2):
            raise CheckpointError(f"{path}: llama2.c model version {version}; versions 0, 1 and 2 are read")
        header = struct.unpack("<7i", raw[8:36])
        args = _llama2c_args(path, header)
        shared = raw[36] == 1
        shapes = _shapes(args)
        group_size = struct.unpack("<i", raw[37:41])[0] if version == 2 else None
        norm_keys = llama2c_norm_order(args.n_layers)
        matmul_keys = llama2c_weight_order(args.n_layers) + ([] if shared else ["output.weight"])
        shapes["output.weight"] = (args.vocab_size, args.dim)
        matmul_numel = sum(int(np.prod(shapes[k])) for k in matmul_keys)
        norm_numel = sum(int(np.prod(shapes[k])) for k in norm_keys)
        if version == 1:
            expected = 256 + 4 * (norm_numel + matmul_numel)
        else:
            if not group_size or group_size <= 0 or any(np.prod(shapes[k]) % group_size for k in matmul_keys):
                raise CheckpointError(f"{path}: bad Q8_0 group size {group_size}")
            expected = 256 + 4 * norm_numel + matmul_numel + 4 * (matmul_numel // group_size)
        _check_size(path, expected)

        def read(key):
            shape = shapes[key]
            numel = int(np.prod(shape))
            if version == 1 or key in norm_keys:
                return _read_floats(f, numel, path).view(shape)
            q = torch.from_numpy(np.frombuffer(f.read(numel), dtype=np.int8).copy()).float()
            scales = _read_floats(f, numel // group_size, path)
            return (q.view(-1, group_size) * scales[:, None]).view(shape)

        state = {key: read(key) for key in norm_keys + [k for k in matmul_keys if k != "output.weight"]}
        return _finish_bin(path, f"llama2c_bin_v{version}", args, state, shared)


# ---- Hugging Face Llama folders ------------------------------------------------------------

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
        weights = _torch_load(torch_file)  # weights_only: a hostile pickle cannot run code
        if not isinstance(weights, dict):
            raise CheckpointError(f"{torch_file}: holds a {type(weights).__name__}, expected a state dict")
        return weights
    raise CheckpointError(f"{path}: has config.json but neither model.safetensors nor pytorch_model.bin "
                          f"(sharded weights are not read)")


def _read_hf_folder(path) -> Checkpoint:
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


# ---- GGUF files (as export.py writes them) ---------------------------------------------------

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


def _read_gguf(path) -> Checkpoint:
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


# ---- writing ---------------------------------------------------------------------------------

def save_checkpoint(path: str, checkpoint: dict):
    """Atomically torch.save a checkpoint dict (model, model_args as a plain dict, config...)."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def model_args_dict(args: ModelArgs) -> dict:
    return asdict(args)


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
    """The checkpoint's tokenizer (find_tokenizer), checked against the model's vocabulary."""
    vocab = ckpt.model_args.vocab_size
    path = find_tokenizer(ckpt, override)
    if path is None:
        raise CheckpointError(f"{ckpt.path}: no tokenizer found for it (looked for "
                              f"{tokenizer_file_name(vocab)} beside it "
                              f"and in data/); pass --tokenizer=PATH to a sentencepiece .model")
    try:
        tokenizer = Tokenizer(path)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if tokenizer.vocab_size != vocab:
        raise CheckpointError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but {ckpt.path} "
                              f"has a vocabulary of {vocab}; pass the matching --tokenizer")
    return tokenizer
