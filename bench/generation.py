"""Generation speed: no cache, the eager KV cache, and the compiled decode step in float32,
bfloat16 and int8, at batch 1 and batch 8, side by side in one run.

    python bench/generation.py                        # stories15M shape, CPU, the whole table
    python bench/generation.py --shapes=110M          # stories110M shape (slow: minutes)
    python bench/generation.py --variants=eager,f32   # some variants only
    python bench/generation.py --device=cuda          # on a GPU
    python bench/generation.py --profile              # where the eager cached step spends its time

Random weights in the published shapes (speed does not depend on what the weights say):
stories15M (dim 288, 6 layers, 6 heads, hidden 768, vocab 32000, context 256) and stories110M
(dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000, context 1024). Greedy decoding with no
stop ids, so every run makes exactly --new_tokens tokens from a 1-token prompt, through
`Transformer.generate` (the path generate.py takes, with the weights prepared as
`generate.prepare_for_sampling` does). Each figure is the best of --repeats runs after a
warm-up run (which, for a compiled variant, compiles). Compile time is measured in fresh
processes: "cold" with an empty inductor cache, "warm" with the cache the cold one left.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer  # noqa: E402
from quantize import quantize_int8  # noqa: E402

SHAPES = {"15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
          "110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024)}
# name: (use_cache, compile, dtype, quantize)
VARIANTS = {"nocache": (False, False, torch.float32, None),
            "eager": (True, False, torch.float32, None),
            "f32": (True, True, torch.float32, None),
            "bf16": (True, True, torch.bfloat16, None),
            "int8": (True, True, torch.float32, "int8")}
LABELS = {"nocache": "no cache, float32", "eager": "KV cache, eager, float32",
          "f32": "compiled, float32", "bf16": "compiled, bfloat16", "int8": "compiled, int8 weights"}


def make_model(shape, device, dtype, quantize=None, fuse=True):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPES[shape], vocab_size=32000)).to(device=device, dtype=dtype).eval()
    if fuse:
        model.fuse_projections()
    if quantize == "int8":
        quantize_int8(model, stream=open(os.devnull, "w"))
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(model, batch, new_tokens, use_cache, compile, device):
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)  # BOS
    sync(device)
    start = time.perf_counter()
    steps = list(model.generate(prompt, new_tokens, temperature=0.0, stop_ids=(), use_cache=use_cache,
                                compile=compile))
    sync(device)
    seconds = time.perf_counter() - start
    assert len(steps) == new_tokens, f"made {len(steps)} tokens, expected {new_tokens}"
    return seconds


def tokens_per_s(model, batch, new_tokens, use_cache, compile, device, repeats):
    # warm-up at the full length: the compiled step's cache must have the measured runs' shape
    run_once(model, batch, new_tokens, use_cache, compile, device)
    seconds = min(run_once(model, batch, new_tokens, use_cache, compile, device) for _ in range(repeats))
    return batch * new_tokens / seconds


def compile_seconds(shape, device, cache_dir):
    """Seconds from the first compiled call to its result, in a fresh process (cold or warm
    depending on what cache_dir holds)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--shapes={shape}",
                          f"--device={device}", "--_time_compile"], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_first_compile(shape, device):
    model = make_model(shape, device, torch.float32)
    prompt = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model.setup_cache(1, 8)
        model.setup_classifier()
        model.prefill(prompt)
        step = model.compiled_decode_step()
        start = time.perf_counter()
        step(prompt, torch.tensor([1], device=device))
    sync(device)
    print(time.perf_counter() - start)


def profile_decode(model, device, new_tokens):
    """Operator-level profile of one eager cached batch-1 generation."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run_once(model, 1, 16, True, False, device)
    with profile(activities=activities) as prof:
        run_once(model, 1, new_tokens, True, False, device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shapes", default="15M", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    p.add_argument("--new_tokens", type=int, default=256, help="for the stories15M shape")
    p.add_argument("--new_tokens_110M", type=int, default=128, help="for the stories110M shape")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched runs")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    p.add_argument("--no_fuse", action="store_true", help="keep wq/wk/wv and w1/w3 as separate matmuls")
    p.add_argument("--no_compile_time", action="store_true", help="skip the cold/warm compile timing")
    p.add_argument("--profile", action="store_true", help="also profile one eager cached batch-1 run")
    p.add_argument("--_time_compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown shape or variant: {', '.join(unknown)}")
    if args._time_compile:
        return time_first_compile(shapes[0], device)

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads")
          + f", greedy from a 1-token prompt, best of {args.repeats}"
          + (", wq/wk/wv and w1/w3 separate" if args.no_fuse else ""))
    for shape in shapes:
        new_tokens = args.new_tokens_110M if shape == "110M" else args.new_tokens
        rows = {}
        for name in variants:
            use_cache, compile, dtype, quantize = VARIANTS[name]
            model = make_model(shape, device, dtype, quantize, fuse=not args.no_fuse)
            rows[name] = [tokens_per_s(model, b, new_tokens, use_cache, compile, device, args.repeats)
                          for b in (1, args.batch)]
            if args.profile and name == "eager":
                profile_decode(model, device, new_tokens)
            del model
            torch.compiler.reset()  # each variant compiles afresh; none reuses another's graph
        base = rows.get("nocache", [None, None])
        print(f"\nstories{shape} shape, {new_tokens} new tokens; tokens/s (batch {args.batch}: all "
              f"samples' tokens together); x: against no cache at the same batch size")
        print(f"| variant | batch 1 | x | batch {args.batch} | x |\n|---|---|---|---|---|")
        for name, (b1, bn) in rows.items():
            ratios = [f"{v / b:.1f}x" if b else "" for v, b in ((b1, base[0]), (bn, base[1]))]
            print(f"| {LABELS[name]} | {b1:.1f} | {ratios[0]} | {bn:.1f} | {ratios[1]} |")
        if not args.no_compile_time and any(VARIANTS[v][1] for v in variants):
            with tempfile.TemporaryDirectory() as cache_dir:
                cold = compile_seconds(shape, args.device, cache_dir)
                warm = compile_seconds(shape, args.device, cache_dir)
            print(f"compile, float32 decode step, batch 1 (fresh process): cold {cold:.1f} s, "
                  f"warm inductor cache {warm:.1f} s")


if __name__ == "__main__":
    main()
