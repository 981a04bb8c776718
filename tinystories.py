"""TinyStories data: download the archive (or make an offline demo corpus in its format), train
a sentencepiece tokenizer on it and pretokenize it for pretraining.

    python tinystories.py download    [--data_dir=data] [--url=URL] [--sha256=HEX] [--retries=6]
    python tinystories.py download_model stories15M|stories42M|stories110M|stories260K [--data_dir=data]
    python tinystories.py make_demo   [--data_dir=data] [--num_shards=4] [--stories_per_shard=5000] [--seed=1337]
    python tinystories.py train_vocab --vocab_size=N [--data_dir=data] [--num_shards=10]
    python tinystories.py pretokenize --vocab_size=N [--data_dir=data] [--workers=CPUS] [--tokenizer=PATH]

What lands where under --data_dir is data_paths.py's business (docs/formats.md, "Data folder").
The archive unpacks to dataNN.json lists of {"story", "instruction", "summary", "source"};
pretokenize writes per story BOS + encode(story.strip()), no EOS, as uint16 (llama2.c's
format). --vocab_size=0 means the Llama 2 tokenizer given by --tokenizer=PATH (output in
tok0/). Shard 00 is the validation split, the others are training data.
"""
import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from cli import (DataError, OneLineParser, ToolError, UsageError, atomic_write, file_sha256, positive_int, progress,
                 report_error, run_main, vocab_size_arg)
from data_paths import ARCHIVE_NAME, pretokenized_dir, shards_dir, tokenizer_model_path
from demo_corpus import make_demo
from download import download_file, unpack_archive
from prompts import record_prompt_and_story
from shards import (ShardError, iter_json_records, list_shards, resolve_tokenizer, run_shard_jobs,
                    worker_peak_rss_mb, worker_tokenizer)

DEFAULT_URL = f"https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{ARCHIVE_NAME}"
URL_ENV_VAR = "TINYSTORIES_URL"


def cmd_download(args):
    url = args.url or os.environ.get(URL_ENV_VAR) or DEFAULT_URL
    os.makedirs(args.data_dir, exist_ok=True)
    archive = os.path.join(args.data_dir, ARCHIVE_NAME)
    target = shards_dir(args.data_dir)
    if os.path.exists(archive) and args.sha256 and file_sha256(archive) != args.sha256.lower():
        print(f"{archive} does not match --sha256, downloading it again", file=sys.stderr)
        os.remove(archive)
    if os.path.exists(archive):
        print(f"{archive} already downloaded, skipping the download")
    else:
        download_file(url, archive, sha256=args.sha256, retries=args.retries, backoff_s=args.backoff,
                      url_hint=f"--url or ${URL_ENV_VAR}")
    if os.path.isdir(target):
        print(f"{target} already exists, skipping the unpack (delete it to unpack again)")
    else:
        unpack_archive(archive, target)
    n_shards = len(glob.glob(os.path.join(target, "data*.json")))
    print(f"download: {archive} ({os.path.getsize(archive) / 1e6:.1f} MB) -> {n_shards} shards in {target}")


# -----------------------------------------------------------------------------
# download_model: llama2.c's published checkpoints and their tokenizers

TINYLLAMAS_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main"
LLAMA2_TOKENIZER_URL = "https://github.com/karpathy/llama2.c/raw/master/tokenizer.model"
MODELS_URL_ENV_VAR = "TINYLLAMAS_URL"
# name -> (files: (path under the base URL, or a full URL; local name), the shape the model must have)
PUBLISHED_MODELS = {
    "stories260K": ([("stories260K/stories260K.pt", "stories260K.pt"), ("stories260K/tok512.model", "tok512.model")],
                    dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512)),
    "stories15M": ([("stories15M.pt", "stories15M.pt"), (LLAMA2_TOKENIZER_URL, "tokenizer.model")],
                   dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, max_seq_len=256)),
    "stories42M": ([("stories42M.pt", "stories42M.pt"), (LLAMA2_TOKENIZER_URL, "tokenizer.model")],
                   dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, max_seq_len=1024)),
    "stories110M": ([("stories110M.pt", "stories110M.pt"), (LLAMA2_TOKENIZER_URL, "tokenizer.model")],
                    dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, max_seq_len=1024)),
}


def model_file_url(remote, base_url=None):
    """A file's URL: under --base_url (a mirror holding every file by its name) if given, else
    under tinyllamas on Hugging Face; the Llama 2 tokenizer comes from llama2.c's repository."""
    if base_url:
        return f"{base_url.rstrip('/')}/{remote.rsplit('/', 1)[-1] if '://' in remote else remote}"
    return remote if "://" in remote else f"{TINYLLAMAS_URL}/{remote}"


def check_published_model(path, name, shape):
    """The loader reads it, and its shape is the published one (else DataError: a wrong file)."""
    from checkpoints import CheckpointError, load_checkpoint
    try:
        args = load_checkpoint(path).model_args
    except CheckpointError as exc:
        raise DataError(f"downloaded {name}: {exc}") from None
    found = {key: getattr(args, key) for key in shape}
    if found != shape:
        raise DataError(f"downloaded {name} has shape {found}, expected the published {shape}; "
                        f"the file was deleted, check --base_url")


def check_tokenizer(path, name, vocab_size):
    from tokenizer import Tokenizer, TokenizerError
    try:
        found = Tokenizer(path).vocab_size
    except TokenizerError as exc:
        raise DataError(f"downloaded tokenizer for {name}: {exc}") from None
    if found != vocab_size:
        raise DataError(f"downloaded tokenizer for {name} has {found} tokens, expected {vocab_size}")


def cmd_download_model(args):
    files, shape = PUBLISHED_MODELS[args.name]
    base_url = args.base_url or os.environ.get(MODELS_URL_ENV_VAR)
    os.makedirs(args.data_dir, exist_ok=True)
    written = []
    for remote, local in files:
        dest = os.path.join(args.data_dir, local)
        written.append(dest)
        if os.path.exists(dest):
            print(f"{dest} already downloaded, skipping it")
            continue
        if local.endswith(".pt"):
            check = lambda part: check_published_model(part, args.name, shape)  # noqa: E731
        else:
            check = lambda part: check_tokenizer(part, args.name, shape["vocab_size"])  # noqa: E731
        download_file(model_file_url(remote, base_url), dest, retries=args.retries, backoff_s=args.backoff, check=check,
                      url_hint=f"--base_url or ${MODELS_URL_ENV_VAR}")
    print(f"download_model: {args.name} in {written[0]}, its tokenizer in {written[1]}; try "
          f"python generate.py --model_path={written[0]}")


# -----------------------------------------------------------------------------
# make_demo: the offline corpus of demo_corpus.py

def cmd_make_demo(args):
    paths = make_demo(args.data_dir, args.num_shards, args.stories_per_shard, args.seed)
    print(f"make_demo: {len(paths)} shards x {args.stories_per_shard} stories (seed {args.seed}) "
          f"in {shards_dir(args.data_dir)}")


# -----------------------------------------------------------------------------
# train_vocab: sentencepiece BPE with llama2.c's settings

def train_vocab(data_dir, vocab_size, num_shards, include_prompts=False):
    """llama2.c's tokenizer training. include_prompts adds each record's instruction prompt (the
    template prompt_style of prepare_instruct_data) to the text, so that a small vocabulary also
    spends pieces on the instruction's words: shorter instruct examples, at the price of
    departing from llama2.c's stories-only tokenizers."""
    import sentencepiece as spm
    from tokenizer import Tokenizer

    shards = list_shards(data_dir)[:num_shards]
    os.makedirs(data_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="train_vocab_", dir=data_dir)
    try:
        text_path = os.path.join(work_dir, "stories.txt")
        n_stories = 0
        with open(text_path, "w", encoding="utf-8") as f:
            for shard in progress(shards, desc="train_vocab: writing text", unit="shard"):
                for record in iter_json_records(shard):
                    story = record.get("story") if isinstance(record, dict) else None
                    if isinstance(story, str) and story.strip():
                        f.write(story.strip() + "\n")
                        n_stories += 1
                    prompt = record_prompt_and_story(record, "template")[0] if include_prompts else None
                    if prompt:
                        f.write(prompt + "\n")
        if n_stories == 0:
            raise DataError(f"train_vocab: no stories in {', '.join(shards)}")
        print(f"train_vocab: training sentencepiece BPE ({vocab_size} tokens) on {n_stories} stories...",
              file=sys.stderr)
        prefix = os.path.join(work_dir, "tok")
        try:
            spm.SentencePieceTrainer.train(
                input=text_path, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                input_format="text", character_coverage=1.0,
                num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
                byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                minloglevel=2)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[0].split("] ")[-1]
            raise DataError(f"train_vocab --vocab_size={vocab_size} failed: {detail}") from None
        model_path = tokenizer_model_path(data_dir, vocab_size)
        os.replace(prefix + ".model", model_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    Tokenizer(model_path).export(os.path.splitext(model_path)[0] + ".bin")
    return model_path, n_stories


def cmd_train_vocab(args):
    model_path, n_stories = train_vocab(args.data_dir, args.vocab_size, args.num_shards, args.include_prompts)
    print(f"train_vocab: {model_path} (and .bin) from {n_stories} stories")


# -----------------------------------------------------------------------------
# pretokenize: one uint16 .bin per shard, shards in parallel

class _NoStories(Exception):
    pass


def pretokenize_shard(shard_path, tokenizer_path, out_path, flush_tokens=1 << 16):
    """Tokenize one JSON shard into out_path, streaming records in and tokens out."""
    counts = {"stories": 0, "tokens": 0, "skipped": 0}

    def write(tmp):
        tok = worker_tokenizer(tokenizer_path)
        pending = []
        with open(tmp, "wb") as f:
            for record in iter_json_records(shard_path):
                story = record.get("story") if isinstance(record, dict) else None
                if not isinstance(story, str) or not story.strip():
                    counts["skipped"] += 1
                    continue
                pending.extend(tok.encode(story.strip(), bos=True))
                counts["stories"] += 1
                if len(pending) >= flush_tokens:
                    np.asarray(pending, dtype=np.uint16).tofile(f)
                    counts["tokens"] += len(pending)
                    pending = []
            np.asarray(pending, dtype=np.uint16).tofile(f)
            counts["tokens"] += len(pending)
            if not counts["stories"]:  # no 0-byte .bin: the caller refuses the shard instead
                raise _NoStories

    shard = os.path.basename(shard_path)
    try:
        atomic_write(out_path, write)
    except _NoStories:
        if os.path.exists(out_path):  # an earlier run's tokens of this shard are not its tokens now
            os.remove(out_path)
    except Exception as exc:
        raise ShardError(f"{shard}: {exc}") from None
    return {"shard": shard, **counts, "peak_rss_mb": worker_peak_rss_mb(), "cpu_s": time.process_time(),
            "pid": os.getpid()}


def pretokenize(data_dir, vocab_size, workers, tokenizer_path=None):
    shards = list_shards(data_dir)
    tokenizer_path = resolve_tokenizer(data_dir, vocab_size, tokenizer_path)
    out_dir = pretokenized_dir(data_dir, vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(shard, tokenizer_path, os.path.join(out_dir, os.path.basename(shard).replace(".json", ".bin")))
            for shard in shards]
    results = sorted(run_shard_jobs(pretokenize_shard, jobs, workers, desc="pretokenize"), key=lambda r: r["shard"])
    empty = [r["shard"] for r in results if not r["stories"]]
    if empty:
        raise UsageError(f"pretokenize: {', '.join(empty)} in {shards_dir(data_dir)} hold no record with a story "
                         f"(expected a JSON list of {{\"story\": ...}}); no .bin written for them")
    return out_dir, results


def cmd_pretokenize(args):
    try:
        out_dir, results = pretokenize(args.data_dir, args.vocab_size, args.workers, args.tokenizer)
    except ShardError as exc:
        raise DataError(f"pretokenize failed on shard {exc}") from None
    stories = sum(r["stories"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    skipped = sum(r["skipped"] for r in results)
    print(f"pretokenize: {len(results)} shards, {stories} stories, {tokens} tokens -> {out_dir}"
          + (f" ({skipped} records without a story skipped)" if skipped else ""))


# -----------------------------------------------------------------------------
# command line

def sha256_arg(text):
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"expected 64 hex digits, got {text!r}")
    return text.lower()


def url_arg(text):
    if not re.match(r"https?://", text):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def build_parser():
    parser = OneLineParser(prog="tinystories.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=OneLineParser)

    def add(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data_dir", default="data", help="data folder (default: data)")
        return p

    p = add("download", "download and unpack TinyStories_all_data.tar.gz")
    p.add_argument("--url", type=url_arg, help=f"mirror URL (default: ${URL_ENV_VAR} or Hugging Face)")
    p.add_argument("--sha256", type=sha256_arg, help="expected sha256 of the archive")
    p.add_argument("--retries", type=positive_int, default=6, help="retries per failure streak (default 6)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling (default 1)")
    p.set_defaults(func=cmd_download)

    p = add("download_model", "download one of llama2.c's published models and its tokenizer into --data_dir")
    p.add_argument("name", choices=sorted(PUBLISHED_MODELS), help="which model")
    p.add_argument("--base_url", type=url_arg,
                   help=f"mirror holding the files by name (default: ${MODELS_URL_ENV_VAR} or Hugging Face)")
    p.add_argument("--retries", type=positive_int, default=6, help="retries per failure streak (default 6)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling (default 1)")
    p.set_defaults(func=cmd_download_model)

    p = add("make_demo", "write an offline demo corpus in the archive's format")
    p.add_argument("--num_shards", type=positive_int, default=4, help="shards to write (default 4)")
    p.add_argument("--stories_per_shard", type=positive_int, default=5000, help="default 5000")
    p.add_argument("--seed", type=int, default=1337, help="default 1337")
    p.set_defaults(func=cmd_make_demo)

    p = add("train_vocab", "train a sentencepiece BPE tokenizer -> {data_dir}/tok{N}.model")
    p.add_argument("--vocab_size", type=lambda t: vocab_size_arg(t, allow_zero=False), required=True)
    p.add_argument("--include_prompts", action="store_true",
                   help="also train on each record's instruction prompt (not llama2.c's recipe)")
    p.add_argument("--num_shards", type=positive_int, default=10, help="train on the first shards (default 10)")
    p.set_defaults(func=cmd_train_vocab)

    p = add("pretokenize", "tokenize every shard -> {data_dir}/tok{N}/dataNN.bin")
    p.add_argument("--vocab_size", type=vocab_size_arg, required=True, help="0 = the --tokenizer model")
    p.add_argument("--tokenizer", help="sentencepiece .model (required for --vocab_size=0)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="processes (default: CPUs)")
    p.set_defaults(func=cmd_pretokenize)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "vocab_size", None) == 0 and not args.tokenizer:
        parser.error("--vocab_size=0 needs --tokenizer=PATH (the Llama 2 tokenizer.model)")
    try:
        args.func(args)
    except (ToolError, OSError) as exc:  # OSError: disk full, permissions; the message names the file
        return report_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
