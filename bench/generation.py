"""Generation speed: the KV cache against recomputing the whole context every step.

    python bench/generation.py                      # CPU, float32 and bfloat16
    python bench/generation.py --device=cuda        # on a GPU
    python bench/generation.py --profile            # where the cached decode step spends its time

A stories15M-shaped model (dim 288, 6 layers, 6 heads, vocab 32000, context 256) with random
weights: speed does not depend on what the weights say. Greedy decoding with no stop ids, so
every run makes exactly --new_tokens tokens from a 1-token prompt. Each figure is the best of
--repeats runs after a warm-up run.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stories15M_shaped(device, dtype):
    torch.manual_seed(0)
    args = ModelArgs(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                     multiple_of=32, max_seq_len=256)
    return Transformer(args).to(device=device, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(model, batch, new_tokens, use_cache, device):
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)  # BOS
    sync(device)
    start = time.perf_counter()
    steps = list(model.generate(prompt, new_tokens, temperature=0.0, stop_ids=(), use_cache=use_cache))
    sync(device)
    seconds = time.perf_counter() - start
    assert len(steps) == new_tokens, f"made {len(steps)} tokens, expected {new_tokens}"
    return seconds


def best_tokens_per_s(model, batch, new_tokens, use_cache, device, repeats):
    run_once(model, batch, min(new_tokens, 16), use_cache, device)  # warm-up: allocator, kernels
    seconds = min(run_once(model, batch, new_tokens, use_cache, device) for _ in range(repeats))
    return batch * new_tokens / seconds


def profile_decode(model, device, new_tokens):
    """Operator-level profile of one cached batch-1 generation."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run_once(model, 1, 16, True, device)
    with profile(activities=activities) as prof:
        run_once(model, 1, new_tokens, True, device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched cached run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    p.add_argument("--profile", action="store_true", help="also profile one cached batch-1 run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads")
          + f", {args.new_tokens} new tokens from a 1-token prompt, best of {args.repeats}")
    header = f"{'dtype':<9} {'no cache b1':>12} {'cache b1':>10} {'ratio':>7} {f'cache b{args.batch}':>10}"
    rows = []
    for name in args.dtypes.split(","):
        model = stories15M_shaped(device, DTYPES[name])
        plain = best_tokens_per_s(model, 1, args.new_tokens, False, device, args.repeats)
        cached = best_tokens_per_s(model, 1, args.new_tokens, True, device, args.repeats)
        batched = best_tokens_per_s(model, args.batch, args.new_tokens, True, device, args.repeats)
        rows.append(f"{name:<9} {plain:>12.1f} {cached:>10.1f} {cached / plain:>6.1f}x {batched:>10.1f}")
        if args.profile:
            profile_decode(model, device, args.new_tokens)
    print("tokens/s (batch 8: all samples' tokens together)")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
