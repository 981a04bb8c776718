"""Instruction-tuning data: (prompt, story) examples from the TinyStories `instruction`
metadata, worded by prompts.py (the one prompt builder generation and evaluation use too).

    python prepare_instruct_data.py --vocab_size=N [--data_dir=data] [--prompt_style=template]
                                    [--prompt_encoding=story_words] [--max_seq_len=350]
                                    [--workers=CPUS] [--tokenizer=PATH]

Prompts: --prompt_style=template (default) is prompts.build_prompt(words[0], words[1],
words[2], features); --prompt_style=original rewrites the record's GPT prompt as the original
instruct storyteller did (prompts.rewrite_original_prompt). The tokenizer is {data_dir}/tok{N}.model, or for
--vocab_size=0 the sentencepiece model given by --tokenizer (e.g. Llama 2's tokenizer.model).
--prompt_encoding=story_words (default) encodes each quoted word as a story spells it, so the
model can copy its tokens; plain encodes the text as it is, as the original did (prompts.py).

On-disk format, in {data_dir}/instruct{N}/, for every shard dataNN.json:
    dataNN.tokens.npy   uint16, shape (n_examples, max_seq_len): each row is
                        prompt_ids(prompt) (which ends with BOS) + encode(story.strip()) + [EOS],
                        right-padded with 0
    dataNN.lengths.npy  int32, shape (n_examples, 2): [prompt_len, total_len] per row
both ordinary .npy files (np.load(path, mmap_mode="r") maps them without copying), each
written to a temporary name and renamed into place. Shard 00 is validation, the rest training.
    meta.json           vocab_size, max_seq_len, prompt_style, prompt_format ({"is_instruct": true,
                        "prompt_encoding": ...}: the record checkpoints and exports carry on),
                        tokenizer, bos_id, eos_id, shards,
                        counts: examples kept (train/val), dropped_too_long, skipped per reason
Training reads a row as x = row[:-1], y = row[1:], and ignores y[i] (-1) unless
prompt_len <= i + 1 < total_len: the loss covers BOS, the story and EOS, never the prompt
or the padding. Examples longer than max_seq_len are dropped (counted), never truncated.
"""
import os
import sys
from collections import Counter

import numpy as np

from cli import (DataError, OneLineParser, ToolError, UsageError, atomic_write, positive_int, report_error, run_main,
                 vocab_size_arg, write_json)
from data_paths import instruct_dir
from prompts import (PROMPT_ENCODINGS, PROMPT_FORMAT_KEY, PROMPT_STYLES, SKIP_REASONS, prompt_format, prompt_ids,
                     record_prompt_and_story)
from shards import (ShardError, iter_json_records, list_shards, resolve_tokenizer, run_shard_jobs,
                    worker_peak_rss_mb, worker_tokenizer)


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so np.save keeps the name as given
            np.save(f, array)
    atomic_write(path, write)


def prepare_shard(shard_path, tokenizer_path, out_dir, prompt_style, prompt_encoding, max_seq_len):
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
                prompt_part = prompt_ids(tok, prompt, True, prompt_encoding)  # the prompt, then BOS
                ids = prompt_part + tok.encode(story) + [tok.eos_id]
                if len(ids) > max_seq_len:
                    counts["dropped_too_long"] += 1
                    continue
                row[:] = 0
                row[:len(ids)] = ids
                raw.write(row.tobytes())
                lengths.append((len(prompt_part) - 1, len(ids)))
        n_examples = len(lengths)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False,
                  "shape": (n_examples, max_seq_len)}

        def write_tokens(tmp):
            with open(tmp, "wb") as out, open(raw_tmp, "rb") as raw:
                np.lib.format.write_array_header_1_0(out, header)
                while block := raw.read(1 << 22):
                    out.write(block)
        save_npy(lengths_path, np.asarray(lengths, dtype=np.int32).reshape(n_examples, 2))
        atomic_write(tokens_path, write_tokens)
    except Exception as exc:
        raise ShardError(f"{shard}: {exc}") from None
    finally:
        if os.path.exists(raw_tmp):
            os.remove(raw_tmp)
    counts["examples"] = n_examples
    return {"shard": shard, "counts": dict(counts), "peak_rss_mb": worker_peak_rss_mb()}


def prepare_instruct_data(data_dir, vocab_size, prompt_style="template", max_seq_len=350, workers=1,
                          tokenizer_path=None, prompt_encoding="story_words"):
    from tokenizer import Tokenizer

    shards = list_shards(data_dir)
    tokenizer_path = resolve_tokenizer(data_dir, vocab_size, tokenizer_path)
    out_dir = instruct_dir(data_dir, vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # a run that fails half way must not look like a finished one
    jobs = [(shard, tokenizer_path, out_dir, prompt_style, prompt_encoding, max_seq_len) for shard in shards]
    results = sorted(run_shard_jobs(prepare_shard, jobs, workers, desc="prepare_instruct_data"),
                     key=lambda r: r["shard"])
    stems = [os.path.splitext(r["shard"])[0] for r in results]
    for name in os.listdir(out_dir):  # outputs of shards that no longer exist would be read as data
        if name.endswith((".tokens.npy", ".lengths.npy")) and name.split(".")[0] not in stems:
            os.remove(os.path.join(out_dir, name))
    totals = Counter()
    for r in results:
        totals.update(r["counts"])
    val_examples = results[0]["counts"].get("examples", 0)
    if not val_examples or (len(results) > 1 and totals["examples"] == val_examples):
        # no meta.json then: training refuses the folder in one line, not deep in a step
        split = "validation (data00)" if not val_examples else "training (data01...)"
        raise UsageError(f"prepare_instruct_data: {totals['records']} records -> {totals['examples']} examples, none "
                         f"for {split} "
                         f"({totals['dropped_too_long']} longer than --max_seq_len={max_seq_len} tokens, "
                         f"{sum(v for k, v in totals.items() if k.startswith('skipped_'))} without a usable "
                         f"instruction); raise --max_seq_len or check the shards")
    tok = Tokenizer(tokenizer_path)
    meta = {
        "vocab_size": tok.vocab_size, "max_seq_len": max_seq_len, "prompt_style": prompt_style,
        PROMPT_FORMAT_KEY: prompt_format(True, prompt_encoding),  # travels into checkpoints and exports
        "tokenizer": os.path.abspath(tokenizer_path), "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": 0,
        "shards": stems, "val_shards": stems[:1],
        "records": totals["records"], "examples": totals["examples"],
        "val_examples": results[0]["counts"].get("examples", 0),
        "train_examples": totals["examples"] - results[0]["counts"].get("examples", 0),
        "dropped_too_long": totals["dropped_too_long"],
        "skipped": {reason: totals["skipped_" + reason] for reason in SKIP_REASONS if totals["skipped_" + reason]},
        "per_shard": {os.path.splitext(r["shard"])[0]: r["counts"] for r in results},
    }
    write_json(meta_path, meta, indent=2)
    return out_dir, meta


def main(argv=None):
    parser = OneLineParser(prog="prepare_instruct_data.py",
                                   description="Tokenize TinyStories instruction examples for fine-tuning")
    parser.add_argument("--vocab_size", type=vocab_size_arg, required=True,
                        help="tokenizer {data_dir}/tok{N}.model; 0 = the --tokenizer model")
    parser.add_argument("--data_dir", default="data", help="data folder (default: data)")
    parser.add_argument("--prompt_style", choices=PROMPT_STYLES, default="template",
                        help="template: build_prompt from words/features; original: rewritten GPT prompt")
    parser.add_argument("--prompt_encoding", choices=PROMPT_ENCODINGS, default="story_words",
                        help="story_words: quoted words encoded as a story spells them; plain: as the original")
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
                                              args.max_seq_len, args.workers, args.tokenizer,
                                              args.prompt_encoding)
    except ShardError as exc:
        return report_error(DataError(f"prepare_instruct_data failed on shard {exc}"))
    except (ToolError, OSError) as exc:
        return report_error(exc)
    skipped = ", ".join(f"{reason} {n}" for reason, n in meta["skipped"].items())
    print(f"prepare_instruct_data: {meta['records']} records -> {meta['examples']} examples "
          f"(val {meta['val_examples']}, train {meta['train_examples']}) in {out_dir}; "
          f"dropped {meta['dropped_too_long']} longer than {args.max_seq_len} tokens; "
          f"skipped {sum(meta['skipped'].values())}" + (f" ({skipped})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
