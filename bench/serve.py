"""serve.py under load: 32 concurrent clients on loopback, once against the batching server and
once against the same server taking one request at a time (--max_batch=1), same requests.

    python bench/serve.py                                     # demo-shaped model, 32 clients x 2 requests
    python bench/serve.py --model_path=out/demo/instruct/ckpt.pt --clients=32 --requests_per_client=2

Without --model_path: random weights in the quickstart's shape (configs/demo_instruct.py: dim 128,
4 layers, 4 heads, vocab 1024, context 192), with `make demo-data`'s tokenizer built in a temporary
folder; BOS and EOS score 0 against every state, so no story ends early and every request makes
exactly --max_tokens tokens (speed does not depend on what the weights say).

Every request is a greedy POST /v1/stories with its own word triple, so each has one right answer:
the batched run's story must equal the one-at-a-time run's for the same words (none lost, none
mixed up). Reported: requests answered, tokens/s (completion tokens over wall time), latency
p50/p99 (request sent to whole answer received), and the mean batch the engine ran.
Bounded: --clients x --requests_per_client requests, each with a --timeout.

Beside llama.cpp's server (--llama_server=path/to/llama-server, built outside this repository:
docs/benchmarks.md, Serving): random weights in stories15M's shape (dim 288, 6 layers, 6 heads,
context 256) with --tokenizer (a 32,000-piece sentencepiece model, stories15M's vocabulary size),
exported by export.py to GGUF float32 and quantized to Q8_0 by llama-quantize beside it; ours
served float32 and --quantize=int8. Every request is a streamed greedy POST /v1/completions of
--max_tokens tokens (EOS can never win, and llama.cpp gets ignore_eos) from the same prompts, at
1, 8, 16 and 32 concurrent clients (--concurrency): tokens/s, latency p50/p99 and time to first
token p50, each server alone on the machine with --threads threads.

    python bench/serve.py --llama_server=/work/llamacpp/build/bin/llama-server --tokenizer=tokenizer.model

--text_decoding times only the text side: a story's text rebuilt token by token, decoded whole
after every token or incrementally as serve.py does.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEMO_SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, multiple_of=32, max_seq_len=192, vocab_size=1024)


def demo_shaped_model(folder):
    import torch
    from checkpoints import save_checkpoint
    from model import ModelArgs, Transformer
    data = os.path.join(folder, "data")
    subprocess.run(["make", "--no-print-directory", "-C", ROOT, "demo-data", f"PY={sys.executable}",
                    f"DEMO_DIR={folder}", "DEMO_SHARDS=2", "DEMO_STORIES=300"], check=True, capture_output=True)
    torch.manual_seed(0)
    args = ModelArgs(**DEMO_SHAPE)
    state = Transformer(args).state_dict()
    state["tok_embeddings.weight"][1:3] = 0  # BOS, EOS: never the best token
    path = os.path.join(folder, "ckpt.pt")
    save_checkpoint(path, {"model": state, "model_args": vars(args),
                           "config": {"dataset": "instruct", "prompt_encoding": "story_words",
                                      "tokenizer": os.path.join(data, "tok1024.model")}})
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body, timeout):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def requests_for(n, seed=0):
    from demo_corpus import DEMO_ADJECTIVES, DEMO_NOUNS, DEMO_VERBS
    rng = random.Random(seed)
    return [{"verb": rng.choice(DEMO_VERBS), "noun": rng.choice(DEMO_NOUNS), "adjective": rng.choice(DEMO_ADJECTIVES),
             "features": rng.sample(["dialogue", "badending", "twist"], rng.randint(0, 2))} for _ in range(n)]


def run(model_path, max_batch, requests, args):
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--model_path={model_path}",
                               f"--port={port}", f"--max_batch={max_batch}", f"--max_queue={len(requests)}"],
                              cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                get(port, "/health")
                break
            except OSError:
                time.sleep(0.2)
        # one request first, so that neither run pays for the first call's warm-up
        post(port, "/v1/stories", {**requests[0], "temperature": 0, "max_tokens": 8}, args.timeout)
        before = get(port, "/health")

        def client(index):
            answers = []
            for body in requests[index::args.clients]:
                start = time.perf_counter()
                status, answer = post(port, "/v1/stories", {**body, "temperature": 0, "max_tokens": args.max_tokens},
                                      args.timeout)
                answers.append((body, status, answer, time.perf_counter() - start))
            return answers

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = [a for answers in pool.map(client, range(args.clients)) for a in answers]
        seconds = time.perf_counter() - start
        after = get(port, "/health")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    stories = {json.dumps(body, sort_keys=True): answer.get("story") for body, status, answer, _ in results}
    answered = sum(status == 200 for _, status, _, _ in results)
    tokens = sum(answer.get("tokens", 0) for _, status, answer, _ in results if status == 200)
    latencies = sorted(latency for *_, latency in results)
    steps = after["decode_steps"] - before["decode_steps"]
    return dict(answered=answered, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                p50=statistics.median(latencies), p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                mean_batch=(after["tokens_generated"] - before["tokens_generated"]) / max(steps, 1), stories=stories)


STORIES15M_SHAPE = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=32, max_seq_len=256,
                        vocab_size=32000)
PROMPTS = ["Once upon a time", "Tom had a big red ball", "Lily went to the park with her mom", "The sun was hot",
           "One day, a little dog", "Sam and Mia found a box", "The bird sang in the tree", "Ben was sad because"]


def stories15m_shaped(folder, tokenizer, llama_server):
    """Random weights in stories15M's shape (BOS and EOS never the best token), as our checkpoint,
    as export.py's GGUF, and that GGUF quantized to Q8_0 by llama-quantize (beside llama-server)."""
    import torch
    from checkpoints import save_checkpoint
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    args = ModelArgs(**STORIES15M_SHAPE)
    state = Transformer(args).state_dict()
    state["tok_embeddings.weight"][1:3] = 0
    paths = {name: os.path.join(folder, name) for name in ("ckpt.pt", "f32.gguf", "q8_0.gguf")}
    save_checkpoint(paths["ckpt.pt"], {"model": state, "model_args": vars(args), "config": {"tokenizer": tokenizer}})
    subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--checkpoint={paths['ckpt.pt']}",
                    "--format=gguf", f"--out={paths['f32.gguf']}"], check=True, capture_output=True)
    quantize = os.path.join(os.path.dirname(llama_server), "llama-quantize")
    subprocess.run([quantize, paths["f32.gguf"], paths["q8_0.gguf"], "Q8_0"], check=True, capture_output=True)
    return paths


def wait_until_up(port, process, seconds=300):
    for _ in range(int(seconds / 0.2)):
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} while starting")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"did not answer /health within {seconds} s")


def streamed_completion(port, body, timeout):
    """(seconds to the first text, seconds to the end, tokens) of one streamed completion."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start, first, tokens = time.perf_counter(), None, 0
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:300]
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter() - start
    finally:
        connection.close()
    return first, time.perf_counter() - start, tokens


def load_run(port, clients, args):
    count = max(clients, 4)
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True} for i in range(count)]
    streamed_completion(port, {**bodies[0], "max_tokens": 8}, args.timeout)  # warm-up, not counted
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda body: streamed_completion(port, body, args.timeout), bodies))
    seconds = time.perf_counter() - start
    latencies, firsts = sorted(r[1] for r in results), sorted(r[0] for r in results)
    return dict(tokens=sum(r[2] for r in results), tokens_per_s=sum(r[2] for r in results) / seconds,
                p50=statistics.median(latencies), p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                ttft=statistics.median(firsts), requests=count)


def beside_llama_server(args):
    """Our server and llama-server, each alone, on the same weights and prompts."""
    concurrency = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        paths = stories15m_shaped(folder, args.tokenizer, args.llama_server)
        ours = [sys.executable, os.path.join(ROOT, "serve.py"), f"--model_path={paths['ckpt.pt']}", "--max_batch=32",
                "--max_queue=64", "--no-access_log"]
        servers = [("serve.py float32", lambda port: ours + [f"--port={port}"]),
                   ("serve.py int8", lambda port: ours + [f"--port={port}", "--quantize=int8"]),
                   ("serve.py float32 --compile", lambda port: ours + [f"--port={port}", "--compile"])]
        for label, gguf in (("llama-server f32", "f32.gguf"), ("llama-server Q8_0", "q8_0.gguf")):
            servers.append((label, lambda port, gguf=gguf: [
                args.llama_server, "-m", paths[gguf], "-t", str(args.threads), "-np", "32",
                "-c", str(32 * STORIES15M_SHAPE["max_seq_len"]), "--port", str(port),
                # weight repacking (the AMX int8 path on Intel) dies of SIGILL on our VMs at load
                "--no-repack"]))
        print(f"streamed greedy /v1/completions of {args.max_tokens} tokens, stories15M-shaped random weights, "
              f"{args.threads} threads; requests per run: one per client (at least 4)")
        print("| server | clients | tokens/s | p50 latency | p99 latency | time to first token p50 |")
        print("|---|---|---|---|---|---|")
        for label, command in servers:
            if args.only and args.only not in label:
                continue
            port = free_port()
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            process = subprocess.Popen(command(port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            try:
                try:
                    wait_until_up(port, process)
                except RuntimeError as exc:
                    print(f"| {label} | - | {exc} | | | |", flush=True)
                    continue
                for clients in concurrency:
                    row = load_run(port, clients, args)
                    assert row["tokens"] == row["requests"] * args.max_tokens, row
                    print(f"| {label} | {clients} | {row['tokens_per_s']:.0f} | {row['p50']:.2f} s | {row['p99']:.2f} s "
                          f"| {row['ttft'] * 1000:.0f} ms |", flush=True)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    return 0


def text_decoding_cost(repeats=3):
    """A 1,000-token story's text as the server builds it token by token: decoding the whole
    story again after every token (O(n^2)) against openai_api.StoryText (constant per token)."""
    from openai_api import StoryText
    from tokenizer import Tokenizer
    tokenizer = Tokenizer(os.path.join(ROOT, "tests", "data", "tok512.model"))
    with open(os.path.join(ROOT, "tests", "data", "tinystories_valid_head.txt")) as f:
        ids = tokenizer.encode(f.read())[:1000]

    def whole():
        return [tokenizer.decode(ids[:i]) for i in range(1, len(ids) + 1)][-1]

    def incremental():
        story = StoryText(tokenizer, [])
        return "".join(story.add(token) for token in ids) + story.flush()
    times = {f.__name__: [] for f in (whole, incremental)}
    for _ in range(repeats):  # interleaved, so that both see the same load
        for f in (whole, incremental):
            start = time.perf_counter()
            assert f() == tokenizer.decode(ids)
            times[f.__name__].append(time.perf_counter() - start)
    w, i = (statistics.median(times[k]) * 1000 for k in ("whole", "incremental"))
    print(f"a {len(ids)}-token story's text, token by token (median of {repeats}): decoded whole after every token "
          f"{w:.0f} ms, incrementally {i:.0f} ms ({w / i:.1f}x); the same text")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama_server", help="llama.cpp's llama-server binary: compare with it (llama-quantize beside it)")
    p.add_argument("--tokenizer", help="with --llama_server: a 32,000-piece sentencepiece model")
    p.add_argument("--concurrency", default="1,8,16,32", help="with --llama_server: concurrent clients per run")
    p.add_argument("--threads", type=int, default=2, help="with --llama_server: threads for each server")
    p.add_argument("--only", help="with --llama_server: only the servers whose label contains this")
    p.add_argument("--model_path", help="default: random weights in the quickstart's shape")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests_per_client", type=int, default=2)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--max_batch", type=int, default=32, help="the batching server's --max_batch")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    p.add_argument("--text_decoding", action="store_true", help="only time building a story's text token by token")
    args = p.parse_args()
    if args.text_decoding:
        return text_decoding_cost()
    if args.llama_server:
        return beside_llama_server(args)
    requests = requests_for(args.clients * args.requests_per_client)
    with tempfile.TemporaryDirectory() as folder:
        model_path = args.model_path or demo_shaped_model(folder)
        rows = {}
        for label, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
            rows[label] = run(model_path, max_batch, requests, args)
    batched, single = rows["batched"], rows["one at a time"]
    same = sum(batched["stories"][k] == single["stories"][k] and batched["stories"][k] is not None
               for k in single["stories"])
    print(f"{len(requests)} greedy /v1/stories requests of {args.max_tokens} tokens from {args.clients} concurrent "
          f"clients, {os.path.basename(model_path) if args.model_path else 'demo-shaped random weights'}")
    print("| server | answered | tokens/s | p50 latency | p99 latency | mean batch | wall |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label}{f' (--max_batch={args.max_batch})' if label == 'batched' else ' (--max_batch=1)'} "
              f"| {row['answered']}/{len(requests)} | {row['tokens_per_s']:.0f} | {row['p50']:.2f} s | "
              f"{row['p99']:.2f} s | {row['mean_batch']:.1f} | {row['seconds']:.1f} s |")
    print(f"batched / one at a time: {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x tokens/s; "
          f"stories identical in both runs: {same}/{len(requests)}")
    return 0 if same == len(requests) and batched["answered"] == len(requests) else 1


if __name__ == "__main__":
    sys.exit(main())
