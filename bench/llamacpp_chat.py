"""The exported instruct GGUF in a real llama.cpp, asked the obvious way: llama-server's
/v1/chat/completions with the request as the user's message, nothing of ours in between. Checks
that llama.cpp lays the prompt out as training did (its chat template's tokens equal
prompts.prompt_ids), that its greedy story equals ours token for token, and scores the story
(the three words, quoted speech). Exit 1 on any mismatch.

    python bench/llamacpp_chat.py --checkpoint=out/demo/instruct/ckpt.pt \
        --server=/work/llamacpp/build/bin/llama-server

llama.cpp is built elsewhere (never part of this repository or CI); docs/usage.md, "llama.cpp",
records a run.
"""
import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import export  # noqa: E402
from decoding import load_for_sampling, sample_stories  # noqa: E402
from story_requests import Request, score_story  # noqa: E402
from prompts import build_prompt, canonical_feature, prompt_ids, story_spelled_quotes  # noqa: E402


def post(port, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def start_server(server, gguf, context, threads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-c", str(context),
                                "-np", "1", "-t", str(threads), "--jinja"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"llama-server exited: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    sys.exit("llama-server did not become healthy in 120 s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out/demo/instruct/ckpt.pt", help="an instruct checkpoint")
    p.add_argument("--server", default="/work/llamacpp/build/bin/llama-server", help="llama.cpp's llama-server")
    p.add_argument("--words", default="climb,ring,messy", help="verb,noun,adjective (default: %(default)s)")
    p.add_argument("--features", default="dialogue", help="comma-separated (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=140, help="new tokens at most (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="llama-server's threads (default: %(default)s)")
    args = p.parse_args()
    verb, noun, adjective = args.words.split(",")
    features = [canonical_feature(f) for f in args.features.split(",") if f]
    request_text = build_prompt(verb, noun, adjective, features)

    model, ckpt, tokenizer = load_for_sampling(args.checkpoint, None, "cpu", "float32")
    ours_prompt = prompt_ids(tokenizer, request_text, True, ckpt.prompt_encoding)
    max_tokens = min(args.max_tokens, model.args.max_seq_len - len(ours_prompt))
    ours = sample_stories(model, tokenizer, [ours_prompt], max_tokens, 0.0, None, None)[0]

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = os.path.join(tmp, "model.gguf")
        print(export.export(args.checkpoint, "gguf", gguf))
        process, port = start_server(args.server, gguf, model.args.max_seq_len, args.threads)
        try:
            messages = [{"role": "user", "content": request_text}]
            rendered = post(port, "/apply-template", {"messages": messages})["prompt"]
            theirs_prompt = post(port, "/tokenize", {"content": rendered, "add_special": True,
                                                     "parse_special": True})["tokens"]
            reply = post(port, "/v1/chat/completions",
                         {"messages": messages, "temperature": 0, "top_k": 1, "max_tokens": max_tokens,
                          "logprobs": True, "top_logprobs": 1})
            # the raw-completion recipe of docs/usage.md: the layout written by hand
            raw = post(port, "/completion", {"prompt": story_spelled_quotes(request_text) + "<s>", "temperature": 0,
                                             "top_k": 1, "n_predict": max_tokens, "return_tokens": True})
        finally:
            process.terminate()
            process.wait(timeout=30)
    story = reply["choices"][0]["message"]["content"]
    theirs = [entry["id"] for entry in reply["choices"][0]["logprobs"]["content"]]
    if theirs[-1:] == [tokenizer.eos_id]:  # llama.cpp lists the EOS it stopped at; ours stops before it
        theirs = theirs[:-1]
    print(f"request: {request_text}")
    print(f"llama.cpp's chat template renders: {rendered!r}")
    print(f"prompt tokens: llama.cpp {len(theirs_prompt)}, ours {len(ours_prompt)}, "
          f"{'equal' if theirs_prompt == ours_prompt else 'DIFFERENT'}; "
          f"chat completion's usage.prompt_tokens {reply['usage']['prompt_tokens']}")
    if theirs_prompt != ours_prompt or reply["usage"]["prompt_tokens"] != len(ours_prompt):
        failures.append("prompt tokens")
    same = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(theirs, ours)))
    print(f"story tokens: llama.cpp {len(theirs)}, ours {len(ours)}, equal for the first {same}; "
          f"finish_reason {reply['choices'][0]['finish_reason']}")
    # a story's first piece is "▁Once": llama.cpp keeps its space, sentencepiece's decode drops it
    if theirs != ours or story.removeprefix(" ") != tokenizer.decode(ours):
        failures.append("greedy story")
    raw_tokens = raw["tokens"][:-1] if raw["tokens"][-1:] == [tokenizer.eos_id] else raw["tokens"]
    print(f"raw /completion with the hand-written layout: {'the same story' if raw_tokens == ours else 'DIFFERENT'}"
          f" ({raw['tokens_evaluated']} prompt tokens)")
    if raw_tokens != ours or raw["tokens_evaluated"] != len(ours_prompt):
        failures.append("raw completion")
    score = score_story(story, Request(verb, noun, adjective, features))
    print(f"llama.cpp's story: {story}")
    print("scored: " + ", ".join(f"{key} {value}" for key, value in score.items()))
    print("FAILED: " + ", ".join(failures) if failures else "llama.cpp matches: prompt and greedy story, token for token, chat and raw")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
