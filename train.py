"""Train a Llama 2 story model: from scratch, on from any checkpoint, or resumed exactly.

    python train.py configs/demo_instruct.py
    python train.py configs/instruct15M.py --batch_size=32 --compile=False
    torchrun --standalone --nproc_per_node=2 train.py configs/demo_pretrain.py

Settings: DEFAULTS below, then each config file named (Python `key = value` lines), then
--key=value flags; names and types are checked. finetune_lora.py runs this same loop (train()
with its own recipe). The data comes through dataset.py. out_dir gets last.pt (written at every
evaluation, at the end and on Ctrl-C: what --init_from=resume continues), best.pt (lowest val
loss) and ckpt.pt (= best.pt, llama2.c's name: point generate.py at it), metrics.jsonl and
loss.png.
"""
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
from checkpoint import load_checkpoint, model_args_dict, save_checkpoint
from cli import (DTYPE_NAMES, ToolError, UsageError, atomic_write, bf16_supported, default_device, lock_folder,
                 remove_stale_temp_files, report_error, torch_dtype)
from data_paths import vocab_source
from dataset import BatchSampler, default_tokenizer, fixed_batches, open_dataset
from metrics import MetricsLog, plot_losses
from model import ModelArgs, Transformer

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
    device=default_device(),
    dtype="bfloat16" if bf16_supported() else ("float16" if torch.cuda.is_available() else "float32"),
    # torch.compile: on wherever it can work (CUDA, or a C++ compiler for the CPU backend). Measured on
    # the 2-core CPU, stories15M shape: a compiled bf16 step 1.6x faster than eager, after ~40-60 s of
    # compiling (docs/benchmarks.md); short runs of tiny models should pass compile=False
    compile=torch.cuda.is_available() or shutil.which("g++") is not None or shutil.which("c++") is not None,
    seed=1337,
    deterministic=False,  # torch.use_deterministic_algorithms: bitwise-repeatable CUDA runs (slower; needs
                          # CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment); bench/gpu_check.sh uses it
    peak_flops=0.0,  # for MFU; 0: the GPU's datasheet bf16 peak, or a matmul measured on the CPU
)
CHOICES = {"dataset": ("pretrain", "instruct"), "vocab_source": ("llama2", "custom"), "dtype": DTYPE_NAMES}
# Datasheet dense bf16 peaks by the exact name torch.cuda.get_device_name() reports: variants of one
# chip differ (an H100 PCIe has 756, not the SXM's 989 TFLOP/s), so a name not listed here is
# measured instead of guessed from a substring.
GPU_PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
}


class TrainingError(ToolError):
    """The run had to stop (non-finite loss); the message names the step. Exit code 1."""


# ---- settings ----------------------------------------------------------------------------------

def parse_settings(argv, defaults=DEFAULTS) -> dict:
    """defaults <- config files <- --key=value flags, in the order given, each name and type checked."""
    return configurator.parse_settings(argv, defaults, CHOICES)


def check_values(cfg):
    for key in ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_interval",
                "eval_iters", "log_interval", "dim", "n_layers", "n_heads", "n_kv_heads"):
        if cfg[key] < 1:
            raise UsageError(f"{key}={cfg[key]}: expected an integer >= 1")
    if cfg["max_iters"] < 0 or cfg["warmup_iters"] < 0 or cfg["lr_decay_iters"] < 0:
        raise UsageError("max_iters, warmup_iters and lr_decay_iters must be >= 0")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise UsageError(f"dropout={cfg['dropout']}: expected a number in [0, 1)")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={cfg['device']}: no CUDA device here (use device=cpu)")
    if cfg["dtype"] == "bfloat16" and not bf16_supported():
        raise UsageError("dtype=bfloat16: not supported on this hardware (use float32 or float16)")


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it >= decay_iters:
        return cfg["min_lr"]
    progress = (it - cfg["warmup_iters"]) / (decay_iters - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def peak_flops(cfg, device_type) -> (float, str):
    """FLOP/s that MFU is measured against, and where that figure came from."""
    if cfg["peak_flops"] > 0:
        return cfg["peak_flops"], "stated by peak_flops"
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        if name in GPU_PEAK_BF16:
            return GPU_PEAK_BF16[name], f"{name} datasheet bf16 dense peak"
    return measure_matmul_flops(cfg["device"], torch_dtype(cfg["dtype"])), f"measured {cfg['dtype']} matmul on {cfg['device']}"


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


# ---- what is trained, and what a checkpoint holds ----------------------------------------------

class FullTraining:
    """The recipe train.py runs: every weight trains. finetune_lora.LoRATraining overrides these
    hooks to train adapters on a frozen base."""
    name = "train"

    def build(self, cfg, resume):
        """The model with its starting weights: resumed, from scratch or from init_from."""
        if resume is not None:
            args, state = resume.model_args, resume.state_dict
        elif cfg["init_from"] == "scratch":
            args, state = ModelArgs(**{k: cfg[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                            "vocab_size", "multiple_of", "max_seq_len")}), None
        else:
            ckpt = load_checkpoint(cfg["init_from"])
            args, state = ckpt.model_args, ckpt.state_dict
        args.dropout = cfg["dropout"]
        model = Transformer(args)
        if state is not None:
            model.load_state_dict(state)
        return model

    def checkpoint_weights(self, model) -> dict:
        """The checkpoint keys that hold the weights (`model` is always a plain state dict)."""
        return {"model": model.state_dict()}

    def after_save(self, model, cfg, path, is_best):
        pass


# ---- processes, data, resume and checkpoints ---------------------------------------------------

@dataclass
class Processes:
    """This process's place in a torchrun job (a plain run is rank 0 of 1)."""
    ddp: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0


def start_processes(cfg) -> Processes:
    """Join the torchrun job, if there is one (RANK is set), and take this process's device."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Processes()
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    procs = Processes(True, dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(cfg["device"])
    else:  # share the cores out: oversubscribed gloo processes crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", procs.world))))
    return procs


def open_training_data(cfg, args: ModelArgs):
    """(train, val) data for the model; the model's shape and vocabulary go into cfg, so the
    checkpoints record what was really trained."""
    if args.vocab_size != cfg["vocab_size"]:  # a checkpoint's vocabulary decides which data fits it
        cfg["vocab_source"] = vocab_source(args.vocab_size)
    cfg.update({k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")})
    train_data = open_dataset(cfg, "train", args.max_seq_len)
    val_data = open_dataset(cfg, "val", args.max_seq_len)
    cfg["max_seq_len"], cfg["tokenizer"] = train_data.seq_len, cfg["tokenizer"] or default_tokenizer(cfg)
    return train_data, val_data


def load_resume_point(last_path):
    if not os.path.isfile(last_path):
        raise UsageError(f"init_from=resume: {last_path} does not exist (train first, or fix out_dir)")
    return load_checkpoint(last_path)


def restore_state(resume, optimizer, scaler, sampler):
    """Optimizer, loss scaler and data position as they were when last.pt was written; returns
    (iter_num, best_val_loss). No RNG state: seed_iteration derives it from the iteration."""
    optimizer.load_state_dict(resume.extra["optimizer"])
    scaler.load_state_dict(resume.extra["scaler"])
    sampler.set_state(resume.extra["loader_state"])
    return resume.extra["iter_num"], resume.extra["best_val_loss"]


def seed_iteration(seed, rank, iter_num):
    """Seed every generator (CPU and each CUDA device) from (seed, rank, iter_num) alone, so an
    iteration's dropout is the same in a resumed run as in an uninterrupted one, on any device and
    in every process: nothing has to be saved, so nothing can be restored to the wrong process."""
    torch.manual_seed((seed * 1_000_003 + rank) * 1_000_033 + iter_num)


class StopRequests:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only asks the loop to stop: it does so at
    the next safe point, before an iteration's step is applied, so last.pt never pairs updated
    weights with the iteration counter of the step before. A second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.request)
        return self

    def request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def estimate_losses(model, eval_sets, cfg, procs, autocast) -> (dict, int):
    """Mean loss on the fixed evaluation batches of each split, shared out between processes, and
    the tokens scored. The sums live on the training device: NCCL reduces nothing else."""
    model.eval()
    losses, tokens = {}, 0
    for split, (data, batches) in eval_sets.items():
        total = torch.zeros(3, device=cfg["device"])  # loss sum, batches, tokens
        for i, rows in enumerate(batches):
            if i % procs.world == procs.rank:
                x, y = data.get(rows, cfg["device"])
                with autocast:
                    loss = model(x, y)[1]
                total += torch.stack([loss.detach().float(), total.new_tensor(1.0), total.new_tensor(x.numel())])
        if procs.ddp:
            dist.all_reduce(total)
        loss_sum, count, split_tokens = total.tolist()
        losses[split], tokens = loss_sum / count, tokens + int(split_tokens)
    model.train()
    return losses, tokens


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, dst)


def write_checkpoints(out_dir, state, is_best, after_best):
    """last.pt and, for a new best, best.pt and ckpt.pt (more names for the same file) and the
    recipe's extras (after_best). The best files are written before last.pt is renamed into place:
    a run killed in between resumes from the older last.pt, repeats that evaluation and saves
    again, so last.pt's best_val_loss is always one that best.pt really holds. A full disk or an
    I/O error stops the run in one line with the previous last.pt intact and no temporary file."""
    last_path = os.path.join(out_dir, "last.pt")

    def write(tmp):
        torch.save(state, tmp)
        if is_best:
            for name in ("best.pt", "ckpt.pt"):
                atomic_write(os.path.join(out_dir, name), lambda tmp_name: link_or_copy(tmp, tmp_name))
            after_best()
    try:
        atomic_write(last_path, write)
    except OSError as exc:
        raise TrainingError(f"{last_path}: could not save it ({exc.strerror or exc}); the previous "
                            f"checkpoint there is kept") from None


TRAINING_OUTPUTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt", "metrics.jsonl", "loss.png")


# ---- the loop ----------------------------------------------------------------------------------

def train(config, recipe=None) -> dict:
    """Run one training job; returns {"iter_num", "best_val_loss", "last_loss"}. recipe says what
    trains and what checkpoints hold (FullTraining by default). The master process holds
    out_dir/.lock for the whole run: a second run on the same out_dir is refused."""
    cfg = dict(config)
    check_values(cfg)
    procs = start_processes(cfg)
    try:
        lock = lock_folder(cfg["out_dir"], "training run") if procs.master else None
        try:
            if procs.master:  # what a killed run was writing: only runs holding the lock write here
                remove_stale_temp_files(cfg["out_dir"], TRAINING_OUTPUTS)
            return run_training(cfg, recipe or FullTraining(), procs)
        finally:
            if lock is not None:
                lock.close()
    finally:
        if procs.ddp:
            dist.destroy_process_group()


def run_training(cfg, recipe, procs) -> dict:
    if cfg["gradient_accumulation_steps"] % procs.world:
        raise UsageError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be "
                         f"divisible by the {procs.world} processes (llama2.c splits it between them)")
    accum = cfg["gradient_accumulation_steps"] // procs.world
    device_type = "cuda" if cfg["device"].startswith("cuda") else "cpu"
    autocast = nullcontext() if cfg["dtype"] == "float32" else torch.autocast(device_type, dtype=torch_dtype(cfg["dtype"]))
    out_dir, last_path = cfg["out_dir"], os.path.join(cfg["out_dir"], "last.pt")

    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    resume = load_resume_point(last_path) if cfg["init_from"] == "resume" else None
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process
    model = recipe.build(cfg, resume)
    train_data, val_data = open_training_data(cfg, model.args)
    model.to(cfg["device"])
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg["dtype"] == "float16")
    sampler = BatchSampler(train_data, cfg["batch_size"], accum, procs.world, procs.rank, cfg["seed"])
    eval_sets = {"train": (train_data, fixed_batches(train_data, cfg["eval_iters"], cfg["batch_size"], cfg["seed"] + 1)),
                 "val": (val_data, fixed_batches(val_data, cfg["eval_iters"], cfg["batch_size"], cfg["seed"] + 2))}
    iter_num, best_val_loss = restore_state(resume, optimizer, scaler, sampler) if resume else (0, float("inf"))
    start_iter = iter_num

    train_model = torch.compile(model) if cfg["compile"] else model
    if procs.ddp:
        train_model = DDP(train_model, device_ids=[procs.local_rank] if device_type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    peak, peak_source = peak_flops(cfg, device_type)
    if procs.master:
        print(f"{recipe.name}: {sum(p.numel() for p in model.parameters()):,} parameters "
              f"({sum(p.numel() for p in params):,} trained), {cfg['dataset']} data from {train_data.folder}, up to "
              f"{cfg['batch_size'] * cfg['gradient_accumulation_steps'] * train_data.seq_len:,} tokens/iter, "
              f"{procs.world} process(es), {cfg['device']} {cfg['dtype']}{' compiled' if cfg['compile'] else ''}; "
              f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    metrics = MetricsLog(out_dir, resume_from=iter_num if resume else None, enabled=procs.master)

    def save_last(at_iter, loader_state, is_best=False):
        state = {"kind": "project", **recipe.checkpoint_weights(model), "model_args": model_args_dict(model.args),
                 "config": cfg, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "iter_num": at_iter, "best_val_loss": best_val_loss, "loader_state": loader_state}
        write_checkpoints(out_dir, state, is_best,
                          lambda: recipe.after_save(model, cfg, os.path.join(out_dir, "best.pt"), True))

    def last_good():
        return last_path if os.path.exists(last_path) else "(none yet)"

    from tqdm import tqdm
    bar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not procs.master, dynamic_ncols=True, leave=False)
    last_loss, t_start = float("nan"), time.time()
    stop = StopRequests()
    try:
        with stop:
            while True:
                # where this iteration starts: what a stop saves, so resume repeats it exactly
                loader_state = sampler.get_state()
                due = iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]
                if due and not (resume and iter_num == start_iter):
                    t0 = time.time()
                    losses, eval_tokens = estimate_losses(model, eval_sets, cfg, procs, autocast)
                    if not all(map(math.isfinite, losses.values())):
                        raise TrainingError(f"evaluation loss is {losses['val']} at iter {iter_num}: stopped; "
                                            f"the last good checkpoint is {last_good()}")
                    metrics.write({"iter": iter_num, "loss": losses["val"], "lr": get_lr(iter_num, cfg), "eval": True,
                                   "tokens_per_s": eval_tokens / (time.time() - t0),
                                   "train_loss": losses["train"], "val_loss": losses["val"]})
                    if procs.master:
                        bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                        is_best = losses["val"] < best_val_loss
                        best_val_loss = min(best_val_loss, losses["val"])
                        save_last(iter_num, loader_state, is_best)
                if iter_num >= cfg["max_iters"]:
                    break
                t0, lr = time.time(), get_lr(iter_num, cfg)
                seed_iteration(cfg["seed"], procs.rank, iter_num)
                last_loss, shapes, stop_now = train_step(train_model, sampler, optimizer, params, lr, cfg,
                                                         accum, procs, autocast, scaler, stop.requested)
                if stop_now:  # this iteration's gradients are dropped: nothing of it was applied
                    if procs.master:
                        save_last(iter_num, loader_state)
                        bar.write(f"stopped at iter {iter_num}: saved {last_path} (continue with --init_from=resume)")
                    raise KeyboardInterrupt
                if not math.isfinite(last_loss):
                    raise TrainingError(f"loss is {last_loss} at iter {iter_num}: stopped before applying that "
                                        f"step; the last good checkpoint is {last_good()}")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iter_num += 1
                bar.update(1)
                if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
                    dt = time.time() - t0
                    tokens_per_s = sum(rows * width for rows, width in shapes) * procs.world / dt
                    mfu = iteration_flops(model, shapes) / dt / peak
                    metrics.write({"iter": iter_num, "loss": last_loss, "lr": lr, "tokens_per_s": tokens_per_s,
                                   "mfu": mfu, "time_ms": dt * 1000})
                    bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s MFU {mfu:.1%}")
    except KeyboardInterrupt:
        if procs.master and not stop.requested:  # a second Ctrl-C: whatever was half done is not saved
            bar.write(f"interrupted at once at iter {iter_num}: {last_good()} holds the last saved state")
        raise
    finally:
        bar.close()
        metrics.close()
    if procs.master:
        plot_losses(out_dir)
        print(f"done: {iter_num - start_iter} iters in {time.time() - t_start:.1f}s, last train loss {last_loss:.4f}, "
              f"best val loss {best_val_loss:.4f}; {out_dir}/ckpt.pt (= best.pt) for generate.py, last.pt to resume")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "last_loss": last_loss}


def train_step(train_model, sampler, optimizer, params, lr, cfg, accum, procs, autocast, scaler, stop_requested):
    """One iteration's forward and backward passes over its micro-batches, gradients clipped;
    returns (mean loss, [(rows, width)] of each micro-batch, whether any process asked to stop).
    The caller applies the step once the loss is finite and no stop was asked for."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, shapes = torch.zeros((), device=cfg["device"]), []
    for micro, (x, y) in enumerate(sampler.iteration(cfg["device"])):
        shapes.append(tuple(x.shape))  # instruct batches are cut to their longest row
        # DDP averages gradients once, on the last micro-step
        with train_model.no_sync() if procs.ddp and micro < accum - 1 else nullcontext():
            with autocast:
                _, loss = train_model(x, y)
            loss_sum += loss.detach().float()
            scaler.scale(loss / accum).backward()
    shared = torch.stack([loss_sum, loss_sum.new_tensor(float(stop_requested))])
    if procs.ddp:  # a SUM (ReduceOp.AVG is missing from gloo in older PyTorch), on the training device
        dist.all_reduce(shared)
    loss_total, stop_votes = shared.tolist()
    loss = loss_total / accum / procs.world
    if math.isfinite(loss) and cfg["grad_clip"] > 0 and not stop_votes:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
    return loss, shapes, stop_votes > 0


def iteration_flops(model, shapes) -> float:
    """Training FLOPs of one process's iteration, each micro-batch at the width it really had."""
    return sum(rows * width * model.flops_per_token(width) for rows, width in shapes)


def main(argv=None, defaults=DEFAULTS, recipe=None):
    try:
        train(parse_settings(sys.argv[1:] if argv is None else argv, defaults), recipe)
        return 0
    except ToolError as exc:  # bad settings, data or checkpoints: 2; a run that had to stop: 1
        return report_error(exc)
    except ValueError as exc:  # a model shape that does not divide (ModelArgs), bad LoRA settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file that could not be read or written: the message names it
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
