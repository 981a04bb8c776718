"""Training throughput, LoRA against full fine-tuning, and memory over long runs.

    python bench/training.py                            # the CPU figures of docs/benchmarks.md
    python bench/training.py --skip=throughput,lora,memory   # only the demo's steps (docs/finetuning.md)
    python bench/training.py --device=cuda --shape=110M # MFU of stories110M, bf16 + compile, on a GPU

Demo steps: the shape of `make demo` and `make demo-finetune` (dim 128, 4 layers, vocab 1024,
batch 16, float32 eager, as configs/demo_*.py train), side by side in alternating rounds: a full
step on the base's pretraining rows (16 x 192, every position scored), and on instruct rows (16 x
160, a 50-token prompt and rows of 110-160 tokens, so about half the positions scored, as in the
demo data), the demo's LoRA step on the same instruct rows, and the floor of any adapter that
reaches the embedding: every weight frozen, gradients still through every layer.

CPU: tokens/s of the stories15M shape (vocab 4096, batch 8 x 256) in float32 eager against
bfloat16 autocast (eager and compiled), measured in alternating rounds so that a busy machine
hurts every variant alike; a LoRA step against a full fine-tuning step; peak resident memory of
a 1,000-step run against a 100-step run of train.py on memory-mapped shards.
MFU is against a matmul peak measured here in the same dtype (the GPU mode: the datasheet peak).
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import finetune_lora  # noqa: E402
import metrics  # noqa: E402
from cli import torch_dtype  # noqa: E402
from configurator import parse_settings  # noqa: E402
from lora import apply_lora, parse_targets  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from train import configure_optimizers  # noqa: E402

SHAPES = {"15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=32),
          "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=32)}


def make_step(shape, vocab, seq, dtype, compile_model, lora=False, device="cpu"):
    """One training step exactly as train.py takes it: autocast forward, backward, clip, AdamW."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPES[shape], vocab_size=vocab, max_seq_len=seq)).to(device)
    if lora:
        apply_lora(model, rank=2, alpha=1.0)
    optimizer = configure_optimizers(model, 0.1, 5e-4, (0.9, 0.95), device.split(":")[0])
    params = [p for p in model.parameters() if p.requires_grad]
    run = torch.compile(model) if compile_model else model
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], dtype=torch_dtype(dtype))

    def step(x, y):
        with autocast:
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return model, step


def timed(step, x, y, n, device):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    sync()
    return (time.perf_counter() - t0) / n


def cpu_throughput(batch, seq, vocab, steps, rounds, with_compile):
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))
    variants = {"float32 eager": ("float32", False), "bfloat16 autocast eager": ("bfloat16", False)}
    if with_compile:
        variants["bfloat16 autocast compiled"] = ("bfloat16", True)
    steps_fns, best = {}, {}
    for name, (dtype, comp) in variants.items():
        model, step = make_step("15M", vocab, seq, dtype, comp)
        t0 = time.perf_counter()
        step(x, y), step(x, y)  # warm-up (and, compiled, the compilation itself)
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        steps_fns[name], best[name] = (model, step), float("inf")
    for _ in range(rounds):
        for name, (model, step) in steps_fns.items():
            best[name] = min(best[name], timed(step, x, y, steps, "cpu"))
    peaks = {d: metrics.measure_matmul_flops("cpu", torch_dtype(d), seconds=1.0) for d in ("float32", "bfloat16")}
    model = steps_fns["float32 eager"][0]
    print(f"\nstories15M shape, vocab {vocab}, batch {batch} x {seq} ({metrics.flops_per_token(model) / 1e6:.0f} MFLOP/token); "
          f"measured matmul peak: float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    base = best["float32 eager"]
    for name, seconds in best.items():
        tokens_per_s = batch * seq / seconds
        dtype = variants[name][0]
        print(f"  {name:28s} {seconds * 1000:7.0f} ms/step {tokens_per_s:8.0f} tokens/s  {base / seconds:4.2f}x  "
              f"MFU {metrics.estimate_mfu(model, tokens_per_s, peaks[dtype]):5.1%} (of {dtype} peak), "
              f"{metrics.estimate_mfu(model, tokens_per_s, peaks['bfloat16']):5.1%} (of bf16 peak)")
    return best


def lora_vs_full(batch, seq, vocab, steps, rounds):
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))
    runs = {name: make_step("15M", vocab, seq, "bfloat16", False, lora=(name == "LoRA r2 wq,wk,wv,wo"))
            for name in ("full fine-tuning", "LoRA r2 wq,wk,wv,wo")}
    best = dict.fromkeys(runs, float("inf"))
    for _, step in runs.values():
        step(x, y)
    for _ in range(rounds):
        for name, (_, step) in runs.items():
            best[name] = min(best[name], timed(step, x, y, steps, "cpu"))
    print("\nLoRA against full fine-tuning (same model, bfloat16 autocast eager):")
    for name, (model, _) in runs.items():
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"  {name:22s} {best[name] * 1000:7.0f} ms/step, {trained:,} trained parameters")


def demo_lora_settings():
    """configs/demo_lora.py as finetune_lora.py reads it, so the bench times the adapters that ship."""
    return parse_settings([os.path.join(ROOT, "configs", "demo_lora.py")], finetune_lora.DEFAULTS)


def demo_model(lora_settings=None):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, multiple_of=32, vocab_size=1024,
                                  max_seq_len=192))
    if lora_settings:
        apply_lora(model, parse_targets(lora_settings["lora_targets"]), rank=lora_settings["lora_rank"],
                   alpha=lora_settings["lora_alpha"], rslora=lora_settings["lora_rslora"])
    return model


def no_weight_gradients(model):
    """Every weight frozen; the first layer's input still asks for a gradient, so backward runs
    through every layer as it must for an adapter on the embedding, minus every weight gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.layers[0].register_forward_pre_hook(lambda module, args: (args[0].detach().requires_grad_(),) + args[1:])
    return model


def demo_rows(instruct):
    g = torch.Generator().manual_seed(0)
    width = 160 if instruct else 192
    x, y = torch.randint(3, 1024, (16, width), generator=g), torch.randint(3, 1024, (16, width), generator=g)
    if instruct:  # prompt positions and each row's padding carry no target
        ends = torch.randint(110, width + 1, (16,), generator=g)
        ends[0] = width  # a batch is cut to its longest row
        for row, end in enumerate(ends.tolist()):
            y[row, :50], y[row, end:] = -1, -1
    return x, y


def demo_steps(steps, rounds):
    pretrain, instruct = demo_rows(False), demo_rows(True)
    shipped = demo_lora_settings()
    variants = {"full step, pretraining rows 16x192": (demo_model(), pretrain),
                "full step, instruct rows": (demo_model(), instruct),
                f"LoRA step (demo_lora, rank {shipped['lora_rank']}), instruct rows": (demo_model(shipped), instruct),
                "no weight gradients, instruct rows": (no_weight_gradients(demo_model()), instruct)}
    if shipped["lora_rank"] != 8:  # the rank of docs/finetuning.md's rounds 1-7, for the cost of the rank itself
        variants["LoRA step, rank 8 (rounds 1-7), instruct rows"] = (demo_model(dict(shipped, lora_rank=8)), instruct)
    runs = {}
    for name, (model, (x, y)) in variants.items():
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = configure_optimizers(model, 0.0, 1e-3, (0.9, 0.95), "cpu") if params else None

        def step(x, y, model=model, params=params, optimizer=optimizer):
            _, loss = model(x, y)
            loss.backward()
            if optimizer is not None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step(x, y)
        runs[name] = (step, x, y)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (step, x, y) in runs.items():
            best[name] = min(best[name], timed(step, x, y, steps, "cpu"))
    scored = (instruct[1] != -1).float().mean().item()
    print(f"\nthe demo's steps (dim 128, 4 layers, vocab 1024, batch 16, float32 eager, {torch.get_num_threads()} "
          f"threads; instruct rows {scored:.0%} scored), best of {rounds} alternating rounds:")
    reference = best["full step, instruct rows"]
    for name, seconds in best.items():
        print(f"  {name:46s} {seconds * 1000:6.1f} ms/step  {seconds / reference:4.2f}x the full step on instruct rows")
    return best


MEM_RUN = """
import resource, sys
sys.path.insert(0, {root!r})
import dataset, torch, train
torch.set_num_threads(1)
if {no_release}:
    dataset._release_pages = lambda array: None
c = dict(train.DEFAULTS, data_dir={data!r}, out_dir={out!r}, vocab_source="custom", vocab_size=512, dim=32,
         n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=8, max_seq_len=256, batch_size=8,
         gradient_accumulation_steps=1, max_iters={iters}, eval_interval=100000, eval_iters=1,
         log_interval=100, device="cpu", dtype="float32", compile=False, peak_flops=1e12)
train.train(c)
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def memory_runs(shard_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tok512")
        os.makedirs(folder)
        rng = np.random.default_rng(0)
        for i in range(3):  # data00 validation, two training shards
            rng.integers(3, 512, size=shard_tokens, dtype=np.uint16).tofile(os.path.join(folder, f"data{i:02d}.bin"))
        mb = 2 * shard_tokens * 2 / 2 ** 20
        print(f"\npeak resident memory of train.py (tiny model, batch 8 x 256) on {mb:.0f} MB of memory-mapped training shards:")
        for no_release in (False, True):
            label = "pages released after each batch (train.py)" if not no_release else "same, page release disabled"
            peaks = []
            for iters in (100, 1000):
                code = MEM_RUN.format(root=ROOT, data=tmp, out=os.path.join(tmp, f"out{iters}_{no_release}"), iters=iters, no_release=no_release)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1"))
                if proc.returncode:
                    sys.exit(f"memory run failed: {proc.stderr.strip().splitlines()[-1]}")
                peaks.append(float(proc.stdout.split("PEAK_RSS_MB")[1]))
                print(f"  {label}: {iters:5d} steps: peak RSS {peaks[-1]:6.0f} MB ({time.perf_counter() - t0:.0f}s)", flush=True)
            print(f"  {label}: growth from 100 to 1000 steps: {peaks[1] - peaks[0]:+.0f} MB")


def gpu_mfu(shape, batch, seq, steps):
    device = "cuda"
    vocab = 32000
    model, step = make_step(shape, vocab, seq, "bfloat16", True, device=device)
    x = torch.randint(0, vocab, (batch, seq), device=device)
    y = torch.randint(0, vocab, (batch, seq), device=device)
    t0 = time.perf_counter()
    for _ in range(3):
        step(x, y)
    torch.cuda.synchronize()
    print(f"warm-up and compilation: {time.perf_counter() - t0:.0f}s")
    seconds = timed(step, x, y, steps, device)
    tokens_per_s = batch * seq / seconds
    name = torch.cuda.get_device_name()
    listed = metrics.gpu_peak_bf16(name)
    peak = listed or 989e12
    print(f"stories{shape} shape (vocab {vocab}), batch {batch} x {seq}, bf16 autocast + compile on {name}: "
          f"{seconds * 1000:.0f} ms/step, {tokens_per_s:,.0f} tokens/s, MFU {metrics.estimate_mfu(model, tokens_per_s, peak):.1%} "
          f"of {peak / 1e12:.0f} TFLOP/s (bf16 dense datasheet peak{'' if listed else ', assumed H100 SXM'}); "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="cuda mode: 110M (default)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (cpu 4, cuda 20)")
    p.add_argument("--rounds", type=int, default=3, help="cpu: alternating rounds; the best round counts")
    p.add_argument("--no_compile", action="store_true", help="cpu: skip the compiled variant (slow to compile)")
    p.add_argument("--skip", default="", help="cpu: comma-separated parts to skip: demo,throughput,lora,memory")
    p.add_argument("--shard_tokens", type=int, default=64 * 2 ** 20, help="tokens per memory-test shard")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}", flush=True)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device=cuda: no CUDA device here")
        gpu_mfu(args.shape or "110M", batch=16, seq=1024, steps=args.steps or 20)
        return
    skip = set(args.skip.split(","))
    if "demo" not in skip:
        demo_steps(args.steps or 5, args.rounds)
    if "throughput" not in skip:
        print("throughput (warm-up first):", flush=True)
        cpu_throughput(8, 256, 4096, args.steps or 4, args.rounds, not args.no_compile)
    if "lora" not in skip:
        lora_vs_full(8, 256, 4096, args.steps or 4, args.rounds)
    if "memory" not in skip:
        memory_runs(args.shard_tokens)
    print(f"\npeak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
