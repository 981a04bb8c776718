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
from checkpoints import load_checkpoint, model_args_dict, save_checkpoint
from cli import (DTYPE_NAMES, ToolError, UsageError, atomic_write, bf16_supported, check_device, check_output,
                 default_device, lock_folder, remove_stale_temp_files, report_error, run_main, torch_dtype)
from data_paths import vocab_source
from dataset import BatchSampler, data_prompt_format, default_tokenizer, fixed_batches, open_dataset
from metrics import MetricsLog, peak_flops, plot_losses
from model import ModelArgs, Transformer
from prompts import RequestFinder
from tokenizer import Tokenizer

DEFAULTS = dict(
    # I/O
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=100,
    init_from="scratch",  # scratch | resume (from out_dir/last.pt) | path of any checkpoint
    force=False,  # start a new run in an out_dir that holds one: its checkpoints are replaced (nothing else)
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
    # instruct data: the story tokens that carry out the prompt's requests (a requested word's
    # tokens; quotation marks when it asks for a dialogue) weigh this many times the others in
    # the training loss (not in the reported losses)
    request_weight=1.0,
    # instruct data: each batch's rows of similar length, so less of it is padding (every example
    # stays equally likely)
    group_by_length=False,
    # system
    device=default_device(),
    dtype="bfloat16" if bf16_supported() else ("float16" if torch.cuda.is_available() else "float32"),
    # torch.compile: on wherever it can work (CUDA, or a C++ compiler for the CPU backend). Measured on
    # the 2-core CPU, stories15M shape: a compiled bf16 step 1.21x faster than bf16 eager (1.83x float32
    # eager), after ~40-60 s of compiling (docs/benchmarks.md); short runs of tiny models should pass compile=False
    compile=torch.cuda.is_available() or shutil.which("g++") is not None or shutil.which("c++") is not None,
    seed=1337,
    peak_flops=0.0,  # for MFU; 0: the GPU's datasheet bf16 peak, or a matmul measured on the CPU
    deterministic=False,  # torch.use_deterministic_algorithms: bitwise-repeatable GPU runs (slower; CUDA
                          # needs CUBLAS_WORKSPACE_CONFIG=:4096:8); bench/gpu_check.sh uses it
)
# what a run writes in out_dir (lock_out_dir removes their temporaries that a killed run left)
TRAINING_OUTPUTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt", "metrics.jsonl", "loss.png")
RUN_CHECKPOINTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt")  # an out_dir holding one holds a run
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "vocab_size")
CHOICES = {"dataset": ("pretrain", "instruct"), "vocab_source": ("llama2", "custom"), "dtype": DTYPE_NAMES}


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
    check_device(cfg["device"])
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

    def lr_scale(self, name, cfg) -> float:
        """How many times the schedule's learning rate the parameter `name` trains at."""
        return 1.0


# ---- processes, data, resume and checkpoints ---------------------------------------------------

@dataclass
class Processes:
    """This process's place in a torchrun job (a plain run is rank 0 of 1)."""
    ddp: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def start_processes(cfg) -> Processes:
    """Join the torchrun job, if there is one (RANK is set), and take this process's device."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Processes(device=training_device(cfg["device"]))
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    procs = Processes(True, dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(cfg["device"])
    else:  # share the cores out: oversubscribed gloo processes crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", procs.world))))
    procs.device = training_device(cfg["device"])
    return procs


def training_device(name) -> torch.device:
    """The device with its index, as the tensors made on it report it ("cuda" -> "cuda:0")."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def open_training_data(cfg, args: ModelArgs):
    """(train, val) data for the model; the model's shape and vocabulary go into cfg, so the
    checkpoints record what was really trained."""
    if cfg["init_from"] != "scratch":  # a checkpoint's vocabulary decides which data fits it
        cfg["vocab_source"] = vocab_source(args.vocab_size)
    cfg.update({k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")})
    train_data = open_dataset(cfg, "train", args.max_seq_len)
    val_data = open_dataset(cfg, "val", args.max_seq_len)
    cfg["max_seq_len"], cfg["tokenizer"] = train_data.seq_len, cfg["tokenizer"] or default_tokenizer(cfg)
    if cfg["request_weight"] != 1.0:
        if cfg["dataset"] != "instruct":
            raise UsageError(f"request_weight={cfg['request_weight']}: weighs what a prompt requests, so it needs "
                             f"dataset=instruct")
        train_data.emphasize_requests(cfg["request_weight"], RequestFinder(Tokenizer(cfg["tokenizer"])))
    if cfg["group_by_length"] and cfg["dataset"] != "instruct":
        raise UsageError("group_by_length=True: pretraining windows all have max_seq_len tokens; it needs dataset=instruct")
    cfg["prompt_format"] = data_prompt_format(cfg)
    return train_data, val_data


def load_resume_point(last_path):
    if not os.path.isfile(last_path):
        raise UsageError(f"init_from=resume: {last_path} does not exist (train first, or fix out_dir)")
    return load_checkpoint(last_path)


def restore_state(resume, optimizer, scaler, sampler):
    """Optimizer, loss scaler and data position as they were when last.pt was written; returns
    (iter_num, best_val_loss). The random numbers need no saving: see seed_iteration."""
    optimizer.load_state_dict(resume.extra["optimizer"])
    scaler.load_state_dict(resume.extra["scaler"])
    sampler.set_state(resume.extra["loader_state"])
    return resume.extra["iter_num"], resume.extra["best_val_loss"]


def seed_iteration(cfg, procs, iter_num):
    """Seed every generator (CPU and GPU) from (seed, rank, iteration) before each step: dropout
    then draws the same numbers in a resumed run as in an uninterrupted one, on every rank and
    device, with no generator state to save, and differs between ranks."""
    torch.manual_seed((cfg["seed"] * 1_000_003 + iter_num) * 1_009 + procs.rank)


def all_reduce(tensor, procs, op=dist.ReduceOp.SUM):
    """dist.all_reduce for a tensor on this process's training device: NCCL takes nothing else,
    so the check runs under gloo too and CPU tests catch a misplaced tensor."""
    if tensor.device != procs.device:
        raise RuntimeError(f"all_reduce of a tensor on {tensor.device}; the training device is {procs.device}")
    dist.all_reduce(tensor, op=op)
    return tensor


class StopRequest:
    """The first Ctrl-C (SIGINT) only asks the loop to stop after the iteration it is in, so the
    checkpoint it then writes never holds a step whose iteration was not counted; a second
    Ctrl-C interrupts at once, except while a step is applied and counted (applying). Under
    torchrun a second SIGINT is torchrun forwarding the same Ctrl-C to its workers: it changes
    nothing, so every process still stops after the same step (torchrun kills what lingers)."""

    def __init__(self, ddp=False):
        self.requested, self.ddp, self.applying = False, ddp, False
        self.previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handle)
        else:  # signal handlers live in the main thread only
            self.previous = None

    def handle(self, signum, frame):
        if self.requested and not self.ddp and not self.applying:
            raise KeyboardInterrupt
        self.requested = True  # while applying: the loop stops as soon as the step is counted

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def check_out_dir(cfg):
    """cli.check_output's rule for out_dir, before any work: a folder holding a run is continued
    (init_from=resume) or kept; only force starts a new run there, and replaces only the run's
    own files (TRAINING_OUTPUTS). A file, or a place that cannot be written, is refused."""
    out_dir, resuming = cfg["out_dir"], cfg["init_from"] == "resume"
    held = [name for name in RUN_CHECKPOINTS if os.path.isfile(os.path.join(out_dir, name))]
    source = cfg["init_from"] if os.path.isfile(cfg["init_from"]) else None
    if cfg["force"] and source and any(os.path.samefile(source, os.path.join(out_dir, name)) for name in held):
        raise UsageError(f"init_from={source}: is one of the files --force would replace in out_dir={out_dir}; "
                         f"copy it elsewhere first, or train into another out_dir")
    check_output(out_dir, f"out_dir={out_dir}", cfg["force"], ours=lambda path: resuming or not held, folder=True,
                 hint=f"it holds a training run ({', '.join(held)}): continue it with --init_from=resume, train "
                      f"into another out_dir, or pass --force to start over (replaces only the run's own files)")


def remove_previous_run(out_dir):
    """force: the run being replaced leaves none of its files to be mistaken for the new run's."""
    for name in TRAINING_OUTPUTS:
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def note_ignored_shape(cfg, args, source):
    """A checkpoint's shape wins over shape settings; name those set to something else on stderr."""
    ignored = [f"{k}={cfg[k]}" for k in SHAPE_KEYS if cfg[k] != DEFAULTS[k] and cfg[k] != getattr(args, k)]
    if ignored:
        kept = ", ".join(f"{k}={getattr(args, k)}" for k in SHAPE_KEYS)
        print(f"note: {', '.join(ignored)} ignored: the model from {source} keeps its shape ({kept})",
              file=sys.stderr)


def lock_out_dir(out_dir):
    """Hold out_dir/.lock for the run's life (cli.lock_folder: a second run on the same out_dir is
    refused in one line, a crashed run never leaves it stuck); then, under the lock, remove the
    temporary files a killed run left behind."""
    lock = lock_folder(out_dir, "training run")
    remove_stale_temp_files(out_dir, TRAINING_OUTPUTS)
    return lock


@torch.no_grad()
def estimate_losses(model, eval_sets, cfg, procs, autocast) -> dict:
    """Mean loss on the fixed evaluation batches of each split, shared out between processes."""
    model.eval()
    losses = {}
    for split, (data, batches) in eval_sets.items():
        total = torch.zeros(2, device=procs.device)  # summed loss, batches: no host sync per batch
        for i, rows in enumerate(batches):
            if i % procs.world == procs.rank:
                x, y = data.get(rows, cfg["device"])[:2]  # the reported losses are unweighted
                with autocast:
                    loss = model(x, y)[1]
                total += torch.stack([loss.detach().float(), torch.ones((), device=procs.device)])
        if procs.ddp:
            all_reduce(total, procs)
        loss_sum, count = total.tolist()
        losses[split] = loss_sum / count
    model.train()
    return losses


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, dst)


def save_best(out_dir, last_path):
    """best.pt and ckpt.pt: two more names for last.pt's file (copies where links fail)."""
    for name in ("best.pt", "ckpt.pt"):
        atomic_write(os.path.join(out_dir, name), lambda tmp: link_or_copy(last_path, tmp))


# ---- the loop ----------------------------------------------------------------------------------

def train(config, recipe=None) -> dict:
    """Run one training job; returns {"iter_num", "best_val_loss", "last_loss"}. recipe says what
    trains and what checkpoints hold (FullTraining by default)."""
    recipe, cfg = recipe or FullTraining(), dict(config)
    check_values(cfg)
    procs = start_processes(cfg)
    if cfg["gradient_accumulation_steps"] % procs.world:
        raise UsageError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be "
                         f"divisible by the {procs.world} processes (llama2.c splits it between them)")
    accum = cfg["gradient_accumulation_steps"] // procs.world
    device_type = "cuda" if cfg["device"].startswith("cuda") else "cpu"
    autocast = nullcontext() if cfg["dtype"] == "float32" else torch.autocast(device_type, dtype=torch_dtype(cfg["dtype"]))
    out_dir, last_path = cfg["out_dir"], os.path.join(cfg["out_dir"], "last.pt")

    if procs.master:
        check_out_dir(cfg)
    lock = lock_out_dir(out_dir) if procs.master else None
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    resume = load_resume_point(last_path) if cfg["init_from"] == "resume" else None
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process
    model = recipe.build(cfg, resume)
    if cfg["init_from"] != "scratch":
        note_ignored_shape(cfg, model.args, last_path if resume else cfg["init_from"])
    if procs.master and cfg["force"] and not resume:
        remove_previous_run(out_dir)
    train_data, val_data = open_training_data(cfg, model.args)
    model.to(cfg["device"])
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type,
                                           lambda name: recipe.lr_scale(name, cfg))
    scaler = torch.amp.GradScaler(device_type, enabled=cfg["dtype"] == "float16")
    sampler = BatchSampler(train_data, cfg["batch_size"], accum, procs.world, procs.rank, cfg["seed"],
                           cfg["group_by_length"])
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

    def save_last(loader_state, evaluated):
        """last.pt: everything a resume needs to repeat the run from iter_num on, and whether
        iter_num's evaluation already ran (a Ctrl-C save can land on an eval boundary before it)."""
        save_checkpoint(last_path, {
            "kind": "project", **recipe.checkpoint_weights(model), "model_args": model_args_dict(model.args),
            "config": cfg, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "loader_state": loader_state, "evaluated": evaluated})
        recipe.after_save(model, cfg, last_path, False)

    def last_good():
        return last_path if os.path.exists(last_path) else "(none yet)"

    from tqdm import tqdm
    bar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not procs.master, dynamic_ncols=True, leave=False)
    stop = StopRequest(procs.ddp)
    last_loss, t_start = float("nan"), time.time()
    # a last.pt from before the record does not say: evaluate again rather than maybe never
    evaluated_iter = iter_num if resume and resume.extra.get("evaluated", False) else None
    try:
        while True:
            loader_state = sampler.get_state()  # where this iteration's rows come from
            due = iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]
            if due and evaluated_iter != iter_num:
                t0 = time.time()
                losses = estimate_losses(model, eval_sets, cfg, procs, autocast)
                if not all(map(math.isfinite, losses.values())):
                    raise TrainingError(f"evaluation loss is {losses['val']} at iter {iter_num}: stopped; "
                                        f"the last good checkpoint is {last_good()}")
                eval_tokens = 2 * cfg["eval_iters"] * cfg["batch_size"] * train_data.seq_len
                metrics.write({"iter": iter_num, "loss": losses["val"], "lr": get_lr(iter_num, cfg), "eval": True,
                               "tokens_per_s": eval_tokens / (time.time() - t0),
                               "train_loss": losses["train"], "val_loss": losses["val"]})
                if procs.master:
                    bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    is_best = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                    save_last(loader_state, evaluated=True)
                    if is_best:
                        save_best(out_dir, last_path)
                        recipe.after_save(model, cfg, os.path.join(out_dir, "best.pt"), True)
                evaluated_iter = iter_num
            if iter_num >= cfg["max_iters"]:
                break
            t0, lr = time.time(), get_lr(iter_num, cfg)
            seed_iteration(cfg, procs, iter_num)
            last_loss, iter_tokens, seq_len, stop_now = train_step(train_model, sampler, optimizer, scaler, params, lr,
                                                                   cfg, accum, procs, autocast, stop)
            if not math.isfinite(last_loss):
                raise TrainingError(f"loss is {last_loss} at iter {iter_num}: stopped before applying that "
                                    f"step; the last good checkpoint is {last_good()}")
            stop.applying = True  # no interrupt between the weights moving and the iteration counted
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            stop.applying = False
            bar.update(1)
            if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
                dt = time.time() - t0
                tokens_per_s = iter_tokens * procs.world / dt
                mfu = model.estimate_mfu(tokens_per_s / procs.world, peak, seq_len)
                metrics.write({"iter": iter_num, "loss": last_loss, "lr": lr, "tokens_per_s": tokens_per_s,
                               "mfu": mfu, "time_ms": dt * 1000})
                bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s MFU {mfu:.1%}")
            # Ctrl-C during the iteration: it is complete and counted now. Under DDP the request
            # travels with the step's all_reduce, so that every process stops after the same step
            if stop_now or (stop.requested and not procs.ddp):
                loader_state = sampler.get_state()
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if procs.master:  # the state at the start of iteration iter_num: resume repeats it exactly
            save_last(loader_state, evaluated=evaluated_iter == iter_num)
            bar.write(f"interrupted at iter {iter_num}: saved {last_path} (continue with --init_from=resume)")
        raise
    finally:
        stop.close()
        bar.close()
        metrics.close()
        if lock:
            lock.close()
        if procs.ddp:
            dist.destroy_process_group()
    if procs.master:
        plot_losses(out_dir)
        print(f"done: {iter_num - start_iter} iters in {time.time() - t_start:.1f}s, last train loss {last_loss:.4f}, "
              f"best val loss {best_val_loss:.4f}; {out_dir}/ckpt.pt (= best.pt) for generate.py, last.pt to resume")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "last_loss": last_loss}


def train_step(train_model, sampler, optimizer, scaler, params, lr, cfg, accum, procs, autocast, stop):
    """One iteration's forward and backward passes over its micro-batches, gradients clipped.
    Returns (mean loss, tokens, mean row length, whether any process was asked to stop); the
    caller applies the step once the loss is finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum, tokens, rows = torch.zeros((), device=procs.device), 0, 0
    for micro, (x, y, *weights) in enumerate(sampler.iteration(cfg["device"])):
        tokens, rows = tokens + x.numel(), rows + x.shape[0]  # instruct batches are cut to their longest row
        # DDP averages gradients once, on the last micro-step
        with train_model.no_sync() if procs.ddp and micro < accum - 1 else nullcontext():
            with autocast:
                _, loss = train_model(x, y, target_weights=weights[0] if weights else None)
            loss_sum += loss.detach().float()
            scaler.scale(loss / accum).backward()
    # one all_reduce carries the loss and the stop request: every process stops after the same step.
    # SUM, not AVG: gloo's AVG is missing from older PyTorch
    shared = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=procs.device)])
    if procs.ddp:
        all_reduce(shared, procs)
    loss_total, stops = shared.tolist()
    loss = loss_total / accum / procs.world
    if math.isfinite(loss) and cfg["grad_clip"] > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
    return loss, tokens, tokens / rows, stops > 0


def main(argv=None, defaults=DEFAULTS, recipe=None):
    argv = sys.argv[1:] if argv is None else argv
    if configurator.wants_help(argv):  # the docstring of the script run: train.py or finetune_lora.py
        doc = sys.modules[type(recipe).__module__].__doc__ if recipe else __doc__
        print(configurator.settings_help(doc, defaults, CHOICES))
        return 0
    new_out_dir = None  # an out_dir this run creates: removed again if the run fails before writing to it
    try:
        cfg = parse_settings(argv, defaults)
        new_out_dir = None if os.path.lexists(cfg["out_dir"]) or int(os.environ.get("RANK", 0)) else cfg["out_dir"]
        train(cfg, recipe)
        new_out_dir = None
        return 0
    except ToolError as exc:  # bad settings, data or checkpoints: 2; a run that had to stop: 1
        return report_error(exc)
    except OSError as exc:  # a full disk, a read-only folder: the message names the file
        return report_error(exc)
    except ValueError as exc:  # a model shape that does not divide (ModelArgs), bad LoRA settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the loop has said what it saved; before the loop nothing was written
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if new_out_dir and os.path.isdir(new_out_dir) and os.listdir(new_out_dir) == [".lock"]:
            os.remove(os.path.join(new_out_dir, ".lock"))
            os.rmdir(new_out_dir)


if __name__ == "__main__":
    sys.exit(run_main(main))
