"""Instruction-tuning data: (prompt, story) examples from the TinyStories `instruction`
metadata, plus the one prompt builder that data preparation, generation and evaluation all
use, so training and sampling prompts never drift apart.

    python prepare_instruct_data.py --vocab_size=N [--data_dir=data] [--prompt_style=template]
                                    [--max_seq_len=350] [--workers=CPUS] [--tokenizer=PATH]

Prompts: --prompt_style=template (default) is build_prompt(words[0], words[1], words[2],
features); --prompt_style=original rewrites the record's GPT prompt as the original instruct
storyteller did (rewrite_original_prompt). The tokenizer is {data_dir}/tok{N}.model, or for
--vocab_size=0 the sentencepiece model given by --tokenizer (e.g. Llama 2's tokenizer.model).

On-disk format, in {data_dir}/instruct{N}/, for every shard dataNN.json:
    dataNN.tokens.npy   uint16, shape (n_examples, max_seq_len): each row is
                        encode(prompt) + [BOS] + encode(story.strip()) + [EOS], right-padded with 0
    dataNN.lengths.npy  int32, shape (n_examples, 2): [prompt_len, total_len] per row
both ordinary .npy files (np.load(path, mmap_mode="r") maps them without copying), each
written to a temporary name and renamed into place. Shard 00 is validation, the rest training.
    meta.json           vocab_size, max_seq_len, prompt_style, tokenizer, bos_id, eos_id, shards,
                        counts: examples kept (train/val), dropped_too_long, skipped per reason
Training reads a row as x = row[:-1], y = row[1:], and ignores y[i] (-1) unless
prompt_len <= i + 1 < total_len: the loss covers BOS, the story and EOS, never the prompt
or the padding. Examples longer than max_seq_len are dropped (counted), never truncated.
"""
import os
import sys
from collections import Counter
from typing import Iterable, Optional

import numpy as np

from tinystories import (DataError, OneLineArgumentParser, ShardError, iter_json_records, list_shards,
                         positive_int, resolve_tokenizer, run_shard_jobs, vocab_size_arg,
                         worker_peak_rss_mb, worker_tokenizer, write_json_atomic)

# TinyStories feature name -> the phrase the README-style template uses
FEATURE_PHRASES = {
    "Dialogue": "it should contain a dialogue",
    "BadEnding": "it should have a bad ending",
    "Conflict": "it should have a conflict",
    "Foreshadowing": "it should use foreshadowing",
    "Twist": "it should have a plot twist",
    "MoralValue": "it should teach a moral value",
}
_FEATURE_LOOKUP = {name.lower().replace("_", ""): name for name in FEATURE_PHRASES}


def canonical_feature(name: str) -> str:
    """'dialogue', 'bad_ending', 'BadEnding' -> the TinyStories spelling; ValueError otherwise."""
    key = name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")
    if key not in _FEATURE_LOOKUP:
        raise ValueError(f"unknown feature {name!r} (expected one of {', '.join(FEATURE_PHRASES)})")
    return _FEATURE_LOOKUP[key]


def build_prompt(verb: str, noun: str, adjective: str, features: Optional[Iterable[str]] = ()) -> str:
    """The README prompt: 'Write a story. In the story, try to use the verb "climb", the noun
    "ring" and the adjective "messy". The story has the following features: it should contain
    a dialogue. Possible story:' (the features sentence is left out when there are none)."""
    prompt = (f'Write a story. In the story, try to use the verb "{verb}", the noun "{noun}" '
              f'and the adjective "{adjective}".')
    phrases = [FEATURE_PHRASES[canonical_feature(f)] for f in (features or ())]
    if phrases:
        prompt += " The story has the following features: " + ", ".join(phrases) + "."
    return prompt + " Possible story:"


def rewrite_original_prompt(gpt_prompt: str) -> str:
    """The original instruct storyteller's rewriting of a TinyStories GPT prompt, in its order."""
    text = gpt_prompt.replace(
        "Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year "
        "old child would understand.", "Write a story.")
    text = text.replace(" Remember to only use simple words!", "")
    text = text.replace("\n\nPossible story:", "")
    text = text.replace("try to at some point use", "try to use")
    return text + " Possible story:"


# -----------------------------------------------------------------------------
# records -> examples

PROMPT_STYLES = ("template", "original")
SKIP_REASONS = ("not_a_record", "no_story", "empty_story", "no_instruction", "bad_words",
                "bad_features", "unknown_feature", "no_prompt")


def record_prompt_and_story(record, prompt_style):
    """(prompt, stripped story, None) for a usable record, else (None, None, skip reason)."""
    if not isinstance(record, dict):
        return None, None, "not_a_record"
    story = record.get("story")
    if not isinstance(story, str):
        return None, None, "no_story"
    story = story.strip()
    if not story:
        return None, None, "empty_story"
    instruction = record.get("instruction")
    if not isinstance(instruction, dict):
        return None, None, "no_instruction"
    if prompt_style == "original":
        gpt_prompt = instruction.get("prompt:")
        if not isinstance(gpt_prompt, str) or not gpt_prompt.strip():
            return None, None, "no_prompt"
        return rewrite_original_prompt(gpt_prompt), story, None
    words = instruction.get("words")
    if (not isinstance(words, list) or len(words) != 3
            or not all(isinstance(w, str) and w.strip() for w in words)):
        return None, None, "bad_words"
    features = instruction.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        return None, None, "bad_features"
    try:
        prompt = build_prompt(words[0].strip(), words[1].strip(), words[2].strip(), features)
    except ValueError:
        return None, None, "unknown_feature"
    return prompt, story, None


def write_npy_atomic(path, array):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # a file object, so np.save keeps the name as given
        np.save(f, array)
    os.replace(tmp, path)


def prepare_shard(shard_path, tokenizer_path, out_dir, prompt_style, max_seq_len):
    """One JSON shard -> dataNN.tokens.npy + dataNN.lengths.npy. Rows stream to a raw temporary
    file as they are made, so memory does not grow with the shard; the .npy header is written
    once the row count is known."""
    shard = os.path.basename(shard_path)
    stem = os.path.splitext(shard)[0]
    tokens_path = os.path.join(out_dir, f"{stem}.tokens.npy")
    lengths_path = os.path.join(out_dir, f"{stem}.lengths.npy")
    raw_tmp = f"{tokens_path}.rows.tmp"
    counts = Counter()
    lengths = []
    try:
        tok = worker_tokenizer(tokenizer_path)
        row = np.zeros(max_seq_len, dtype=np.uint16)
        with open(raw_tmp, "wb") as raw:
            for record in iter_json_records(shard_path):
                counts["records"] += 1
                prompt, story, reason = record_prompt_and_story(record, prompt_style)
                if reason:
                    counts["skipped_" + reason] += 1
                    continue
                prompt_ids = tok.encode(prompt)
                ids = prompt_ids + [tok.bos_id] + tok.encode(story) + [tok.eos_id]
                if len(ids) > max_seq_len:
                    counts["dropped_too_long"] += 1
                    continue
                row[:] = 0
                row[:len(ids)] = ids
                raw.write(row.tobytes())
                lengths.append((len(prompt_ids), len(ids)))
        n_examples = len(lengths)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False,
                  "shape": (n_examples, max_seq_len)}
        with open(f"{tokens_path}.tmp", "wb") as out, open(raw_tmp, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            while block := raw.read(1 << 22):
                out.write(block)
        write_npy_atomic(lengths_path, np.asarray(lengths, dtype=np.int32).reshape(n_examples, 2))
        os.replace(f"{tokens_path}.tmp", tokens_path)
    except Exception as exc:
        for tmp in (raw_tmp, f"{tokens_path}.tmp", f"{lengths_path}.tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise ShardError(f"{shard}: {exc}") from None
    finally:
        if os.path.exists(raw_tmp):
            os.remove(raw_tmp)
    counts["examples"] = n_examples
    return {"shard": shard, "counts": dict(counts), "peak_rss_mb": worker_peak_rss_mb()}


def prepare_instruct_data(data_dir, vocab_size, prompt_style="template", max_seq_len=350, workers=1,
                          tokenizer_path=None):
    from tokenizer import Tokenizer

    shards = list_shards(data_dir)
    tokenizer_path = resolve_tokenizer(data_dir, vocab_size, tokenizer_path)
    out_dir = os.path.join(data_dir, f"instruct{vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # a run that fails half way must not look like a finished one
    jobs = [(shard, tokenizer_path, out_dir, prompt_style, max_seq_len) for shard in shards]
    results = sorted(run_shard_jobs(prepare_shard, jobs, workers, desc="prepare_instruct_data"),
                     key=lambda r: r["shard"])
    stems = [os.path.splitext(r["shard"])[0] for r in results]
    for name in os.listdir(out_dir):  # outputs of shards that no longer exist would be read as data
        if name.endswith((".tokens.npy", ".lengths.npy")) and name.split(".")[0] not in stems:
            os.remove(os.path.join(out_dir, name))
    totals = Counter()
    for r in results:
        totals.update(r["counts"])
    tok = Tokenizer(tokenizer_path)
    meta = {
        "vocab_size": tok.vocab_size, "max_seq_len": max_seq_len, "prompt_style": prompt_style,
        "tokenizer": os.path.abspath(tokenizer_path), "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": 0,
        "shards": stems, "val_shards": stems[:1],
        "records": totals["records"], "examples": totals["examples"],
        "val_examples": results[0]["counts"].get("examples", 0),
        "train_examples": totals["examples"] - results[0]["counts"].get("examples", 0),
        "dropped_too_long": totals["dropped_too_long"],
        "skipped": {reason: totals["skipped_" + reason] for reason in SKIP_REASONS if totals["skipped_" + reason]},
        "per_shard": {os.path.splitext(r["shard"])[0]: r["counts"] for r in results},
    }
    write_json_atomic(meta_path, meta, indent=2)
    return out_dir, meta


def main(argv=None):
    parser = OneLineArgumentParser(prog="prepare_instruct_data.py",
                                   description="Tokenize TinyStories instruction examples for fine-tuning")
    parser.add_argument("--vocab_size", type=vocab_size_arg, required=True,
                        help="tokenizer {data_dir}/tok{N}.model; 0 = the --tokenizer model")
    parser.add_argument("--data_dir", default="data", help="data folder (default: data)")
    parser.add_argument("--prompt_style", choices=PROMPT_STYLES, default="template",
                        help="template: build_prompt from words/features; original: rewritten GPT prompt")
    parser.add_argument("--max_seq_len", type=positive_int, default=350,
                        help="longest example kept, prompt included (default 350)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes (default: CPUs)")
    parser.add_argument("--tokenizer", help="sentencepiece .model (required for --vocab_size=0)")
    args = parser.parse_args(argv)
    if args.vocab_size == 0 and not args.tokenizer:
        parser.error("--vocab_size=0 needs --tokenizer=PATH (the Llama 2 tokenizer.model)")
    if args.max_seq_len < 3:
        parser.error(f"--max_seq_len={args.max_seq_len} is too short (expected >= 3: prompt, BOS, EOS)")
    try:
        out_dir, meta = prepare_instruct_data(args.data_dir, args.vocab_size, args.prompt_style,
                                              args.max_seq_len, args.workers, args.tokenizer)
    except ShardError as exc:
        print(f"error: prepare_instruct_data failed on shard {exc}", file=sys.stderr)
        return 1
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{reason} {n}" for reason, n in meta["skipped"].items())
    print(f"prepare_instruct_data: {meta['records']} records -> {meta['examples']} examples "
          f"(val {meta['val_examples']}, train {meta['train_examples']}) in {out_dir}; "
          f"dropped {meta['dropped_too_long']} longer than {args.max_seq_len} tokens; "
          f"skipped {sum(meta['skipped'].values())}" + (f" ({skipped})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
