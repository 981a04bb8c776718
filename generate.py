"""Sample stories from any checkpoint the loader reads.

    python generate.py --model_path=out/ckpt.pt --prompt="Once upon a time"
    python generate.py --model_path=out/instruct/ckpt.pt --verb=climb --noun=ring --adjective=messy --features=dialogue
    python generate.py --model_path=stories15M.pt --quantize=int8   # fastest on a CPU

An instruct model is prompted as its data was (the prompt format its checkpoint or export
records); --instruct and --prompt_encoding say it for a file made elsewhere.

On a CPU the decode step runs compiled when a compiled one is in the cache for this checkpoint
and these settings; otherwise this run samples eagerly and, for a model large enough to gain
(stories15M's size), compiles one in the background for the next run (--compile waits for it
instead, --no-compile samples eagerly and compiles nothing).
"""
import argparse
import sys
import time

import torch

import decode_package
from cli import (DTYPE_NAMES, OneLineParser, ToolError, UsageError, check_device, default_device, greedy_if_tiny,
                 report_error, run_main)
from decoding import check_prompt_length, load_for_sampling, sample_stories
from prompts import PROMPT_ENCODINGS, build_prompt, override_prompt_format, prompt_ids


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint: .pt, llama2.c .bin, LoRA adapter")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from BOS alone")
    p.add_argument("--verb", help="with --noun and --adjective: build the instruction prompt")
    p.add_argument("--noun")
    p.add_argument("--adjective")
    p.add_argument("--features", default="", help="comma-separated, e.g. dialogue,badending")
    p.add_argument("--temperature", type=float, default=0.5, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=10, help="draw from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=1.0, help="then from those holding this much of the mass")
    p.add_argument("--max_new_tokens", type=int, help="as many as the model's context leaves when unset")
    p.add_argument("--num_samples", type=int, default=1, help="sampled together as one batch")
    p.add_argument("--seed", type=int, default=1337, help="the same seed samples the same story")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the checkpoint's own)")
    add_prompt_format_args(p)
    p.add_argument("--device", default=default_device(), help="cpu, cuda, mps")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="the weights' type")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 matmuls, quantized at load time")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="on a CPU, the decode step and the sampler compiled ahead of time (an AOTInductor package "
                        "in ~/.cache/tinystories_instruct/decode): 2.3x (float32) to 4x (int8) the eager tokens/s. "
                        "Unset: use one if cached, else sample eagerly and build one in the background for the "
                        "next run; --compile: build it now if missing (about a minute on 2 cores) and wait; "
                        "--no-compile: always eager")
    p.add_argument("--package_cache_mb", type=float, default=decode_package.DEFAULT_CACHE_MB,
                   help="bound on the compiled packages' cache folder; the least recently used go first")
    p.add_argument("--no_kv_cache", action="store_true", help="recompute the whole context each step")
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the module's docstring as written."""


def add_prompt_format_args(p):
    p.add_argument("--instruct", action=argparse.BooleanOptionalAction, default=None,
                   help="override the model's recorded prompt format: an instruct model reads the prompt, "
                        "then BOS (default: as the checkpoint records; for files made elsewhere)")
    p.add_argument("--prompt_encoding", choices=PROMPT_ENCODINGS,
                   help="override how an instruct prompt is tokenized (implies --instruct)")


def model_prompt_format(ckpt, instruct=None, encoding=None) -> dict:
    """The checkpoint's prompt format (prompts.prompt_format), with --instruct/--prompt_encoding over it."""
    try:
        return override_prompt_format(ckpt.prompt_format, instruct, encoding)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def decode_step_package(args, model):
    """The compiled package's runner for this run, or None (sample eagerly): see the docstring."""
    if args.compile is False or args.no_kv_cache or torch.device(args.device).type != "cpu":
        return None
    settings = (model, args.num_samples, args.temperature, args.top_k if args.temperature else None, args.top_p)
    if args.compile:
        return decode_package.load_or_build(*settings, max_mb=args.package_cache_mb)
    package = decode_package.cached(*settings, max_mb=args.package_cache_mb)
    if package is None and decode_package.pays_to_build(model, *settings[1:], max_mb=args.package_cache_mb):
        pid = decode_package.build_in_background(args.model_path, args.dtype, args.quantize, *settings[1:],
                                                 max_mb=args.package_cache_mb)
        print(f"note: sampling eagerly; compiling a faster decode step in the background for the next run "
              f"(process {pid}, about a minute on 2 cores; --no-compile builds none)", file=sys.stderr)
    return package


def check_sampling_args(temperature, top_k, top_p, max_new_tokens=1, num_samples=1):
    if temperature < 0:
        raise UsageError(f"--temperature={temperature}: expected a number >= 0")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top_k={top_k}: expected an integer >= 1")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top_p={top_p}: expected a number in (0, 1]")
    if max_new_tokens < 1 or num_samples < 1:
        raise UsageError("--max_new_tokens and --num_samples must be >= 1")


def prompt_text(args) -> str:
    words = (args.verb, args.noun, args.adjective)
    if not any(words):
        if args.features:
            raise UsageError("--features needs --verb, --noun and --adjective")
        return args.prompt
    if not all(words):
        raise UsageError("--verb, --noun and --adjective go together: give all three")
    if args.prompt:
        raise UsageError("give either --prompt or --verb/--noun/--adjective, not both")
    try:
        return build_prompt(*words, [f for f in args.features.split(",") if f.strip()])
    except ValueError as exc:
        raise UsageError(f"--features: {exc}") from None


def check_fast_path_args(compile, no_kv_cache=False):
    if compile and no_kv_cache:
        raise UsageError("--compile compiles the KV-cache decode step: drop --no_kv_cache")


class TextStream:
    """Prints one sample's story as its tokens arrive. sentencepiece only knows where spaces go
    from context, so the text so far is decoded again and only its new end is printed."""

    def __init__(self, tokenizer, prefix_ids):
        self.tokenizer, self.ids, self.stopped = tokenizer, list(prefix_ids), False
        self.stop_ids = (tokenizer.bos_id, tokenizer.eos_id)
        self.text = tokenizer.decode(self.ids)

    def __call__(self, step_tokens):
        self.stopped = self.stopped or step_tokens[0] in self.stop_ids
        if not self.stopped:
            self.ids.append(step_tokens[0])
            text = self.tokenizer.decode(self.ids)
            print(text[len(self.text):], end="", flush=True)
            self.text = text


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p,
                            1 if args.max_new_tokens is None else args.max_new_tokens, args.num_samples)
        args.temperature = greedy_if_tiny(args.temperature)
        check_fast_path_args(args.compile, args.no_kv_cache)
        check_device(args.device)
        text = prompt_text(args)
        model, ckpt, tokenizer = load_for_sampling(args.model_path, args.tokenizer, args.device,
                                                   args.dtype, args.quantize)
        prompt_format = model_prompt_format(ckpt, args.instruct, args.prompt_encoding)
        instruct = prompt_format["is_instruct"]
        ids = prompt_ids(tokenizer, text, instruct, prompt_format["prompt_encoding"])
        check_prompt_length(model, [ids])  # before the prompt is echoed: a refused one prints nothing
        room = model.args.max_seq_len - len(ids) + 1  # what decoding.generate leaves after the prompt
        max_new_tokens = room if args.max_new_tokens is None else args.max_new_tokens
        if room < max_new_tokens:
            print(f"note: --max_new_tokens={max_new_tokens} is capped at {room}: the prompt takes {len(ids)} "
                  f"of the model's {model.args.max_seq_len}-token context", file=sys.stderr)
        # a plain model's output continues the prompt, so show it; an instruct prompt is not story
        shown = [] if instruct else ids
        stream = TextStream(tokenizer, shown) if args.num_samples == 1 else None
        if stream and not instruct and text:
            print(stream.text, end="", flush=True)
        package = decode_step_package(args, model)
        start = time.perf_counter()
        samples = sample_stories(model, tokenizer, [ids] * args.num_samples, max_new_tokens,
                                 args.temperature, args.top_k, args.top_p, args.seed,
                                 use_cache=not args.no_kv_cache, on_token=stream, compile=bool(args.compile),
                                 package=package)
        seconds = time.perf_counter() - start
    except ToolError as exc:  # usage errors (the loader's and the tokenizer's too), a package that fails its check
        return report_error(exc)
    if args.num_samples == 1:
        print()
    else:
        for i, tokens in enumerate(samples):
            print(f"--- sample {i + 1}\n{tokenizer.decode(shown + tokens)}")
    n_tokens = sum(len(s) for s in samples)
    print(f"generated {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s, "
          f"{args.num_samples} sample{'s' if args.num_samples > 1 else ''}, {args.device}, {args.dtype}"
          + (", int8 weights" if args.quantize == "int8" else "") + (", compiled" if args.compile or package else "") + ")",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
