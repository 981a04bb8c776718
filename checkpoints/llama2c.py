"""llama2.c's binary model files, read and written: version 0 (legacy float32, the one run.c
reads: 7-int header, weights, RoPE tables), version 1 (magic "ak42", 256-byte header, float32)
and version 2 (Q8_0, read by runq.c: norms float32, each matmul weight as int8 plus one float32
scale per group). The header has no room for the prompt format: it lives in a JSON sidecar
beside the .bin. The tokenizer goes beside the model in llama2.c's tokenizer.bin format."""
import json
import os
import struct

import numpy as np
import torch

from checkpoints.common import Checkpoint, CheckpointError, layer_keys, weight_shapes
from cli import UsageError
from data_paths import vocab_source
from model import ModelArgs
from prompts import PROMPT_FORMAT_KEY, read_prompt_format

LLAMA2C_MAGIC = 0x616B3432  # "ak42"


# The order llama2.c's files hold the weights in, shared by the readers and the writers.

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


# ---- reading ---------------------------------------------------------------------------------

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


def read_llama2c_bin_v0(path) -> Checkpoint:
    with open(path, "rb") as f:
        raw = f.read(28)
        if len(raw) < 28:
            raise CheckpointError(f"{path}: not a checkpoint (too short for any known format)")
        header = struct.unpack("<7i", raw)
        args = _llama2c_args(path, header)
        shared = header[5] > 0
        shapes = weight_shapes(args)
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


def read_llama2c_bin_versioned(path) -> Checkpoint:
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
        shapes = weight_shapes(args)
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


# ---- writing ---------------------------------------------------------------------------------

def float32_bytes(tensor) -> bytes:
    return tensor.detach().float().contiguous().numpy().astype("<f4").tobytes()


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
