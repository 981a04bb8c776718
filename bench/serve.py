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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="default: random weights in the quickstart's shape")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests_per_client", type=int, default=2)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--max_batch", type=int, default=32, help="the batching server's --max_batch")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    args = p.parse_args()
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
