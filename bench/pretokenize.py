"""Pretokenize throughput: stories/s with 1 worker against 2 in the same run, and the peak
memory (ru_maxrss) of each worker, on a demo corpus made in a temporary folder.

    python bench/pretokenize.py [--shards=8] [--stories_per_shard=5000] [--vocab_size=512] [--repeats=2]

A second pass pretokenizes shards 4x larger with one worker: if a shard is processed in bounded
memory, the worker's peak memory stays about the same.
"""
import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tinystories  # noqa: E402


def quietly(fn, *args):
    # the library's progress bars would drown the table
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def timed_pretokenize(data_dir, vocab_size, workers, repeats):
    best, results = None, None
    for _ in range(repeats):
        start = time.perf_counter()
        _, results = quietly(tinystories.pretokenize, data_dir, vocab_size, workers)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    peak_by_worker = {}
    for r in results:
        peak_by_worker[r["pid"]] = max(peak_by_worker.get(r["pid"], 0), r["peak_rss_mb"])
    stories = sum(r["stories"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return stories, tokens, best, sorted(peak_by_worker.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--stories_per_shard", type=int, default=5000)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per setting")
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    # other work on the machine slows the 2-worker run most: say how busy it was
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average before the run {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        quietly(tinystories.make_demo, data_dir, args.shards, args.stories_per_shard, 1337)
        quietly(tinystories.train_vocab, data_dir, args.vocab_size, args.shards)
        print(f"corpus: {args.shards} demo shards x {args.stories_per_shard} stories, vocab {args.vocab_size}, "
              f"best of {args.repeats}")
        print(f"{'workers':>7} {'stories':>8} {'tokens':>9} {'seconds':>8} {'stories/s':>10} {'speedup':>8}  "
              f"peak RSS per worker (MB)")
        base = None
        for workers in (1, 2):
            stories, tokens, seconds, peaks = timed_pretokenize(data_dir, args.vocab_size, workers, args.repeats)
            rate = stories / seconds
            base = base or rate
            print(f"{workers:>7} {stories:>8} {tokens:>9} {seconds:>8.2f} {rate:>10.0f} {rate / base:>7.2f}x  "
                  + ", ".join(f"{p:.0f}" for p in peaks))

        big_dir = os.path.join(tmp, "big")
        quietly(tinystories.make_demo, big_dir, 2, 4 * args.stories_per_shard, 1337)
        os.link(os.path.join(data_dir, f"tok{args.vocab_size}.model"),
                os.path.join(big_dir, f"tok{args.vocab_size}.model"))
        stories, _, seconds, peaks = timed_pretokenize(big_dir, args.vocab_size, 1, 1)
        print(f"load average after the run {os.getloadavg()[0]:.2f}")
        print(f"bounded memory: 1 worker on shards of {4 * args.stories_per_shard} stories: "
              f"peak RSS {peaks[0]:.0f} MB ({stories / seconds:.0f} stories/s)")


if __name__ == "__main__":
    main()
