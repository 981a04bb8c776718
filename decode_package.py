"""generate.py --compile's decode step, compiled ahead of time into an AOTInductor package.

torch.compile repeats most of its work in every new process: with the weights folded into the
graph (decoding.COMPILE_OPTIONS) inductor's cache cannot even hold the result, so a second run of
a float32 model compiled again for about 20 s (docs/benchmarks.md). A package is compiled once,
kept in a cache folder under a digest of everything that went into it (the weights as prepared
for sampling, the model's settings, batch size, the sampling settings, torch, this code and the
CPU), and loads in about 0.1 s. package_cache.py keeps that folder whole through kills, races
and broken files, and within its size bound.

The package is the step and the sampler with the weights and the KV cache inside it:
(token, position, noise) -> next token, for a fixed batch size. A prompt goes through it one
token at a time, so it needs nothing from the model in Python once loaded.
"""
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

from cli import ToolError
from decoding import COMPILE_OPTIONS, decoder_for, inductor_options
from package_cache import PackageCache, process_alive
from sampling import candidate_count

# packaged with max_autotune, inductor's C++ GEMM templates gave stories260K wrong tokens from the
# fourth step on (torch 2.13; compiled in-process they are right). So every package is checked
# against the eager step when built, and rebuilt without max_autotune if it disagrees
CHECK_STEPS = 16

CODE_FILES = ("model.py", "decoding.py", "sampling.py", "quantize.py", "decode_package.py", "package_cache.py")

# generate.py compiles a package in the background, unasked, only for a model this large: at
# stories15M's size (15M) a 256-token story gains about 1 s a run; stories260K samples eagerly in
# well under a second, so the minute of compiling would not pay
PAYS_PARAMS = 1_000_000

# the cache folder's bound (generate.py --package_cache_mb): about 30 stories15M float32 packages
DEFAULT_CACHE_MB = 2048


def cache_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinystories_instruct", "decode")


def cpu_features() -> str:
    """The CPU's instruction sets: a package's kernels use what the CPU that built it has (AVX-512,
    AMX), so a cache folder shared with another machine must not hand them to a CPU without."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor() or platform.machine()


def package_key(model, batch, temperature, top_k, top_p) -> str:
    """A digest of everything that changes the package: the weights as prepared for sampling (a
    LoRA adapter's base, int8 and dtype included), the model's settings (context length, heads),
    the batch size, the sampling settings, torch, this code and the CPU's instruction sets."""
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    # the model's settings too: the weights do not say the context length or RoPE's frequencies
    settings = [batch, temperature, top_k, top_p if temperature else None, torch.__version__,
                sorted(COMPILE_OPTIONS.items()), cpu_features(), dataclasses.asdict(model.args),
                str(model.tok_embeddings.weight.device)]
    digest.update(json.dumps(settings, default=str).encode())
    return digest.hexdigest()[:24]


class DecodeStep(nn.Module):
    """What the package holds: the model's compiled Decoder.decode_and_pick with the sampling
    settings fixed."""

    def __init__(self, model, temperature, top_k, top_p):
        super().__init__()
        self.model, self.temperature, self.top_k, self.top_p = model, temperature, top_k, top_p

    def forward(self, token, input_pos, noise):
        return decoder_for(self.model).compiled_decode_and_pick(
            self.model, token, input_pos, self.temperature, self.top_k, self.top_p, noise if self.temperature else None)


def example_inputs(model, batch, temperature, top_k):
    device = model.tok_embeddings.weight.device
    token = torch.ones(batch, 1, dtype=torch.long, device=device)
    # greedy takes no noise: a (batch, 1) placeholder, as decoding.generate passes it
    noise = torch.ones(batch, candidate_count(model.args.vocab_size, top_k) if temperature else 1, device=device)
    return token, torch.zeros(batch, 1, dtype=torch.long, device=device), noise


def build(model, tmp, batch, temperature, top_k, top_p, options) -> bool:
    """Compile the step into the package tmp (its name must end in .pt2, the packager's rule);
    False when it disagrees with the eager step."""
    model.setup_cache(batch, model.args.max_seq_len)
    decoder_for(model).refresh_classifier()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on its own internals, not the user's business
        program = torch.export.export(DecodeStep(model, temperature, top_k, top_p).eval(),
                                      example_inputs(model, batch, temperature, top_k), strict=False)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=dict(options))
            return agrees_with_eager(PackagedStep(tmp), model, batch, temperature, top_k, top_p)
        finally:
            model.clear_cache()


@torch.inference_mode()
def agrees_with_eager(runner, model, batch, temperature, top_k, top_p) -> bool:
    """The package's picks equal the eager step's over CHECK_STEPS positions, same noise."""
    model.setup_cache(batch, model.args.max_seq_len)
    token, position, noise = example_inputs(model, batch, temperature, top_k)
    generator = torch.Generator(device=token.device).manual_seed(0)
    ours = theirs = token
    for i in range(CHECK_STEPS):
        noise = torch.empty_like(noise).exponential_(generator=generator)
        ours = runner(ours.view(batch, 1), position + i, noise).view(batch, 1)
        theirs = decoder_for(model).decode_and_pick(model, theirs, position + i, temperature, top_k, top_p,
                                                    noise if temperature else None).view(batch, 1)
        if not torch.equal(ours, theirs):
            return False
    return True


def package_cache(max_mb=DEFAULT_CACHE_MB, stream=None) -> PackageCache:
    return PackageCache(cache_folder(), None if max_mb is None else int(max_mb * 2**20), ".pt2", stream)


def cached(model, batch, temperature, top_k, top_p, max_mb=DEFAULT_CACHE_MB, stream=None):
    """The package's runner if one is in the cache for this model and these settings, else None:
    never a build."""
    cache = package_cache(max_mb, stream)
    return cache.load(package_key(model, batch, temperature, top_k, top_p), PackagedStep)


def pays_to_build(model, batch, temperature, top_k, top_p, max_mb=DEFAULT_CACHE_MB) -> bool:
    """Whether generate.py should compile this package in the background: a model large enough,
    no build running now (it may be this one), none that failed for this key before."""
    if sum(p.numel() for p in model.parameters()) < PAYS_PARAMS:
        return False
    cache = package_cache(max_mb)
    key = package_key(model, batch, temperature, top_k, top_p)
    return not cache.building() and not os.path.exists(cache.failed_marker(key))


def build_in_background(model_path, dtype, quantize, batch, temperature, top_k, top_p, max_mb=DEFAULT_CACHE_MB):
    """Start a process that, once this one has ended (so that it takes no core from this run),
    compiles the package this model and these settings would load; its id. Its messages go to
    build.log in the cache folder."""
    folder = cache_folder()
    os.makedirs(folder, exist_ok=True)
    command = [sys.executable, os.path.abspath(__file__), f"--model_path={model_path}", f"--dtype={dtype}",
               f"--quantize={quantize}", f"--batch={batch}", f"--temperature={temperature}",
               f"--top_p={top_p}", f"--max_mb={max_mb}", f"--after_pid={os.getpid()}"]
    command += [f"--top_k={top_k}"] if top_k is not None else []
    with open(os.path.join(folder, "build.log"), "a") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return process.pid


def load_or_build(model, batch, temperature, top_k, top_p, stream=None, max_mb=DEFAULT_CACHE_MB):
    """The package's runner for this model (as prepared for sampling) and these settings:
    (token, position, noise) -> (batch,) tokens, built first when the cache has none."""
    stream = stream or sys.stderr
    cache = package_cache(max_mb, stream)
    key = package_key(model, batch, temperature, top_k, top_p)

    def builder(tmp):
        print(f"compiling the decode step into {cache.path(key)}: once for this checkpoint and these settings "
              "(about a minute on 2 cores)", file=stream)
        start = time.perf_counter()
        options = inductor_options(model.tok_embeddings.weight.device)
        if not build(model, tmp, batch, temperature, top_k, top_p, options):
            print("note: the package disagreed with the eager step; compiling it again without max_autotune",
                  file=stream)
            options.pop("max_autotune", None)
            if not build(model, tmp, batch, temperature, top_k, top_p, options):
                return False
        print(f"compiled in {time.perf_counter() - start:.0f} s", file=stream)
        return True

    runner = cache.get(key, builder, PackagedStep)
    if runner is None:
        raise ToolError("the compiled decode step disagrees with the eager one; sample without --compile")
    return runner


class PackagedStep:
    """The package at path as (token, position, noise) -> (batch,) tokens.

    It is loaded by AOTInductor's C++ loader: torch._inductor.aoti_load_package first imports
    inductor and tries a newer archive layout, 2.2 s of a 3.7 s warm start against 0.08 s
    (docs/benchmarks.md). And it is called through the loader's runner with the flat list of
    inputs, not the package's __call__, which builds that list through pytree: about 40 us less
    a token, 5% of an int8 step at stories15M's shape."""

    def __init__(self, path):
        # the kernels may use AMX tiles, which Linux grants a process only once asked: without
        # this a fresh process that loads an AMX package dies on an illegal instruction
        torch.cpu._init_amx()
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        except (AttributeError, TypeError):  # a torch whose private loader differs: the public one
            from torch._inductor import aoti_load_package
            loader = aoti_load_package(path).loader
        self.run = loader.boxed_run

    def __call__(self, token, position, noise):
        return self.run([token, position, noise])[0]


def main(argv=None):
    """The background build that generate.py starts: load the model as generate.py did, wait for
    that process to end, compile."""
    import argparse
    from checkpoints import load_model
    from cli import torch_dtype
    from decoding import prepare_for_sampling
    p = argparse.ArgumentParser(description="compile a decode-step package into the cache (generate.py's helper)")
    for name, kind in [("model_path", str), ("dtype", str), ("quantize", str), ("batch", int),
                       ("temperature", float), ("top_k", int), ("top_p", float), ("max_mb", float),
                       ("after_pid", int)]:
        p.add_argument(f"--{name}", type=kind)
    args = p.parse_args(argv)
    while args.after_pid and process_alive(args.after_pid):
        time.sleep(0.2)
    os.nice(10)
    model, _ = load_model(args.model_path, device="cpu", dtype=torch_dtype(args.dtype))
    prepare_for_sampling(model, args.quantize)
    try:
        load_or_build(model, args.batch, args.temperature, args.top_k, args.top_p, sys.stdout, args.max_mb)
    except ToolError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
