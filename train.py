"""Train a Llama 2 story model: from scratch, on from any checkpoint, or resumed exactly.

    python train.py configs/demo_instruct.py
    python train.py configs/instruct15M.py --batch_size=32 --compile=False
    torchrun --standalone --nproc_per_node=2 train.py configs/demo_pretrain.py

Settings: DEFAULTS below, then each config file named (Python `key = value` lines), then
--key=value flags; names and types are checked. finetune_lora.py runs this same loop (train()
with its own recipe). The data comes through dataset.py, torchrun's processes through
distributed.py (any number of machines: docs/usage.md, "More than one machine"). out_dir
(run_folder.py) gets last.pt (written at every evaluation, at the end and on Ctrl-C: what
--init_from=resume and --auto_resume continue), best.pt (lowest val loss) and ckpt.pt (= best.pt,
llama2.c's name: point generate.py at it), metrics.jsonl and loss.png (metrics.py).
"""
import inspect
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import configurator
from checkpoints import load_checkpoint, model_args_dict, save_checkpoint
from cli import (DTYPE_NAMES, ToolError, UsageError, bf16_supported, check_device, default_device, report_error,
                 run_main, torch_dtype)
from data_paths import vocab_source
from dataset import BatchSampler, data_folder, data_prompt_format, default_tokenizer, fixed_batches, open_dataset
from distributed import (Processes, check_same_files, end_processes, gradient_sync, launched_rank, start_processes,
                         sum_over_processes, wrap_for_ddp)
from metrics import MetricsLog, estimate_mfu, peak_flops, plot_losses
from model import ModelArgs, Transformer
from coherence import hero_name_ids
from prompts import RequestFinder
from run_folder import last_checkpoint, last_good, open_run_folder, remove_previous_run, removed_if_left_empty, save_best
from stop_request import StopRequest
from tokenizer import Tokenizer

DEFAULTS = dict(
    # I/O
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=100,
    init_from="scratch",  # scratch | resume (from out_dir/last.pt) | path of any checkpoint
    force=False,  # start a new run in an out_dir that holds one: its checkpoints are replaced (nothing else)
    # continue out_dir's run where it holds one of the same settings, else start as init_from says:
    # one command for the first start and every restart (torchrun --max_restarts, a requeued job)
    auto_resume=False,
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
    hero_weight=1.0,
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
    if cfg["auto_resume"] and cfg["force"]:
        raise UsageError("auto_resume=True and force=True: continue out_dir's run or replace it, not both")
    if cfg["dtype"] == "bfloat16" and not bf16_supported():
        raise UsageError("dtype=bfloat16: not supported on this hardware (use float32 or float16)")


def note_ignored_shape(cfg, args, source):
    """A checkpoint's shape wins over shape settings; name those set to something else on stderr."""
    ignored = [f"{k}={cfg[k]}" for k in SHAPE_KEYS if cfg[k] != DEFAULTS[k] and cfg[k] != getattr(args, k)]
    if ignored:
        kept = ", ".join(f"{k}={getattr(args, k)}" for k in SHAPE_KEYS)
        print(f"note: {', '.join(ignored)} ignored: the model from {source} keeps its shape ({kept})",
              file=sys.stderr)


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


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, lr_scale_of=None):
    """AdamW over the model's trained parameters; matrices decay, vectors do not. lr_scale_of(name)
    gives a parameter a learning rate that many times the schedule's (train_step applies each
    group's lr_scale)."""
    # (lr scale, decays) -> params; the two unscaled groups always exist, first, so optimizer states
    # saved before lr_scale still load
    by_kind = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_kind.setdefault((lr_scale_of(name) if lr_scale_of else 1.0, p.dim() >= 2), []).append(p)
    groups = [{"params": params, "weight_decay": weight_decay if decays else 0.0, **({"lr_scale": s} if s != 1.0 else {})}
              for (s, decays), params in by_kind.items()]
    # fused AdamW exists for CUDA and, since PyTorch 2.4, for CPUs (3x faster steps there)
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


# ---- data, resume and the run's state --------------------------------------------------------

def micro_batches_per_process(cfg, procs) -> int:
    """gradient_accumulation_steps is the whole job's; each process takes its share."""
    if cfg["gradient_accumulation_steps"] % procs.world:
        raise UsageError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be "
                         f"divisible by the {procs.world} processes (llama2.c splits it between them)")
    return cfg["gradient_accumulation_steps"] // procs.world


def device_type_of(cfg) -> str:
    return "cuda" if cfg["device"].startswith("cuda") else "cpu"


def mixed_precision(cfg):
    """The autocast context of the forward passes (none for float32)."""
    if cfg["dtype"] == "float32":
        return nullcontext()
    return torch.autocast(device_type_of(cfg), dtype=torch_dtype(cfg["dtype"]))


def build_model(cfg, recipe, resume):
    """The recipe's model, with the same initial weights in every process."""
    torch.manual_seed(cfg["seed"])
    model = recipe.build(cfg, resume)
    if cfg["init_from"] != "scratch":
        note_ignored_shape(cfg, model.args, last_checkpoint(cfg["out_dir"]) if resume else cfg["init_from"])
    return model


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
    if cfg["hero_weight"] != 1.0:
        if cfg["dataset"] != "instruct":
            raise UsageError(f"hero_weight={cfg['hero_weight']}: weighs a story's repeated hero name, so it needs dataset=instruct")
        train_data.emphasize_hero(cfg["hero_weight"], hero_name_ids(Tokenizer(cfg["tokenizer"])))
    if cfg["group_by_length"] and cfg["dataset"] != "instruct":
        raise UsageError("group_by_length=True: pretraining windows all have max_seq_len tokens; it needs dataset=instruct")
    cfg["prompt_format"] = data_prompt_format(cfg)
    return train_data, val_data


@dataclass
class Run:
    """One training job's state: what the loop advances and what last.pt records."""
    cfg: dict
    recipe: FullTraining
    procs: Processes
    model: Transformer
    train_model: torch.nn.Module  # what the steps call: the model, compiled and/or wrapped for DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    train_data: object
    eval_sets: dict  # split -> (data, its fixed evaluation batches)
    accum: int  # micro-batches per iteration in this process
    autocast: object
    iter_num: int = 0
    best_val_loss: float = float("inf")
    settings: dict = None  # the command's settings as given: what auto_resume compares


def start_run(cfg, recipe, procs, model, resume, accum) -> Run:
    """The model on its device with its optimizer, loss scaler, data order and evaluation batches:
    new, or as last.pt left them."""
    device_type = device_type_of(cfg)
    train_data, val_data = open_training_data(cfg, model.args)
    check_same_files(procs, data_folder(cfg), ("data*", "meta.json"), f"data_dir={cfg['data_dir']}")
    model.to(cfg["device"])
    optimizer = configure_optimizers(model, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                     device_type, lambda name: recipe.lr_scale(name, cfg))
    scaler = torch.amp.GradScaler(device_type, enabled=cfg["dtype"] == "float16")
    sampler = BatchSampler(train_data, cfg["batch_size"], accum, procs.world, procs.rank, cfg["seed"],
                           cfg["group_by_length"])
    eval_sets = {"train": (train_data, fixed_batches(train_data, cfg["eval_iters"], cfg["batch_size"], cfg["seed"] + 1)),
                 "val": (val_data, fixed_batches(val_data, cfg["eval_iters"], cfg["batch_size"], cfg["seed"] + 2))}
    iter_num, best_val_loss = restore_state(resume, optimizer, scaler, sampler) if resume else (0, float("inf"))
    train_model = wrap_for_ddp(torch.compile(model) if cfg["compile"] else model, procs, device_type)
    return Run(cfg, recipe, procs, model, train_model, optimizer, scaler, sampler, train_data, eval_sets, accum,
               mixed_precision(cfg), iter_num, best_val_loss)


def restore_state(resume, optimizer, scaler, sampler):
    """Optimizer, loss scaler and data position as they were when last.pt was written; returns
    (iter_num, best_val_loss). The random numbers need no saving: see seed_iteration."""
    optimizer.load_state_dict(resume.extra["optimizer"])
    scaler.load_state_dict(resume.extra["scaler"])
    sampler.set_state(resume.extra["loader_state"])
    return resume.extra["iter_num"], resume.extra["best_val_loss"]


def announce(run, peak, peak_source):
    cfg, model = run.cfg, run.model
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{run.recipe.name}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"({trained:,} trained), {cfg['dataset']} data from {run.train_data.folder}, up to "
          f"{cfg['batch_size'] * cfg['gradient_accumulation_steps'] * run.train_data.seq_len:,} tokens/iter, "
          f"{run.procs.world} process(es), {cfg['device']} {cfg['dtype']}{' compiled' if cfg['compile'] else ''}; "
          f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")


def save_last(run, loader_state, evaluated):
    """last.pt: everything a resume needs to repeat the run from iter_num on, and whether
    iter_num's evaluation already ran (a Ctrl-C save can land on an eval boundary before it)."""
    last_path, model = last_checkpoint(run.cfg["out_dir"]), run.model
    save_checkpoint(last_path, {
        "kind": "project", **run.recipe.checkpoint_weights(model), "model_args": model_args_dict(model.args),
        "config": run.cfg, "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "loader_state": loader_state,
        "evaluated": evaluated, "settings": run.settings})
    run.recipe.after_save(model, run.cfg, last_path, False)


def seed_iteration(cfg, procs, iter_num):
    """Seed every generator (CPU and GPU) from (seed, rank, iteration) before each step: dropout
    then draws the same numbers in a resumed run as in an uninterrupted one, on every rank and
    device, with no generator state to save, and differs between ranks."""
    torch.manual_seed((cfg["seed"] * 1_000_003 + iter_num) * 1_009 + procs.rank)


# ---- the loop ----------------------------------------------------------------------------------

def train(config, recipe=None) -> dict:
    """Run one training job; returns {"iter_num", "best_val_loss", "last_loss"}. recipe says what
    trains and what checkpoints hold (FullTraining by default)."""
    recipe, cfg, settings = recipe or FullTraining(), dict(config), dict(config)
    check_values(cfg)
    procs = start_processes(cfg)
    accum = micro_batches_per_process(cfg, procs)
    out_dir = cfg["out_dir"]
    lock, resume = open_run_folder(cfg, settings, procs)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    model = build_model(cfg, recipe, resume)
    if procs.master and cfg["force"] and not resume:
        remove_previous_run(out_dir)
    run = start_run(cfg, recipe, procs, model, resume, accum)
    run.settings = settings
    peak, peak_source = peak_flops(cfg, device_type_of(cfg))
    if procs.master:
        announce(run, peak, peak_source)
    metrics = MetricsLog(out_dir, resume_from=run.iter_num if resume else None, enabled=procs.master)

    from cli import progress as tqdm  # a plain line every 10% when the output is a log file
    bar = tqdm(total=cfg["max_iters"], initial=run.iter_num, disable=not procs.master, dynamic_ncols=True, leave=False)
    stop = StopRequest(procs.ddp)
    start_iter, last_loss, t_start = run.iter_num, float("nan"), time.time()
    # a last.pt from before the record does not say: evaluate again rather than maybe never
    evaluated_iter = run.iter_num if resume and resume.extra.get("evaluated", False) else None
    try:
        while True:
            loader_state = run.sampler.get_state()  # where this iteration's rows come from
            due = run.iter_num % cfg["eval_interval"] == 0 or run.iter_num == cfg["max_iters"]
            if due and evaluated_iter != run.iter_num:
                evaluate_and_save(run, loader_state, metrics, bar)
                evaluated_iter = run.iter_num
            if run.iter_num >= cfg["max_iters"]:
                break
            t0, lr = time.time(), get_lr(run.iter_num, cfg)
            seed_iteration(cfg, procs, run.iter_num)
            last_loss, iter_tokens, seq_len, stop_now = train_step(run, lr, stop)
            apply_step(run, last_loss, stop)
            bar.update(1)
            if run.iter_num % cfg["log_interval"] == 0 or run.iter_num == cfg["max_iters"]:
                log_step(run, metrics, bar, last_loss, lr, iter_tokens, seq_len, time.time() - t0, peak)
            # Ctrl-C during the iteration: it is complete and counted now. Under DDP the request
            # travels with the step's all_reduce, so that every process stops after the same step
            if stop_now or (stop.requested and not procs.ddp):
                loader_state = run.sampler.get_state()
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if procs.master:  # the state at the start of iteration iter_num: resume repeats it exactly
            save_last(run, loader_state, evaluated=evaluated_iter == run.iter_num)
            bar.write(f"interrupted at iter {run.iter_num}: saved {last_checkpoint(out_dir)} "
                      f"(continue with --init_from=resume)")
        raise
    finally:
        stop.close()
        bar.close()
        metrics.close()
        if lock:
            lock.close()
        end_processes(procs)
    if procs.master:
        plot_losses(out_dir)
        print(f"done: {run.iter_num - start_iter} iters in {time.time() - t_start:.1f}s, last train loss "
              f"{last_loss:.4f}, best val loss {run.best_val_loss:.4f}; {out_dir}/ckpt.pt (= best.pt) for "
              f"generate.py, last.pt to resume")
    return {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "last_loss": last_loss}


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
        loss_sum, count = sum_over_processes(total, procs).tolist()
        losses[split] = loss_sum / count
    model.train()
    return losses


def evaluate_and_save(run, loader_state, metrics, bar):
    """The evaluation due at iter_num: logged, then (master) last.pt, and best.pt when it is the best."""
    cfg, iter_num, t0 = run.cfg, run.iter_num, time.time()
    losses = estimate_losses(run.model, run.eval_sets, cfg, run.procs, run.autocast)
    if not all(map(math.isfinite, losses.values())):
        raise TrainingError(f"evaluation loss is {losses['val']} at iter {iter_num}: stopped; "
                            f"the last good checkpoint is {last_good(cfg['out_dir'])}")
    eval_tokens = 2 * cfg["eval_iters"] * cfg["batch_size"] * run.train_data.seq_len
    metrics.write({"iter": iter_num, "loss": losses["val"], "lr": get_lr(iter_num, cfg), "eval": True,
                   "tokens_per_s": eval_tokens / (time.time() - t0),
                   "train_loss": losses["train"], "val_loss": losses["val"]})
    if run.procs.master:
        bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        is_best = losses["val"] < run.best_val_loss
        run.best_val_loss = min(run.best_val_loss, losses["val"])
        save_last(run, loader_state, evaluated=True)
        if is_best:
            run.recipe.after_save(run.model, cfg, save_best(cfg["out_dir"]), True)


def train_step(run, lr, stop):
    """One iteration's forward and backward passes over its micro-batches, gradients clipped.
    Returns (mean loss, tokens, mean row length, whether any process was asked to stop); the
    caller applies the step once the loss is finite."""
    cfg, procs, accum = run.cfg, run.procs, run.accum
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum, tokens, rows = torch.zeros((), device=procs.device), 0, 0
    for micro, (x, y, *weights) in enumerate(run.sampler.iteration(cfg["device"])):
        tokens, rows = tokens + x.numel(), rows + x.shape[0]  # instruct batches are cut to their longest row
        with gradient_sync(run.train_model, procs, last_micro_batch=micro >= accum - 1):
            with run.autocast:
                _, loss = run.train_model(x, y, target_weights=weights[0] if weights else None)
            loss_sum += loss.detach().float()
            run.scaler.scale(loss / accum).backward()
    # one all_reduce carries the loss and the stop request: every process stops after the same step
    shared = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=procs.device)])
    loss_total, stops = sum_over_processes(shared, procs).tolist()
    loss = loss_total / accum / procs.world
    if math.isfinite(loss) and cfg["grad_clip"] > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg["grad_clip"])
    return loss, tokens, tokens / rows, stops > 0


def apply_step(run, loss, stop):
    """The weights move and the iteration counts, or the run stops before a non-finite step."""
    if not math.isfinite(loss):
        raise TrainingError(f"loss is {loss} at iter {run.iter_num}: stopped before applying that "
                            f"step; the last good checkpoint is {last_good(run.cfg['out_dir'])}")
    stop.applying = True  # no interrupt between the weights moving and the iteration counted
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    stop.applying = False


def log_step(run, metrics, bar, loss, lr, iter_tokens, seq_len, seconds, peak):
    tokens_per_s = iter_tokens * run.procs.world / seconds
    mfu = estimate_mfu(run.model, tokens_per_s / run.procs.world, peak, seq_len)
    metrics.write({"iter": run.iter_num, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                   "mfu": mfu, "time_ms": seconds * 1000})
    bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s MFU {mfu:.1%}")


def main(argv=None, defaults=DEFAULTS, recipe=None):
    argv = sys.argv[1:] if argv is None else argv
    if configurator.wants_help(argv):  # the docstring of the script run: train.py or finetune_lora.py
        doc = sys.modules[type(recipe).__module__].__doc__ if recipe else __doc__
        print(configurator.settings_help(doc, defaults, CHOICES))
        return 0
    try:
        cfg = parse_settings(argv, defaults)
        with removed_if_left_empty(cfg["out_dir"], creator=launched_rank() == 0):
            train(cfg, recipe)
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


if __name__ == "__main__":
    sys.exit(run_main(main))
