"""Train a Llama 2 story model: from scratch, on from any checkpoint, or resumed exactly.

    python train.py configs/demo_instruct.py
    python train.py configs/instruct15M.py --batch_size=32 --compile=False
    torchrun --standalone --nproc_per_node=2 train.py configs/demo_pretrain.py

Settings: DEFAULTS below, then each config file named (Python `key = value` lines), then
--key=value flags; names and types are checked. finetune_lora.py runs this same loop (train()).
out_dir gets last.pt (written at every evaluation, at the end and on Ctrl-C: what
--init_from=resume continues), best.pt (lowest val loss) and ckpt.pt (= best.pt, llama2.c's
name: point generate.py at it), metrics.jsonl and loss.png.
"""
import ast
import glob
import json
import math
import mmap
import os
import shutil
import sys
import time
import types
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, atomic_write, load_checkpoint, model_args_dict, save_checkpoint
from model import ModelArgs, Transformer


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


DEFAULTS = dict(
    # I/O
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=100,
    init_from="scratch",  # scratch | resume (from out_dir/last.pt) | path of any checkpoint
    # data
    dataset="pretrain",  # pretrain: random windows of the token shards; instruct: one example a row
    data_dir="data", batch_size=128, max_seq_len=256,
    vocab_source="llama2", vocab_size=32000,  # llama2: data in tok0/, instruct0/; custom: tok{N}/
    tokenizer="",  # recorded in checkpoints for generate.py; empty: derived from data_dir
    # model (ignored when init_from names a checkpoint: its shape wins)
    dim=288, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=32, dropout=0.0,
    # AdamW
    gradient_accumulation_steps=4, learning_rate=5e-4, max_iters=100000, weight_decay=1e-1,
    beta1=0.9, beta2=0.95, grad_clip=1.0,  # grad_clip 0: off
    # learning rate: linear warmup, then cosine down to min_lr at lr_decay_iters (0: max_iters)
    decay_lr=True, warmup_iters=1000, lr_decay_iters=0, min_lr=0.0,
    # system
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if bf16_supported() else ("float16" if torch.cuda.is_available() else "float32"),
    # torch.compile: on wherever it can work (CUDA, or a C++ compiler for the CPU backend). Measured on
    # the 2-core CPU, stories15M shape: a compiled bf16 step 1.6x faster than eager, after ~40-60 s of
    # compiling (docs/benchmarks.md); short runs of tiny models should pass compile=False
    compile=torch.cuda.is_available() or shutil.which("g++") is not None or shutil.which("c++") is not None,
    seed=1337,
    peak_flops=0.0,  # for MFU; 0: the GPU's datasheet bf16 peak, or a matmul measured on the CPU
)
CHOICES = {"dataset": ("pretrain", "instruct"), "vocab_source": ("llama2", "custom"),
           "dtype": ("float32", "bfloat16", "float16")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM datasheets


class ConfigError(Exception):
    """A bad setting: reported in one line, exit code 2."""


class TrainingError(Exception):
    """The run had to stop (non-finite loss); the message names the step."""


# ---- settings ----------------------------------------------------------------------------------

def _checked(key, value, defaults, source):
    if key not in defaults:
        raise ConfigError(f"{source}: unknown setting {key!r} (valid: {', '.join(sorted(defaults))})")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"{source}: {key} expects {expected.__name__}, got {value!r} "
                          f"(valid settings: {', '.join(sorted(defaults))})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def parse_settings(argv, defaults=DEFAULTS) -> dict:
    """defaults <- config files <- --key=value flags, in the order given."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: expected --key=value")
            value = raw
            if not isinstance(defaults.get(key), str):
                try:
                    value = ast.literal_eval({"true": "True", "false": "False"}.get(raw, raw))
                except (ValueError, SyntaxError):
                    pass
            config[key] = _checked(key, value, defaults, arg)
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"{arg}: no such config file (expected a .py file of settings or --key=value)")
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), {}, namespace)
            except Exception as exc:
                raise ConfigError(f"{arg}: cannot run config file ({type(exc).__name__}: {exc})") from None
            for key, value in namespace.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    config[key] = _checked(key, value, defaults, arg)
    return config


def check_values(c):
    for key in ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval",
                "eval_iters", "log_interval", "dim", "n_layers", "n_heads", "n_kv_heads"):
        if c[key] < 1:
            raise ConfigError(f"{key}={c[key]}: expected an integer >= 1")
    if c["max_iters"] < 0 or c["warmup_iters"] < 0 or c["lr_decay_iters"] < 0:
        raise ConfigError("max_iters, warmup_iters and lr_decay_iters must be >= 0")
    if not 0.0 <= c["dropout"] < 1.0:
        raise ConfigError(f"dropout={c['dropout']}: expected a number in [0, 1)")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={c['device']}: no CUDA device here (use device=cpu)")
    if c["dtype"] == "bfloat16" and not bf16_supported():
        raise ConfigError("dtype=bfloat16: not supported on this hardware (use float32 or float16)")


def get_lr(it, c):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not c["decay_lr"]:
        return c["learning_rate"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    decay_iters = c["lr_decay_iters"] or c["max_iters"]
    if it >= decay_iters:
        return c["min_lr"]
    progress = (it - c["warmup_iters"]) / (decay_iters - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c["learning_rate"] - c["min_lr"])


def peak_flops(c, device_type) -> (float, str):
    """FLOP/s that MFU is measured against, and where that figure came from."""
    if c["peak_flops"] > 0:
        return c["peak_flops"], "stated by peak_flops"
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name} datasheet bf16 dense peak"
    return measure_matmul_flops(c["device"], DTYPES[c["dtype"]]), f"measured {c['dtype']} matmul on {c['device']}"


def measure_matmul_flops(device, dtype, n=1024, seconds=0.3) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


# ---- data ----------------------------------------------------------------------------------------

class DataError(Exception):
    """Missing or malformed data shards: one line, exit code 2."""


def _release_pages(array):
    """Unmap the pages a batch touched (the OS page cache keeps them): a memmap held open for the
    whole run would otherwise count every page it ever read as this process's resident memory."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class _Shards:
    """Rows numbered 0..len-1 across several shards; `locate` maps row numbers to (shard, index)."""

    def __init__(self, folder, sizes):
        self.folder, self.ends = folder, np.cumsum(sizes)
        self.begins = self.ends - np.asarray(sizes)

    def __len__(self):
        return int(self.ends[-1])

    def locate(self, rows):
        shard = np.searchsorted(self.ends, rows, side="right")
        return shard, rows - self.begins[shard]


class TokenWindows(_Shards):
    """Pretraining: windows of seq_len+1 tokens at random offsets of the uint16 shards, as llama2.c
    draws them. Each shard is memory-mapped once for the run, not once per batch as in nanoGPT."""

    def __init__(self, folder, files, seq_len):
        self.shards = [np.memmap(f, dtype=np.uint16, mode="r") for f in files]
        short = [f for f, s in zip(files, self.shards) if len(s) <= seq_len]
        if short:
            raise DataError(f"{short[0]}: fewer than max_seq_len+1 = {seq_len + 1} tokens")
        self.seq_len = seq_len
        super().__init__(folder, [len(s) - seq_len for s in self.shards])

    def get(self, rows, device):
        shards, starts = self.locate(rows)
        batch = np.stack([self.shards[s][i:i + self.seq_len + 1] for s, i in zip(shards, starts)])
        for s in set(shards.tolist()):
            _release_pages(self.shards[s])
        batch = torch.from_numpy(batch.astype(np.int64))
        return _to(batch[:, :-1], device), _to(batch[:, 1:], device)


class InstructRows(_Shards):
    """Instruct: one example a row (prompt, BOS, story, EOS, zero padding). Targets are -1 except
    for BOS, story and EOS: the model learns to answer a prompt, not to write prompts."""

    def __init__(self, folder, files, max_len):
        try:
            self.tokens = [np.load(f, mmap_mode="r") for f in files]
            self.lengths = [np.load(f.replace(".tokens.npy", ".lengths.npy")) for f in files]
        except (OSError, ValueError) as exc:
            raise DataError(f"{folder}: unreadable instruct shard ({exc})") from None
        if any(t.ndim != 2 or len(t) != len(n) for t, n in zip(self.tokens, self.lengths)):
            raise DataError(f"{folder}: tokens and lengths files do not match (expected (n, L) and (n, 2))")
        self.seq_len = min(self.tokens[0].shape[1] - 1, max_len)
        super().__init__(folder, [len(t) for t in self.tokens])

    def get(self, rows, device):
        shards, index = self.locate(rows)
        batch = np.stack([self.tokens[s][i, :self.seq_len + 1] for s, i in zip(shards, index)]).astype(np.int64)
        lengths = np.stack([self.lengths[s][i] for s, i in zip(shards, index)])
        for s in set(shards.tolist()):
            _release_pages(self.tokens[s])
        # positions past the batch's longest example are padding for every row: leave them out
        # (causal attention means the positions kept compute exactly the same loss)
        width = max(1, min(self.seq_len, int(lengths[:, 1].max()) - 1))
        x, y = batch[:, :width], batch[:, 1:width + 1].copy()
        position = np.arange(1, width + 1)  # where each target sits in the row
        y[(position < lengths[:, :1]) | (position >= lengths[:, 1:])] = -1
        return _to(torch.from_numpy(x), device), _to(torch.from_numpy(y), device)


def _to(tensor, device):
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, dst)


def data_folder(c):
    kind = "tok" if c["dataset"] == "pretrain" else "instruct"
    return os.path.join(c["data_dir"], f"{kind}{0 if c['vocab_source'] == 'llama2' else c['vocab_size']}")


def open_dataset(c, split, model_max_len):
    folder = data_folder(c)
    pattern = "data*.bin" if c["dataset"] == "pretrain" else "data*.tokens.npy"
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    files = files[:1] if split == "val" else files[1:]
    if not files:
        raise DataError(f"{folder}: no {split} shards {pattern} (data00 is validation, data01... training); "
                        f"prepare the {c['dataset']} data for vocab_size={c['vocab_size']} first")
    if c["dataset"] == "pretrain":
        return TokenWindows(folder, files, min(c["max_seq_len"], model_max_len))
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise DataError(f"{folder}: no meta.json, so prepare_instruct_data.py did not finish there; run it again")
    rows = InstructRows(folder, files, min(c["max_seq_len"], model_max_len))
    if rows.seq_len < rows.tokens[0].shape[1] - 1 and split == "train":
        print(f"note: instruct rows hold {rows.tokens[0].shape[1] - 1} positions; cropped to {rows.seq_len} "
              f"(max_seq_len {c['max_seq_len']}, model {model_max_len}): long stories lose their end")
    return rows


def default_tokenizer(c):
    meta = os.path.join(data_folder(c), "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f).get("tokenizer", "")
    return "" if c["vocab_source"] == "llama2" else os.path.join(c["data_dir"], f"tok{c['vocab_size']}.model")


class BatchSampler:
    """Every iteration's rows come from one generator, seeded alike in every process; each process
    takes its own slice. So the global batch is the same for 1 or N processes, and the generator's
    state is the loader's whole position (saved in checkpoints for exact resume)."""

    def __init__(self, data, batch_size, accum_steps, world, rank, seed):
        self.data, self.shape, self.rank = data, (world, accum_steps, batch_size), rank
        self.generator = torch.Generator().manual_seed(seed)

    def iteration(self, device):
        rows = torch.randint(len(self.data), self.shape, generator=self.generator)
        for micro in range(self.shape[1]):
            yield self.data.get(rows[self.rank, micro].numpy(), device)

    def get_state(self):
        return self.generator.get_state()

    def set_state(self, state):
        self.generator.set_state(state)


def fixed_batches(data, n_batches, batch_size, seed):
    """The rows evaluation uses every time, so successive losses are comparable."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(len(data), (batch_size,), generator=generator).numpy() for _ in range(n_batches)]


# ---- the model: what is trained and what a checkpoint holds -----------------------------------

class FullTraining:
    """Every weight trains. finetune_lora.LoRATraining overrides these hooks to train adapters."""
    name = "train"

    def build(self, c, resume):
        """The model with its starting weights: resumed, from scratch or from init_from."""
        if resume is not None:
            args, state = resume.model_args, resume.state_dict
        elif c["init_from"] == "scratch":
            args, state = ModelArgs(**{k: c[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                          "vocab_size", "multiple_of", "max_seq_len")}), None
        else:
            ckpt = load_checkpoint(c["init_from"])
            args, state = ckpt.model_args, ckpt.state_dict
        args.dropout = c["dropout"]
        model = Transformer(args)
        if state is not None:
            model.load_state_dict(state)
        return model

    def weights(self, model) -> dict:
        """The checkpoint keys that hold the weights (`model` is always a plain state dict)."""
        return {"model": model.state_dict()}

    def after_save(self, model, c, path, is_best):
        pass


# ---- the loop ----------------------------------------------------------------------------------

def train(config, method=None) -> dict:
    """Run one training job; returns {"iter_num", "best_val_loss", "last_loss"}."""
    method, c = method or FullTraining(), dict(config)
    check_values(c)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        dist.init_process_group("nccl" if c["device"].startswith("cuda") else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
        if c["device"].startswith("cuda"):
            c["device"] = f"cuda:{local_rank}"
            torch.cuda.set_device(c["device"])
        else:  # share the cores out: oversubscribed gloo processes crawl
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    master = rank == 0
    if c["gradient_accumulation_steps"] % world:
        raise ConfigError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be "
                          f"divisible by the {world} processes (llama2.c splits it between them)")
    accum = c["gradient_accumulation_steps"] // world
    device_type = "cuda" if c["device"].startswith("cuda") else "cpu"
    autocast = nullcontext() if c["dtype"] == "float32" else torch.autocast(device_type, dtype=DTYPES[c["dtype"]])
    out_dir = c["out_dir"]
    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")

    resume = None
    if c["init_from"] == "resume":
        if not os.path.isfile(last_path):
            raise ConfigError(f"init_from=resume: {last_path} does not exist (train first, or fix out_dir)")
        resume = load_checkpoint(last_path)
    torch.manual_seed(c["seed"])  # the same initial weights in every process
    model = method.build(c, resume)
    args = model.args
    if args.vocab_size != c["vocab_size"]:  # a checkpoint's vocabulary decides which data fits it
        c["vocab_source"] = "llama2" if args.vocab_size == 32000 else "custom"
    c.update({k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")})
    train_data = open_dataset(c, "train", args.max_seq_len)
    val_data = open_dataset(c, "val", args.max_seq_len)
    c["max_seq_len"], c["tokenizer"] = train_data.seq_len, c["tokenizer"] or default_tokenizer(c)
    model.to(c["device"])

    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=c["dtype"] == "float16")
    sampler = BatchSampler(train_data, c["batch_size"], accum, world, rank, c["seed"])
    eval_sets = {"train": (train_data, fixed_batches(train_data, c["eval_iters"], c["batch_size"], c["seed"] + 1)),
                 "val": (val_data, fixed_batches(val_data, c["eval_iters"], c["batch_size"], c["seed"] + 2))}
    iter_num, best_val_loss = 0, float("inf")
    torch.manual_seed(c["seed"] + rank)  # dropout differs between processes
    if resume is not None:
        optimizer.load_state_dict(resume.extra["optimizer"])
        scaler.load_state_dict(resume.extra["scaler"])
        sampler.set_state(resume.extra["loader_state"])
        torch.set_rng_state(resume.extra["rng_state"])
        iter_num, best_val_loss = resume.extra["iter_num"], resume.extra["best_val_loss"]
    start_iter = iter_num

    train_model = torch.compile(model) if c["compile"] else model
    if ddp:
        train_model = DDP(train_model, device_ids=[local_rank] if device_type == "cuda" else None)
    tokens_per_iter = c["batch_size"] * c["gradient_accumulation_steps"] * train_data.seq_len
    peak, peak_source = peak_flops(c, device_type)
    params = [p for p in model.parameters() if p.requires_grad]
    if master:
        os.makedirs(out_dir, exist_ok=True)
        metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a" if resume else "w")
        n_train = sum(p.numel() for p in params)
        print(f"{method.name}: {sum(p.numel() for p in model.parameters()):,} parameters ({n_train:,} trained), "
              f"{c['dataset']} data from {train_data.folder}, up to {tokens_per_iter:,} tokens/iter, {world} process(es), "
              f"{c['device']} {c['dtype']}{' compiled' if c['compile'] else ''}; MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")

    def log(row):
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = {}
        for split, (data, batches) in eval_sets.items():
            total = torch.zeros(2)
            for i, rows in enumerate(batches):
                if i % world == rank:
                    x, y = data.get(rows, c["device"])
                    with autocast:
                        total += torch.tensor([model(x, y)[1].item(), 1.0])
            if ddp:
                dist.all_reduce(total)
            losses[split] = (total[0] / total[1]).item()
        model.train()
        return losses

    def save(path, at_iter, loader_state, rng_state):
        ckpt = {"kind": "project", **method.weights(model), "model_args": model_args_dict(args), "config": c,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": at_iter,
                "best_val_loss": best_val_loss, "loader_state": loader_state, "rng_state": rng_state}
        save_checkpoint(path, ckpt)

    from tqdm import tqdm
    bar = tqdm(total=c["max_iters"], initial=iter_num, disable=not master, dynamic_ncols=True, leave=False)
    last_loss, t_start = float("nan"), time.time()
    try:
        while True:
            # where this iteration starts: what an interruption saves, so resume repeats it exactly
            loader_state, rng_state = sampler.get_state(), torch.get_rng_state()
            if (iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]) and not (resume and iter_num == start_iter):
                t0 = time.time()
                losses = evaluate()
                if not all(map(math.isfinite, losses.values())):
                    raise TrainingError(f"evaluation loss is {losses['val']} at iter {iter_num}: stopped; the last "
                                        f"good checkpoint is {last_path if os.path.exists(last_path) else '(none yet)'}")
                eval_tokens = 2 * c["eval_iters"] * c["batch_size"] * train_data.seq_len
                log({"iter": iter_num, "loss": losses["val"], "lr": get_lr(iter_num, c), "eval": True,
                     "tokens_per_s": eval_tokens / (time.time() - t0), "train_loss": losses["train"], "val_loss": losses["val"]})
                if master:
                    bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    is_best = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                    save(last_path, iter_num, loader_state, rng_state)
                    method.after_save(model, c, last_path, False)
                    if is_best:  # best.pt and ckpt.pt: two names for one file (a copy where links fail)
                        atomic_write(best_path, lambda tmp: link_or_copy(last_path, tmp))
                        atomic_write(os.path.join(out_dir, "ckpt.pt"), lambda tmp: link_or_copy(last_path, tmp))
                        method.after_save(model, c, best_path, True)
            if iter_num >= c["max_iters"]:
                break
            t0, lr = time.time(), get_lr(iter_num, c)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, iter_tokens = torch.zeros((), device=c["device"]), 0
            for micro, (x, y) in enumerate(sampler.iteration(c["device"])):
                iter_tokens += x.numel()  # instruct batches are cut to their longest row
                # DDP averages gradients once, on the last micro-step
                with train_model.no_sync() if ddp and micro < accum - 1 else nullcontext():
                    with autocast:
                        _, loss = train_model(x, y)
                    loss_sum += loss.detach().float()
                    scaler.scale(loss / accum).backward()
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            last_loss = loss_sum.item() / accum
            if not math.isfinite(last_loss):
                raise TrainingError(f"loss is {last_loss} at iter {iter_num}: stopped before applying that "
                                    f"step; the last good checkpoint is {last_path if os.path.exists(last_path) else '(none yet)'}")
            if c["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, c["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            bar.update(1)
            if iter_num % c["log_interval"] == 0 or iter_num == c["max_iters"]:
                dt = time.time() - t0
                tokens_per_s = iter_tokens * world / dt
                mfu = model.estimate_mfu(tokens_per_s / world, peak)
                log({"iter": iter_num, "loss": last_loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu, "time_ms": dt * 1000})
                bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s MFU {mfu:.1%}")
    except KeyboardInterrupt:
        if master:
            save(last_path, iter_num, loader_state, rng_state)
            bar.write(f"interrupted at iter {iter_num}: saved {last_path} (continue with --init_from=resume)")
        raise
    finally:
        bar.close()
        if master:
            metrics.close()
        if ddp:
            dist.destroy_process_group()
    if master:
        plot_losses(out_dir)
        print(f"done: {iter_num - start_iter} iters in {time.time() - t_start:.1f}s, last train loss {last_loss:.4f}, "
              f"best val loss {best_val_loss:.4f}; {out_dir}/ckpt.pt (= best.pt) for generate.py, last.pt to resume")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "last_loss": last_loss}


def plot_losses(out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (per step)")
    for key in ("train_loss", "val_loss"):
        ax.plot([r["iter"] for r in evals], [r[key] for r in evals], "o-", label=f"{key} (fixed batches)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic_write(os.path.join(out_dir, "loss.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None, defaults=DEFAULTS, method=None):
    try:
        train(parse_settings(sys.argv[1:] if argv is None else argv, defaults), method)
        return 0
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
