"""Evaluate a checkpoint: validation loss and perplexity, and how well it follows instructions.

    # loss on pretokenized shards, instruct shards, or a text file of <|endoftext|>-separated stories
    python evaluate.py --model_path=out/ckpt.pt --data=data/tok4096
    python evaluate.py --model_path=stories260K.pt --data=tinystories_valid_head.txt
    # instruction following on 100 held-out prompts (word triples never seen in training)
    python evaluate.py --model_path=out/demo/instruct/ckpt.pt --num_prompts=100 \
        --held_out_from=out/demo/data --report=out/demo/eval.json

Instruction following: story_requests.py says what a prompt asks and how a story is scored
(words, features, and coherence.py's checks).

Prompts are laid out and encoded as the checkpoint's prompt format says (its data's, recorded in
the checkpoint and every export); --compare asks every model the same token sequences, and
--prompt_encoding / --instruct override the record for files made elsewhere.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

import decode_package
from cli import progress as tqdm  # a plain line every 10% when the output is a log file
from cli import (DTYPE_NAMES, OneLineParser, UsageError, check_device, check_output, default_device, is_json_with,
                 greedy_if_tiny, positive_int, report_error, run_main, write_json)
from data_paths import LLAMA2_VOCAB_SIZE
from dataset import InstructRows, check_token_ids, open_token_shard
from decoding import load_for_sampling, sample_stories
from generate import add_prompt_format_args, check_sampling_args, model_prompt_format
from prompts import prompt_format, prompt_ids
from story_requests import held_out_requests, requests_from_file, requests_from_shard, score_story, seen_word_triples

STORY_SEPARATOR = "<|endoftext|>"
REPORT_KEYS = ("model_path", "compare")  # an earlier report of ours holds one of them: --report may replace it


# ---- validation loss -------------------------------------------------------------------------

@torch.no_grad()
def mean_loss(model, batches) -> tuple:
    """Token-weighted mean cross entropy over (x, y) batches; y = -1 is not scored."""
    total, count = 0.0, 0
    device = model.tok_embeddings.weight.device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        n = int((y != -1).sum())
        if n:
            total += float(model(x, y)[1]) * n
            count += n
    if not count:
        raise UsageError("no tokens to evaluate the loss on")
    return total / count, count


def stream_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int):
    """Non-overlapping windows of seq_len + 1 tokens from a token stream (targets shifted by one)."""
    n_windows = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    for start in range(0, n_windows, batch_size):
        rows = [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64)
                for i in range(start, min(start + batch_size, n_windows))]
        block = torch.from_numpy(np.stack(rows))
        yield block[:, :-1], block[:, 1:]


def instruct_batches(tokens_path: str, seq_len: int, batch_size: int, max_examples: int, vocab_size=None):
    """Instruct rows with train.py's own mask: only BOS, story and EOS are scored."""
    rows = InstructRows(os.path.dirname(tokens_path), [tokens_path], seq_len, vocab_size)
    n = min(len(rows), max_examples)
    for start in range(0, n, batch_size):
        yield rows.get(np.arange(start, min(start + batch_size, n)), "cpu")


def text_file_tokens(path: str, tokenizer) -> np.ndarray:
    """Stories separated by <|endoftext|> lines, each stripped and encoded with BOS, as
    tinystories.py pretokenize does, then concatenated."""
    try:
        with open(path, encoding="utf-8") as f:
            stories = [s.strip() for s in f.read().split(STORY_SEPARATOR)]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--data={path}: not a readable UTF-8 text file ({exc})") from None
    ids = [tok for s in stories if s for tok in tokenizer.encode(s, bos=True)]
    return np.array(ids, dtype=np.int64)


def check_data_vocabulary(data: str, vocab_size: int):
    """Shards of another tokenizer can hold only ids the model knows (tok400 data, vocab 512), and
    then give a plausible, meaningless loss. The folder says which tokenizer wrote them: tok{N}/
    (N = 0: Llama 2's 32000) and instruct{N}/, whose meta.json records its vocab_size too."""
    folder = data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
    match = re.fullmatch(r"(tok|instruct)(\d+)", os.path.basename(os.path.normpath(folder)))
    if not match:
        return
    written_for = int(match.group(2)) or LLAMA2_VOCAB_SIZE
    meta_path = os.path.join(folder, "meta.json")
    if match.group(1) == "instruct" and os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                written_for = int(json.load(f).get("vocab_size", written_for))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    if written_for != vocab_size:
        raise UsageError(f"--data={data}: tokenized for a vocabulary of {written_for} ({os.path.basename(folder)}/), "
                         f"but the model's has {vocab_size}; its loss would mean nothing")


def evaluate_loss(model, tokenizer, data: str, batch_size: int, max_tokens: int) -> dict:
    seq_len = model.args.max_seq_len
    check_data_vocabulary(data, model.args.vocab_size)
    if os.path.isdir(data):  # a shard folder: its validation shard, data00
        candidates = sorted(glob.glob(os.path.join(data, "*.tokens.npy"))) or sorted(glob.glob(os.path.join(data, "*.bin")))
        if not candidates:
            raise UsageError(f"--data={data}: folder holds no .bin or .tokens.npy shards")
        data = candidates[0]
    if not os.path.isfile(data):
        raise UsageError(f"--data={data}: no such file or folder")
    if data.endswith(".tokens.npy"):
        batches = instruct_batches(data, seq_len, batch_size, max(1, max_tokens // seq_len), model.args.vocab_size)
    elif data.endswith(".bin"):
        shard = open_token_shard(data)
        check_token_ids(data, shard, model.args.vocab_size)
        batches = stream_batches(shard, seq_len, batch_size, max_tokens)
    elif data.endswith(".txt"):
        batches = stream_batches(text_file_tokens(data, tokenizer), seq_len, batch_size, max_tokens)
    else:
        raise UsageError(f"--data={data}: expected a shard folder, a .bin or .tokens.npy shard, or a .txt file")
    loss, n_tokens = mean_loss(model, batches)
    return {"val_loss": loss, "perplexity": math.exp(loss), "loss_tokens": n_tokens, "loss_data": data}


# ---- instruction following -------------------------------------------------------------------

def evaluation_prompt_format(formats, instruct=None, encoding=None) -> dict:
    """The one prompt format every evaluated model is asked in, so that --compare scores them all
    on the same token sequences: instruct prompts (unless --no-instruct), encoded as
    --prompt_encoding says, else as the instruct models among them were trained (plain if none is);
    models trained on different encodings need --prompt_encoding to say which."""
    if instruct is False:
        if encoding:
            raise UsageError("--prompt_encoding says how an instruct prompt is encoded: drop --no-instruct")
        return prompt_format(False)
    if encoding is None:
        encodings = sorted({f["prompt_encoding"] for f in formats if f["is_instruct"]})
        if len(encodings) > 1:
            raise UsageError(f"the models were trained on prompts encoded {' and '.join(encodings)}; pass "
                             f"--prompt_encoding to score them all on the same prompts")
        encoding = encodings[0] if encodings else "plain"
    return prompt_format(True, encoding)


# evaluate.py compiles the decode step by default (--compile unset) when prompts x parameters reach
# this: about 330 prompts of a stories15M-sized model. Below it the compile (about 20 s on 2 cores)
# costs more than it saves (docs/benchmarks.md)
AUTO_COMPILE_WORK = 5e9


def compile_by_default(model, n_requests: int) -> bool:
    n_params = sum(p.numel() for p in model.parameters())
    return model.tok_embeddings.weight.device.type == "cpu" and n_requests * n_params >= AUTO_COMPILE_WORK


def run_requests(model, tokenizer, requests, fmt, max_new_tokens, temperature, top_k,
                 top_p, seed, compile=None, results=None, batch_size=16):
    """Sample one story per request, its prompt laid out and encoded as fmt (prompts.prompt_format)
    says, batch_size prompts at a time through generate.py's path. Prompts of any lengths share a
    batch, so a compiled decode step (compile; None: compile_by_default) serves them all with one
    graph: the last batch is filled up with copies of its last prompt. Each batch's results are
    appended to `results` as it finishes: a Ctrl-C keeps them."""
    package = None
    if compile is None:  # as generate.py: a package built before (same batch and settings) is used as is
        if model.tok_embeddings.weight.device.type == "cpu":
            package = decode_package.cached(model, batch_size, temperature, top_k if temperature else None, top_p)
        compile = package is not None or compile_by_default(model, len(requests))
    encoded = [(request, prompt_ids(tokenizer, request.prompt, fmt["is_instruct"], fmt["prompt_encoding"]))
               for request in requests]
    encoded.sort(key=lambda pair: len(pair[1]))  # similar lengths together: less padding to prefill
    longest = len(encoded[-1][1]) if encoded else 0
    room = model.args.max_seq_len - longest + 1  # what model.generate leaves the longest prompt
    if 0 < room < max_new_tokens:
        print(f"note: --max_new_tokens={max_new_tokens} is capped at {room} for the longest prompts "
              f"({longest} tokens of the model's {model.args.max_seq_len}-token context)", file=sys.stderr)
    results = [] if results is None else results
    with tqdm(total=len(requests), desc="sampling stories", unit="story") as bar:
        for number, start in enumerate(range(0, len(encoded), batch_size)):
            batch = encoded[start:start + batch_size]
            prompts = [ids for _, ids in batch]
            if compile:
                prompts += [prompts[-1]] * (batch_size - len(batch))
            tokens = sample_stories(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p,
                                    seed + number, compile=compile, package=package)
            for (request, _), story_tokens in zip(batch, tokens):
                story = tokenizer.decode(story_tokens)
                results.append({**asdict(request), "story": story, "n_tokens": len(story_tokens),
                                "hit_max_new_tokens": len(story_tokens) >= max_new_tokens,
                                **score_story(story, request)})
            bar.update(len(batch))
    return results


def summarize(results: list) -> dict:
    def share(key, rows):
        return sum(r[key] for r in rows) / len(rows) if rows else None
    dialogue_rows = [r for r in results if "dialogue" in r]
    word_hits = sum(r["verb_used"] + r["noun_used"] + r["adjective_used"] for r in results)
    return {"n_prompts": len(results),
            "word_rate": word_hits / (3 * len(results)),
            "verb_rate": share("verb_used", results), "noun_rate": share("noun_used", results),
            "adjective_rate": share("adjective_used", results),
            "all_words_rate": share("all_words", results),
            "n_dialogue_prompts": len(dialogue_rows),
            "dialogue_rate": share("dialogue", dialogue_rows),
            "hero_kept_rate": share("hero_kept", results),
            "words_well_formed_rate": share("words_well_formed", results),
            "pronouns_agree_rate": share("pronouns_agree", [r for r in results if r["pronouns_agree"] is not None]),
            "avg_story_words": sum(len(r["story"].split()) for r in results) / len(results),
            "hit_max_new_tokens_rate": share("hit_max_new_tokens", results)}


TABLE_ROWS = [("validation loss", "val_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
              ("prompts", "n_prompts", "{}"), ("requested words used", "word_rate", "{:.1%}"),
              ("  verb / noun / adjective", None, None), ("stories with all three", "all_words_rate", "{:.1%}"),
              ("dialogue when asked", "dialogue_rate", "{:.1%}"), ("hero keeps their name", "hero_kept_rate", "{:.1%}"),
              ("requested words well formed", "words_well_formed_rate", "{:.1%}"),
              ("pronouns agree with the hero", "pronouns_agree_rate", "{:.1%}"), ("average story (words)", "avg_story_words", "{:.1f}"),
              ("hit max_new_tokens", "hit_max_new_tokens_rate", "{:.1%}")]


def table_cell(report: dict, key, fmt) -> str:
    if key is None and "verb_rate" in report:
        return " / ".join(f"{report[k]:.1%}" for k in ("verb_rate", "noun_rate", "adjective_rate"))
    if key in report and report[key] is not None:
        return fmt.format(report[key])
    return ""


def headline(report: dict) -> str:
    """The instruction-following and coherence rates of one report, for the summary line."""
    rates = [("all three words", "all_words_rate"), ("hero kept", "hero_kept_rate"),
             ("words well formed", "words_well_formed_rate"), ("pronouns agree", "pronouns_agree_rate")]
    return ", ".join(f"{label} {report[key]:.0%}" for label, key in rates if report.get(key) is not None)


def print_table(reports: list):
    """A markdown table: one metric a row, one column per evaluated checkpoint."""
    heads = ["value"] if len(reports) == 1 else [r["model_path"] for r in reports]
    print("\n| metric | " + " | ".join(heads) + " |")
    print("|" + "---|" * (len(heads) + 1))
    for label, key, fmt in TABLE_ROWS:
        cells = [table_cell(r, key, fmt) for r in reports]
        if any(cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


def evaluate_checkpoint(loaded, args, requests, report_extra, fmt, partial=None) -> dict:
    """Loss and/or instruction following of one loaded checkpoint, as a report dict. While it
    samples, the report in progress sits in `partial`."""
    partial = [] if partial is None else partial
    model, ckpt, tokenizer = loaded
    report = {"model_path": ckpt.path, "tokenizer": tokenizer.model_path, **report_extra}
    data = args.data or ckpt.training_data  # without --data: the validation shard it was trained beside
    if data:
        if not args.data:
            print(f"loss on {data}, the checkpoint's data (--data for another)", file=sys.stderr)
        report.update(evaluate_loss(model, tokenizer, data, args.batch_size, args.max_tokens))
    if requests:
        report["prompt_format"] = fmt
        report["sampling"] = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "max_new_tokens", "seed")}
        report["samples"] = []
        partial.append(report)  # from here on a Ctrl-C keeps what was sampled
        results = run_requests(model, tokenizer, requests, fmt, args.max_new_tokens, args.temperature,
                               args.top_k, args.top_p, args.seed, args.compile, results=report["samples"],
                               batch_size=args.batch_size)
        partial.pop()
        report.update(summarize(results))
        report["samples"] = report.pop("samples")  # keep the samples after the scores, as before
    return report


def interrupted_report(report: dict, n_requests: int) -> dict:
    """The part of a report a Ctrl-C left: the stories sampled so far, scored, marked as partial."""
    done = report["samples"]
    report = {**report, **(summarize(done) if done else {"n_prompts": 0}), "interrupted": True,
              "n_prompts_asked": n_requests}
    report["samples"] = report.pop("samples")
    return report


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="the checkpoint to evaluate")
    p.add_argument("--compare", nargs="+", metavar="CHECKPOINT",
                   help="evaluate several checkpoints alike and print their scores side by side")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the checkpoint's own)")
    add_prompt_format_args(p)
    p.add_argument("--data", help="loss on: a shard folder, a .bin or .tokens.npy shard, or a .txt file")
    p.add_argument("--max_tokens", type=positive_int, default=1_000_000, help="at most this many tokens for the loss")
    p.add_argument("--batch_size", type=positive_int, default=16, help="rows per loss batch, and stories sampled together")
    p.add_argument("--prompts_file", help="JSONL of {verb, noun, adjective, features}")
    p.add_argument("--prompts_shard", help="take prompts from this corpus shard's metadata (e.g. data00.json)")
    p.add_argument("--num_prompts", type=int, default=0, help="prompts to sample (generated or from the shard)")
    p.add_argument("--held_out_from", help="corpus folder: generated prompts avoid its training word triples")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--report", help="write the JSON report here (an earlier report is replaced; any other file "
                                    "only with --force)")
    p.add_argument("--force", action="store_true", help="let --report replace a file that is not a report")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="as in generate.py")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="as in generate.py: one compile serves every batch (default: on when the prompts "
                        "times the model's parameters reach 5e9, e.g. 330 prompts of a stories15M)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    paths = args.compare or ([args.model_path] if args.model_path else [])
    try:
        if not paths or (args.model_path and args.compare):
            raise UsageError("give --model_path=CHECKPOINT, or --compare A.pt B.pt ... (not both)")
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        args.temperature = greedy_if_tiny(args.temperature)
        if not (args.data or args.prompts_file or args.num_prompts > 0):
            raise UsageError("nothing to do: give --data (loss) and/or --num_prompts / --prompts_file (instructions)")
        check_device(args.device)
        if args.report:
            check_output(args.report, f"--report={args.report}", args.force,
                         ours=lambda path: is_json_with(path, REPORT_KEYS),
                         inputs=[*paths, args.data, args.prompts_file, args.prompts_shard, args.tokenizer])
        extra = {}
        if args.prompts_file:
            requests = requests_from_file(args.prompts_file)
        elif args.prompts_shard:
            requests = requests_from_shard(args.prompts_shard, args.num_prompts, args.seed)
        elif args.num_prompts > 0:
            seen = seen_word_triples(args.held_out_from) if args.held_out_from else set()
            requests = held_out_requests(args.num_prompts, args.seed, seen)
            extra = {"held_out_from": args.held_out_from, "training_word_triples": len(seen)}
        else:
            requests = []
        loaded = [load_for_sampling(path, args.tokenizer, args.device, args.dtype, args.quantize) for path in paths]
        fmt = evaluation_prompt_format([model_prompt_format(ckpt) for _, ckpt, _ in loaded], args.instruct,
                                       args.prompt_encoding)
        reports, partial = [], []
        try:
            for one in loaded:
                reports.append(evaluate_checkpoint(one, args, requests, extra, fmt, partial))
        except KeyboardInterrupt:  # keep what was finished: the reports done, and the one in progress
            reports += [interrupted_report(r, len(requests)) for r in partial]
            if args.report and reports:
                write_json(args.report, reports[0] if len(paths) == 1 else {"compare": reports}, indent=1)
            print(f"interrupted: {sum(len(r.get('samples', [])) for r in reports)} stories sampled"
                  + (f"; partial report in {args.report}" if args.report and reports else ""), file=sys.stderr)
            return 130
    except UsageError as exc:  # the loader's and the tokenizer's errors are usage errors too
        return report_error(exc)
    if args.report:
        write_json(args.report, reports[0] if len(reports) == 1 else {"compare": reports}, indent=1)
    print_table(reports)
    print(f"evaluated {', '.join(paths)} in {time.perf_counter() - start:.1f} s"
          + "".join(f"; {headline(r)}" for r in reports if "all_words_rate" in r)
          + (f"; report in {args.report}" if args.report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
