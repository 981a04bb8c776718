"""Generation speed: no cache, the eager KV cache, and the compiled decode step in float32,
bfloat16 and int8, at batch 1 and batch 8, side by side in one run.

    python bench/generation.py                        # stories15M shape, CPU, the whole table
    python bench/generation.py --shapes=110M          # stories110M shape (slow: minutes)
    python bench/generation.py --variants=eager,f32   # some variants only
    python bench/generation.py --device=cuda          # on a GPU
    python bench/generation.py --profile              # where the eager cached step spends its time
    python bench/generation.py --llama2c=../llama2.c   # with llama2.c's run.c and runq.c beside ours
    python bench/generation.py --levers               # each inductor setting of the compiled step, alone
    python bench/generation.py --default_flags --llama2c=../llama2.c   # generate.py as a user runs it

Random weights in the published shapes (speed does not depend on what the weights say):
stories15M (dim 288, 6 layers, 6 heads, hidden 768, vocab 32000, context 256) and stories110M
(dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000, context 1024). Greedy decoding with no
stop ids, so every run makes exactly --new_tokens tokens from a 1-token prompt, through
`decoding.generate` (the path generate.py takes, with the weights prepared as
`decoding.prepare_for_sampling` does). Each figure is the best of --repeats runs after a
warm-up run (which, for a compiled variant, compiles; the package variants, generate.py
--compile's AOTInductor package, are built first and not timed). Start-up is measured in fresh processes,
from the process's start (import torch included) to its first compiled token: "cold" with an
empty inductor cache, "warm" with the cache the cold one left; for a package, cold builds it and
warm loads it, as a first and a second `generate.py --compile` would (the model here is made with
random weights, not read from a checkpoint).

With --llama2c=DIR (a checkout of karpathy/llama2.c; fetch it, never commit it), run.c and runq.c
are built with -Ofast -fopenmp -march=native and run on the same weights, exported to a version-0
.bin and a Q8_0 .bin, greedy, 256 tokens, each the best of --repeats; their own "achieved tok/s".

With --default_flags, `generate.py` with no flag but the model's paths, as whole commands (its
start-up included) for one 256-token story: the first run (no package yet: it samples eagerly
and starts the package's build in the background), then, once that build is done, --repeats
second runs, each beside a run of llama2.c's run.c on the same weights (its default top-p
sampling at generate.py's temperature 0.5; 256 tokens each).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import decode_package  # noqa: E402
import decoding  # noqa: E402  (its COMPILE_OPTIONS are varied by --levers)
from decoding import fuse_projections, generate  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from checkpoints import save_checkpoint  # noqa: E402
from checkpoints.llama2c import write_llama2c_q8, write_llama2c_v0  # noqa: E402
from quantize import quantize_int8  # noqa: E402

SHAPES = {"15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
          "110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024)}
# name: (use_cache, compile, dtype, quantize)
VARIANTS = {"nocache": (False, False, torch.float32, None),
            "eager": (True, False, torch.float32, None),
            "f32": (True, True, torch.float32, None),
            "bf16": (True, True, torch.bfloat16, None),
            "int8": (True, True, torch.float32, "int8"),
            "f32pkg": (True, "package", torch.float32, None),
            "bf16pkg": (True, "package", torch.bfloat16, None),
            "int8pkg": (True, "package", torch.float32, "int8")}
LABELS = {"nocache": "no cache, float32", "eager": "KV cache, eager, float32",
          "f32": "compiled, float32", "bf16": "compiled, bfloat16", "int8": "compiled, int8 weights",
          "f32pkg": "package (generate.py --compile), float32", "bf16pkg": "package, bfloat16",
          "int8pkg": "package, int8 weights"}


def make_model(shape, device, dtype, quantize=None, fuse=True):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPES[shape], vocab_size=32000)).to(device=device, dtype=dtype).eval()
    if fuse:
        fuse_projections(model)
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
    if compile == "package":  # decode_package's runner, built once per batch size (not timed)
        runners = model.__dict__.setdefault("bench_packages", {})
        if batch not in runners:
            runners[batch] = decode_package.load_or_build(model, batch, 0.0, None, 1.0, stream=open(os.devnull, "w"))
        sync(device)
        start = time.perf_counter()
        steps = list(generate(model, prompt, new_tokens, temperature=0.0, stop_ids=(), package=runners[batch]))
    else:
        steps = list(generate(model, prompt, new_tokens, temperature=0.0, stop_ids=(), use_cache=use_cache,
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


# --levers: the compiled decode step's inductor settings (decoding.COMPILE_OPTIONS), added one at a time
LEVERS = {"inductor's defaults": {},
          "+ cpp_wrapper": {"cpp_wrapper": True},
          "+ freezing": {"cpp_wrapper": True, "freezing": True},
          "+ max_autotune (the default)": dict(decoding.COMPILE_OPTIONS),
          # an OpenMP region costs microseconds, as much as a decode step's small loops take
          "+ loops under 4096 elements serial": dict(decoding.COMPILE_OPTIONS, **{"cpp.min_chunk_size": 4096}),
          "+ generated kernels on 1 thread (matmuls keep 2)": dict(decoding.COMPILE_OPTIONS, **{"cpp.threads": 1})}


def lever_table(shape, device, new_tokens, repeats, variants):
    print(f"\nstories{shape} shape, batch 1, {new_tokens} new tokens, tokens/s of the compiled step with "
          f"each set of inductor settings")
    names = [v for v in variants if VARIANTS[v][1] is True]
    print("| settings | " + " | ".join(LABELS[v] for v in names) + " |\n|---" * 1 + "|---" * len(names) + "|")
    default = dict(decoding.COMPILE_OPTIONS)
    try:
        for label, options in LEVERS.items():
            decoding.COMPILE_OPTIONS.clear()
            decoding.COMPILE_OPTIONS.update(options)
            rates = []
            for name in names:
                _, _, dtype, quantize = VARIANTS[name]
                model = make_model(shape, device, dtype, quantize)
                rates.append(tokens_per_s(model, 1, new_tokens, True, True, device, repeats))
                del model
                torch.compiler.reset()
            print(f"| {label} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")
    finally:
        decoding.COMPILE_OPTIONS.clear()
        decoding.COMPILE_OPTIONS.update(default)


def startup_seconds(shape, variant, device, cache_dir):
    """Seconds from a fresh process's start to its first compiled token (cold or warm
    depending on what cache_dir holds: inductor's cache, or the packages)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, XDG_CACHE_HOME=cache_dir)
    started = time.time()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--shapes={shape}", f"--variants={variant}",
                          f"--device={device}", "--_first_token"], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) - started


def print_first_token_time(shape, variant, device):
    _, compile, dtype, quantize = VARIANTS[variant]
    model = make_model(shape, device, dtype, quantize)
    prompt = torch.ones(1, 1, dtype=torch.long, device=device)
    if compile == "package":  # built (cold) or loaded (warm) as generate.py --compile does
        package = decode_package.load_or_build(model, 1, 0.0, None, 1.0, stream=open(os.devnull, "w"))
        steps = generate(model, prompt, 2, temperature=0.0, package=package)
    else:
        steps = generate(model, prompt, 2, temperature=0.0, compile=True)
    next(steps), next(steps)  # the prompt's token, then the first one after it
    sync(device)
    print(time.time())


def llama2c_tokens_per_s(llama2c_dir, shape, new_tokens, repeats):
    """{"run.c": tok/s, "runq.c": tok/s} on make_model's float32 weights, built and run here."""
    model = make_model(shape, torch.device("cpu"), torch.float32, fuse=False)
    state = {k: v for k, v in model.state_dict().items()}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for program, writer in (("run", write_llama2c_v0), ("runq", write_llama2c_q8)):
            binary, weights = os.path.join(tmp, program), os.path.join(tmp, program + ".bin")
            subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", os.path.join(llama2c_dir, program + ".c"),
                            "-lm", "-o", binary], check=True)
            writer(weights, model.args, state)
            rates = []
            for _ in range(repeats):
                out = subprocess.run([binary, weights, "-t", "0", "-n", str(new_tokens), "-i", "",
                                      "-z", os.path.join(llama2c_dir, "tokenizer.bin")],
                                     capture_output=True, text=True, check=True)
                rates.append(float(re.search(r"achieved tok/s: ([0-9.]+)", out.stderr).group(1)))
            result[program + ".c"] = max(rates)
    return result


def default_flag_commands(llama2c_dir, shape, repeats):
    """Seconds of whole generate.py commands with default flags (first, then second runs) and of
    run.c's beside each second run."""
    model = make_model(shape, torch.device("cpu"), torch.float32, fuse=False)
    state = {k: v for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, weights, binary = (os.path.join(tmp, name) for name in ("model.pt", "model.bin", "run"))
        save_checkpoint(checkpoint, {"model": state, "model_args": vars(model.args), "config": {}})
        write_llama2c_v0(weights, model.args, state)
        subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", os.path.join(llama2c_dir, "run.c"),
                        "-lm", "-o", binary], check=True)
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(tmp, "cache"))
        ours = [sys.executable, os.path.join(ROOT, "generate.py"), f"--model_path={checkpoint}",
                f"--tokenizer={os.path.join(llama2c_dir, 'tokenizer.model')}"]
        theirs = [binary, weights, "-t", "0.5", "-n", "256", "-z", os.path.join(llama2c_dir, "tokenizer.bin")]

        def seconds(command):
            start = time.perf_counter()
            subprocess.run(command, env=env, capture_output=True, check=True)
            return time.perf_counter() - start
        first = seconds(ours)
        folder = os.path.join(tmp, "cache", "tinystories_instruct", "decode")
        deadline = time.time() + 900
        while not any(name.endswith(".pt2") and not name.startswith(".") for name in os.listdir(folder)):
            if time.time() > deadline:
                raise SystemExit("the background build did not finish in 15 minutes")
            time.sleep(1)
        pairs = [(seconds(ours), seconds(theirs)) for _ in range(repeats)]
    print(f"\ngenerate.py with default flags, one 256-token story, whole command, stories{shape} shape: "
          f"first run {first:.2f} s (eager, starts the background build)")
    print("| second run | generate.py | run.c | ratio |\n|---|---|---|---|")
    for i, (a, b) in enumerate(pairs):
        print(f"| {i + 1} | {a:.2f} s | {b:.2f} s | {a / b:.2f}x |")


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
    p.add_argument("--no_compile_time", action="store_true", help="skip the cold/warm start-up timing")
    p.add_argument("--llama2c", help="a llama2.c checkout: build and time its run.c and runq.c beside ours")
    p.add_argument("--profile", action="store_true", help="also profile one eager cached batch-1 run")
    p.add_argument("--levers", action="store_true", help="only the table of inductor settings (decoding.COMPILE_OPTIONS)")
    p.add_argument("--default_flags", action="store_true",
                   help="only generate.py's whole commands with default flags, first and second run (needs --llama2c)")
    p.add_argument("--_first_token", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown shape or variant: {', '.join(unknown)}")
    if args._first_token:
        return print_first_token_time(shapes[0], variants[0], device)
    if args.default_flags:
        if not args.llama2c:
            p.error("--default_flags needs --llama2c (its tokenizer and run.c)")
        return default_flag_commands(args.llama2c, shapes[0], args.repeats)
    if any(VARIANTS[v][1] == "package" for v in variants):  # the packages go to a folder of the bench's own
        packages = tempfile.TemporaryDirectory()
        os.environ["XDG_CACHE_HOME"] = packages.name

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads")
          + f", greedy from a 1-token prompt, best of {args.repeats}"
          + (", wq/wk/wv and w1/w3 separate" if args.no_fuse else ""))
    for shape in shapes:
        new_tokens = args.new_tokens_110M if shape == "110M" else args.new_tokens
        if args.levers:
            lever_table(shape, device, new_tokens, args.repeats, variants)
            continue
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
        theirs = llama2c_tokens_per_s(args.llama2c, shape, new_tokens, args.repeats) if args.llama2c else {}
        base = rows.get("nocache", [None, None])
        print(f"\nstories{shape} shape, {new_tokens} new tokens; tokens/s (batch {args.batch}: all "
              f"samples' tokens together); x: against no cache at the same batch size"
              + ("; against llama2.c's run.c and runq.c at batch 1" if theirs else ""))
        extra = [f"vs {name}" for name in theirs]
        print(f"| variant | batch 1 | x | batch {args.batch} | x | " + " | ".join(extra) + " |")
        print("|---" * (5 + len(extra)) + "|")
        for name, (b1, bn) in rows.items():
            ratios = [f"{v / b:.1f}x" if b else "" for v, b in ((b1, base[0]), (bn, base[1]))]
            versus = [f"{b1 / rate:.2f}x" for rate in theirs.values()]
            print(f"| {LABELS[name]} | {b1:.1f} | {ratios[0]} | {bn:.1f} | {ratios[1]} | " + " | ".join(versus) + " |")
        for name, rate in theirs.items():
            print(f"| llama2.c {name} ({'float32' if name == 'run.c' else 'Q8_0'}) | {rate:.1f} | | | | "
                  + " | ".join(f"{rate / other:.2f}x" for other in theirs.values()) + " |")
        if not args.no_compile_time:
            for name in (v for v in variants if VARIANTS[v][1]):
                with tempfile.TemporaryDirectory() as cache_dir:
                    cold = startup_seconds(shape, name, args.device, cache_dir)
                    warm = startup_seconds(shape, name, args.device, cache_dir)
                kept = "the package built" if VARIANTS[name][1] == "package" else "warm inductor cache"
                print(f"start-up to the first compiled token, {LABELS[name]}, batch 1 (fresh process): "
                      f"cold {cold:.1f} s, {kept} {warm:.1f} s")


if __name__ == "__main__":
    main()
