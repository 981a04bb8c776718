"""The JSON story shards (TinyStories_all_data/dataNN.json) and what every data stage does
with them: list them, stream their records with bounded memory, find the tokenizer a stage
needs, and run one job per shard in worker processes with a progress bar.
"""
import glob
import json
import multiprocessing
import os
import re
import resource
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from cli import progress as tqdm  # a plain line every 10% when the output is a log file

from cli import DataError, UsageError
from data_paths import shards_dir, tokenizer_model_path


class ShardError(DataError):
    """A failure inside a worker, already prefixed with the shard it happened on."""


def list_shards(data_dir):
    shards = sorted(glob.glob(os.path.join(shards_dir(data_dir), "data*.json")))
    if not shards:
        raise UsageError(f"no dataNN.json shards in {shards_dir(data_dir)}: run "
                         f"`python tinystories.py download --data_dir={data_dir}` (or make_demo) first")
    return shards


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def iter_json_records(path, chunk_chars=1 << 20):
    """Yield the items of a file holding one JSON list, one at a time. The file is read in
    chunks, so memory is bounded by the chunk and the largest record, not by the shard."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False
        state = "start"  # start -> first_item -> (item -> separator)* -> done
        while True:
            pos = _WHITESPACE.match(buf, pos).end()
            if pos == len(buf):
                if eof:
                    raise ValueError(f"{path}: JSON list ends early (truncated file?)")
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            char = buf[pos]
            if state == "start":
                if char != "[":
                    raise ValueError(f"{path}: not a JSON list (expected '[' at the start)")
                pos, state = pos + 1, "first_item"
            elif state == "separator":
                if char == "]":
                    _expect_only_whitespace(path, buf[pos + 1:], f, chunk_chars)
                    return
                if char != ",":
                    raise ValueError(f"{path}: invalid JSON list (expected ',' or ']', found {char!r})")
                pos, state = pos + 1, "item"
            elif char == "]" and state == "first_item":
                _expect_only_whitespace(path, buf[pos + 1:], f, chunk_chars)
                return
            else:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # a value is whole once the list's next separator is in sight: "3" may be
                    # the start of "3.25" split across two chunks
                    complete = eof or (end < len(buf) and buf[end] in " \t\n\r,]")
                except json.JSONDecodeError as exc:
                    if eof:
                        raise ValueError(f"{path}: invalid JSON ({exc.msg})") from None
                    complete = False
                if not complete:
                    more = f.read(chunk_chars)
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
                    continue
                yield value
                pos, state = end, "separator"


def _expect_only_whitespace(path, rest, f, chunk_chars):
    while True:
        if rest.strip(" \t\n\r"):
            raise ValueError(f"{path}: invalid JSON (extra data after the list)")
        rest = f.read(chunk_chars)
        if not rest:
            return


def run_shard_jobs(worker, jobs, workers, desc):
    """Run worker(*job) for every job in a process pool, with a progress bar over shards. The
    first failure cancels what has not started and is raised (a ShardError naming its shard)."""
    results = []
    # spawn, not fork: callers may hold threads (tests, servers), which fork does not copy safely
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context,
                             initializer=_ignore_interrupts) as pool:
        futures = [pool.submit(worker, *job) for job in jobs]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="shard"):
                results.append(future.result())
        except BrokenProcessPool:
            raise DataError(f"{desc}: a worker process died (out of memory?); try fewer --workers") from None
        finally:
            for future in futures:
                future.cancel()
    return results


def _ignore_interrupts():
    """Ctrl-C reaches every process of the terminal's group: the workers leave it to the parent,
    which stops the pool and ends in one line, instead of each printing a traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_peak_rss_mb():
    """Peak resident memory of this process in MB. Linux's ru_maxrss survives exec, so a spawned
    worker would report its parent's peak; VmHWM belongs to this process image alone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def resolve_tokenizer(data_dir, vocab_size, tokenizer_path=None):
    """The tokenizer for --vocab_size (N=0: the --tokenizer file), checked to fit the data."""
    from tokenizer import Tokenizer, TokenizerError

    path = tokenizer_path or tokenizer_model_path(data_dir, vocab_size)
    if not os.path.isfile(path):
        if tokenizer_path:
            raise UsageError(f"tokenizer {path}: no such file (expected a sentencepiece .model)")
        raise UsageError(f"tokenizer {path} not found: run `python tinystories.py train_vocab "
                         f"--vocab_size={vocab_size} --data_dir={data_dir}` first")
    try:
        tok = Tokenizer(path)
    except TokenizerError as exc:
        raise UsageError(str(exc)) from None
    if vocab_size and tok.vocab_size != vocab_size:
        raise UsageError(f"tokenizer {path} has {tok.vocab_size} tokens, not --vocab_size={vocab_size}")
    if tok.vocab_size > 65536:
        raise UsageError(f"tokenizer {path} has {tok.vocab_size} tokens, too many for uint16 shards")
    return path


_worker_tokenizers = {}


def worker_tokenizer(path):
    from tokenizer import Tokenizer
    if path not in _worker_tokenizers:
        _worker_tokenizers[path] = Tokenizer(path)
    return _worker_tokenizers[path]
