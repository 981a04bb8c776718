"""serve.py as its users meet it: the real server in a subprocess on a free port of 127.0.0.1,
asked by the official `openai` client, by plain HTTP, by killed clients, and by a headless
Chromium that fills in the page. Sampled stories are checked against generate.py's and against
stories260K's published greedy story."""
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from checkpoints import save_checkpoint
from helpers import ROOT, TEST_DATA, free_port, greedy_story, run_make
from model import ModelArgs, Transformer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STORIES260K = os.path.join(TEST_DATA, "stories260K.pt")
TOK512 = os.path.join(TEST_DATA, "tok512.model")
# a story the tokenizer spells partly in byte pieces (the dragon is four of them), each token once
UNICODE_STORY = "café 🐉 ok."


class Server:
    """serve.py in a subprocess, ready once /health answers. Its stdout (uvicorn's access log) and stderr
    go to a file, read by .log(): a pipe nobody reads would fill and stall the server."""

    def __init__(self, model_path, *flags, start_timeout=90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "serve.py"), f"--model_path={model_path}",
             f"--port={self.port}", "--device=cpu", *flags],
            cwd=ROOT, env=env, stdout=self.stderr, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve.py did not answer /health within {start_timeout} s")

    def request(self, method, path, body=None, headers=None, timeout=60):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            raw = response.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode()
            return response.status, payload, dict(response.getheaders())
        finally:
            connection.close()

    def log(self):
        self.stderr.seek(0)
        return self.stderr.read()

    def get(self, path):
        return self.request("GET", path, timeout=5)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stop(self, timeout=60):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope="module")
def stories_server():
    with Server(STORIES260K) as server:
        yield server


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """Random weights with a long context: greedy from them hardly ever samples EOS, so a story
    runs its full max_tokens, long enough to kill its client or fill the queue meanwhile."""
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=1024)
    state = Transformer(args).state_dict()
    # BOS and EOS (tok512's ids 1 and 2) score 0 against every state, below the best of the
    # 510 others: no story ends early
    state["tok_embeddings.weight"][1:3] = 0
    path = str(tmp_path_factory.mktemp("slow") / "ckpt.pt")
    save_checkpoint(path, {"model": state, "model_args": vars(args), "config": {"tokenizer": TOK512}})
    return path


def chain_model(path, tokenizer, text):
    """A hand-built plain model whose greedy story is `text` (after its first token) and then EOS:
    no attention, and a feed-forward unit per link that turns token i's embedding (a basis
    vector of its own) into the next token's."""
    from tokenizer import Tokenizer
    chain = Tokenizer(tokenizer).encode(text)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=128)
    state = {k: torch.zeros_like(v) for k, v in Transformer(args).state_dict().items()}
    for name in state:
        if name.endswith("norm.weight"):
            state[name][:] = 1
    embedding = state["output.weight"] = state["tok_embeddings.weight"]  # tied
    links = list(zip(chain, chain[1:] + [2]))  # tok512's EOS is 2
    for j, token in enumerate(chain + [2]):
        embedding[token, j] = 1.0
    for j, (_, following) in enumerate(links):
        state["layers.0.feed_forward.w1.weight"][j, j] = state["layers.0.feed_forward.w3.weight"][j, j] = 1.0
        state["layers.0.feed_forward.w2.weight"][:, j] = 10 * embedding[following]
    save_checkpoint(path, {"model": state, "model_args": vars(args), "config": {"tokenizer": tokenizer}})
    return path


@pytest.fixture(scope="module")
def unicode_model(tmp_path_factory):
    return chain_model(str(tmp_path_factory.mktemp("chain") / "ckpt.pt"), TOK512, UNICODE_STORY)


@pytest.fixture(scope="module")
def unicode_server(unicode_model):
    with Server(unicode_model, "--max_queue=2") as server:
        yield server


@pytest.fixture(scope="session")
def instruct_model(tmp_path_factory):
    """A tiny instruct storyteller that writes dialogue: `make demo`'s recipe (its data step as
    test_quickstart runs it, on 600 demo stories), trained 400 steps at dim 64 (about a minute
    on one core). Held-out word triples then get quoted speech when dialogue is asked for."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    demo_dir = tmp_path_factory.mktemp("instruct") / "demo"
    run_make("demo-data", demo_dir)
    done = subprocess.run(
        [sys.executable, "train.py", "configs/demo_instruct.py", f"--data_dir={demo_dir}/data",
         "--vocab_size=1024", "--max_seq_len=192", f"--out_dir={demo_dir}/instruct", "--dim=64",
         "--n_layers=2", "--n_heads=4", "--n_kv_heads=4", "--max_iters=400", "--eval_interval=400",
         "--eval_iters=1", "--log_interval=100"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return str(demo_dir / "instruct" / "ckpt.pt")


@pytest.fixture(scope="module")
def instruct_server(instruct_model):
    with Server(instruct_model) as server:
        yield server


def sse_events(raw: str):
    return [json.loads(block[6:]) for block in raw.split("\n\n") if block.startswith("data: {")]


# ---- the official openai client ----------------------------------------------------------------

def test_openai_client_gets_completions_chat_and_a_stream(stories_server):
    import openai
    client = openai.OpenAI(base_url=stories_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    assert [m.id for m in client.models.list()] == ["stories260K.pt"]

    # greedy from a lone BOS: the story published for stories260K (formats.md section 9)
    completion = client.completions.create(model="stories260K.pt", prompt="", max_tokens=200, temperature=0)
    assert completion.choices[0].text == greedy_story()
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 1 and completion.usage.completion_tokens == 200

    chat = client.chat.completions.create(model="stories260K.pt", max_tokens=40, temperature=0,
                                          messages=[{"role": "system", "content": "ignored"},
                                                    {"role": "user", "content": "Once upon a time"}])
    plain = client.completions.create(model="stories260K.pt", prompt="Once upon a time", max_tokens=40, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text != ""
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = client.completions.create(model="stories260K.pt", prompt="Once upon a time", max_tokens=40,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 5  # it came in pieces
    assert text == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    chat_stream = client.chat.completions.create(model="x", max_tokens=40, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Once upon a time"}])
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == plain.choices[0].text


def test_stop_n_and_unsupported_fields(stories_server):
    import openai
    client = openai.OpenAI(base_url=stories_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    full = client.completions.create(model="m", prompt="", max_tokens=60, temperature=0).choices[0].text
    assert "." in full
    # neutral values of fields we do not implement are accepted; others are refused, naming the field
    cut = client.completions.create(model="m", prompt="", max_tokens=60, temperature=0, stop=["."],
                                    logprobs=None, presence_penalty=0, frequency_penalty=0.0, best_of=1, user="me")
    assert cut.choices[0].text == full[:full.index(".")] and cut.choices[0].finish_reason == "stop"
    for field, value in [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"50": 5}),
                         ("best_of", 3), ("suffix", "The end.")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="m", prompt="", max_tokens=5, **{field: value})
        assert refused.value.body["param"] == field and refused.value.body["code"] == "unsupported_parameter"
    streamed = client.completions.create(model="m", prompt="", max_tokens=60, temperature=0, stop=".", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(".")]
    # the earliest stop string in the text wins, whatever its place in the list
    earliest = client.completions.create(model="m", prompt="", max_tokens=60, temperature=0, stop=[".", " "])
    assert earliest.choices[0].text == full[:full.index(" ")]
    # a temperature too small to divide logits by is greedy, not garbage
    tiny = client.completions.create(model="m", prompt="", max_tokens=60, temperature=1e-50)
    assert tiny.choices[0].text == full

    several = client.completions.create(model="m", prompt="Tom", max_tokens=30, temperature=1.0, n=3, seed=5)
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    assert len({c.text for c in several.choices}) > 1
    alone = client.completions.create(model="m", prompt="Tom", max_tokens=1, temperature=0)
    assert several.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt counts once, not n times
    again = client.completions.create(model="m", prompt="Tom", max_tokens=30, temperature=1.0, n=3, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in several.choices]  # a seed repeats


def test_finish_chunks_come_as_each_choice_ends(stories_server):
    """Two greedy choices that stop at their first "," after different numbers of tokens: the
    first to end has its finish chunk sent while the other still streams text."""
    status, raw, _ = stories_server.post("/v1/completions", {"prompt": ["Tom", "Once upon a time"], "stop": ",",
                                                             "max_tokens": 80, "temperature": 0, "stream": True})
    assert status == 200
    events = [choice for event in sse_events(raw) for choice in event["choices"]]
    finishes = [n for n, e in enumerate(events) if e["finish_reason"]]
    assert sorted(events[n]["index"] for n in finishes) == [0, 1]
    first = events[finishes[0]]["index"]
    assert any(e["text"] and e["index"] != first for e in events[finishes[0]:]), events


def test_no_max_tokens_runs_the_story_to_its_end(stories_server):
    """A completion without max_tokens is a whole story (until EOS or the full context), as
    generate.py writes one, not OpenAI's 16 tokens."""
    status, answer, _ = stories_server.post("/v1/completions", {"prompt": "", "temperature": 0})
    assert status == 200 and answer["choices"][0]["text"].startswith(greedy_story())
    assert answer["usage"]["completion_tokens"] > 200


# ---- text the tokenizer spells in byte pieces ---------------------------------------------------------

def test_streamed_text_keeps_characters_spelled_in_byte_pieces(unicode_server):
    """The model's greedy story is UNICODE_STORY: streamed, in each endpoint, it arrives whole and
    equal to the answer not streamed, with no U+FFFD in any chunk."""
    expected = UNICODE_STORY[1:]  # after the prompt "c"
    whole = unicode_server.post("/v1/completions", {"prompt": "c", "temperature": 0})[1]
    assert whole["choices"][0]["text"] == expected, whole
    status, raw, _ = unicode_server.post("/v1/completions", {"prompt": "c", "temperature": 0, "stream": True})
    pieces = [c["text"] for e in sse_events(raw) for c in e["choices"]]
    assert status == 200 and "".join(pieces) == expected and not any("\ufffd" in p for p in pieces), pieces
    assert len([p for p in pieces if p]) > 5  # it came in pieces
    status, raw, _ = unicode_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "c"}],
                                                                  "temperature": 0, "stream": True})
    assert "".join(c["delta"].get("content", "") for e in sse_events(raw) for c in e["choices"]) == expected
    status, raw, _ = unicode_server.post("/v1/stories", {"prompt": "c", "temperature": 0, "stream": True})
    assert "".join(e.get("text", "") for e in sse_events(raw)) == expected


def test_room_for_new_tokens_and_the_queue_bound(unicode_server):
    """The same room as generate.py (context - prompt + 1), OpenAI's error code past it; a request
    with more stories than --max_queue is a 400, not a 503 to retry forever; every request logged."""
    prompt = {"prompt": "c", "temperature": 0}  # 2 tokens of the 128-token context
    assert unicode_server.post("/v1/completions", {**prompt, "max_tokens": 127})[0] == 200
    status, answer, _ = unicode_server.post("/v1/completions", {**prompt, "max_tokens": 128})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert answer["error"]["param"] == "max_tokens"
    status, answer, _ = unicode_server.post("/v1/completions", {**prompt, "n": 3})
    assert status == 400 and answer["error"]["param"] == "n" and "--max_queue" in answer["error"]["message"]
    assert unicode_server.post("/v1/completions", {**prompt, "n": 2})[0] == 200
    log = unicode_server.log()
    assert '"POST /v1/completions HTTP/1.1" 400' in log and '"POST /v1/completions HTTP/1.1" 200' in log, log


def test_instruct_flag_reads_a_file_made_elsewhere_as_an_instruct_model(unicode_model):
    """--instruct (as generate.py's): the prompt is encoded as an instruct one (text, then BOS);
    --no-access_log silences the request lines."""
    from prompts import prompt_ids
    from tokenizer import Tokenizer
    with Server(unicode_model, "--instruct", "--no-access_log") as server:
        health = server.get("/health")[1]
        answer = server.post("/v1/completions", {"prompt": "café", "max_tokens": 3})[1]
        log = server.log()
    assert health["instruct"] is True
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids(Tokenizer(TOK512), "café", True, "plain"))
    assert "POST" not in log and "GET /health" not in log, log


# ---- batching ------------------------------------------------------------------------------------

def test_greedy_stories_are_the_same_alone_and_in_a_batch(stories_server):
    prompts = ["", "Once upon a time", "Tom had a big red ball and", "The sun was hot. Lily and her mom went to"]
    body = lambda p: {"prompt": p, "max_tokens": 150, "temperature": 0}
    alone = [stories_server.post("/v1/completions", body(p))[1]["choices"][0]["text"] for p in prompts]

    # the same requests, each joining while others (sampled ones too) are mid-story
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = []
        for i in range(3):
            futures += [pool.submit(stories_server.post, "/v1/completions",
                                    {"prompt": "Lily", "max_tokens": 200, "temperature": 1.0})]
            futures += [pool.submit(stories_server.post, "/v1/completions", body(p)) for p in prompts]
            time.sleep(0.05 * i)
        answers = [f.result() for f in futures]
    assert all(status == 200 for status, _, _ in answers)
    batched = [a[1]["choices"][0]["text"] for i, a in enumerate(answers) if i % 5]
    assert batched == alone * 3
    assert alone[0] == greedy_story()[:len(alone[0])]


def test_queue_full_is_503_with_retry_after(slow_model):
    with Server(slow_model, "--max_batch=1", "--max_queue=1") as server:
        long = {"prompt": "", "max_tokens": 300, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(server.post, "/v1/completions", long)
            while server.get("/health")[1]["running"] < 1:
                time.sleep(0.05)
            waiting = pool.submit(server.post, "/v1/completions", long)
            while server.get("/health")[1]["waiting"] < 1:
                time.sleep(0.05)
            status, payload, headers = server.post("/v1/completions", long)
            assert server.get("/health")[1]["running"] == 1  # the first still ran: the queue was full
            assert status == 503 and headers.get("retry-after") == "1", (status, payload)
            assert "busy" in payload["error"]["message"]
            assert running.result()[0] == 200 and waiting.result()[0] == 200


KILLED_CLIENT = r"""
import http.client, json, sys
stream = sys.argv[2] == "stream"
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "", "max_tokens": 1000,
                   "temperature": 0, "stream": stream}), headers={"Content-Type": "application/json"})
if stream:
    response = connection.getresponse()
    assert response.status == 200
    response.fp.readline()
print("waiting", flush=True)
sys.stdin.read()  # until killed
"""


def test_killed_clients_free_their_rows(slow_model):
    """10 clients killed mid-story, 6 of them streaming, 4 waiting for a whole answer."""
    with Server(slow_model, "--max_batch=10") as server:
        clients = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(server.port), mode],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for mode in ["stream"] * 6 + ["whole"] * 4]
        try:
            for client in clients:
                assert client.stdout.readline().strip() == "waiting"
            deadline = time.monotonic() + 30
            while server.get("/health")[1]["running"] < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.get("/health")[1]["running"] == 10
        finally:
            for client in clients:
                client.kill()
                client.wait()
        deadline = time.monotonic() + 10
        while (health := server.get("/health")[1])["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["running"] == 0 and health["waiting"] == 0
        assert health["rows_cancelled"] == 10
        assert health["tokens_generated"] < 10 * 1000 / 2  # freed mid-story, not run to the end

        # the next 10 get all ten rows: each runs beside the others, none waits for a row
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: server.post("/v1/completions", {"prompt": "", "max_tokens": 50,
                                                                             "temperature": 0}), range(10)))
        assert [a[0] for a in answers] == [200] * 10
        texts = {a[1]["choices"][0]["text"] for a in answers}
        assert len(texts) == 1 and all(a[1]["usage"]["completion_tokens"] == 50 for a in answers)
        assert server.get("/health")[1]["rows_cancelled"] == 10


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", b'{"prompt": "Once"', "body"),
    ("/v1/completions", b"[1, 2]", "body"),
    ("/v1/completions", b"\xff\xfe", "body"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": "20"}, "max_tokens"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 512}, "max_tokens"),  # prompt + 512 > context
    ("/v1/completions", {"prompt": "Once", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "Once", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "Once", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "Once", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "Once", "stop": [""]}, "stop"),
    ("/v1/completions", b'{"prompt": "Once \\ud800"}', "prompt"),  # a lone surrogate: JSON, but not Unicode text
    ("/v1/completions", b'{"prompt": ["Once", "\\udfff"]}', "prompt[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/stories", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", {"prompt": "Once upon a time " * 200}, "prompt"),  # longer than the context
    ("/v1/completions", b'{"prompt": "' + b"a" * 300_000 + b'"}', "body"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/stories", {"verb": "run", "noun": "cat", "adjective": "big"}, "verb"),  # a plain model
])
def test_bad_requests_are_400_naming_the_field(stories_server, path, body, field):
    status, payload, _ = stories_server.post(path, body)
    assert status == 400, payload
    assert payload["error"]["param"] == field and payload["error"]["message"].startswith(field)
    assert stories_server.get("/health")[0] == 200


def test_health_answers_after_the_bad_requests(stories_server):
    """The refused bodies above (the fuzzed ones run in-process: test_openai_api.py) left no row behind."""
    status, payload, _ = stories_server.get("/health")
    assert status == 200 and payload["status"] == "ok" and payload["running"] == 0


# ---- instruct models: /v1/stories and the page ------------------------------------------------

def test_stories_endpoint_words_the_prompt_as_generate_does(instruct_server, instruct_model):
    from decoding import load_for_sampling, sample_stories
    from prompts import build_prompt, prompt_ids
    model, ckpt, tokenizer = load_for_sampling(instruct_model, None, "cpu", "float32")
    ids = prompt_ids(tokenizer, build_prompt("climb", "ring", "messy", ["Dialogue"]), True, ckpt.prompt_encoding)
    expected = tokenizer.decode(sample_stories(model, tokenizer, [ids], 120, 0.0, None, 1.0)[0])

    status, answer, _ = instruct_server.post("/v1/stories", {"verb": "climb", "noun": "ring", "adjective": "messy",
                                                             "features": ["dialogue"], "temperature": 0,
                                                             "max_tokens": 120})
    assert status == 200, answer
    assert answer["story"] == expected and answer["prompt"] == build_prompt("climb", "ring", "messy", ["Dialogue"])
    assert answer["tokens"] > 0 and answer["tokens_per_s"] > 0

    for body, field in [({"verb": "cl1mb", "noun": "ring", "adjective": "messy"}, "verb"),
                        ({"verb": "climb", "noun": "a ring", "adjective": "messy"}, "noun"),
                        ({"verb": "climb", "noun": "ring"}, "adjective"),
                        ({"verb": "climb", "noun": "ring", "adjective": "messy", "features": ["poetry"]}, "features")]:
        status, payload, _ = instruct_server.post("/v1/stories", body)
        assert status == 400 and payload["error"]["param"] == field, payload


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium with a fresh profile, driven through chromedriver."""
    if not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_in_headless_chromium_writes_a_story_with_dialogue(instruct_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(instruct_server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "verb").is_displayed())
    assert not browser.find_element(By.ID, "prompt").is_displayed()  # the instruct form, not the free one
    for field, word in (("verb", "climb"), ("noun", "ring"), ("adjective", "messy")):
        browser.find_element(By.ID, field).send_keys(word)
    browser.find_element(By.ID, "feature-dialogue").click()
    write_greedily(browser, wait)
    story = browser.find_element(By.ID, "story").text
    assert "tokens/s" in browser.find_element(By.ID, "stats").text
    assert story.count('"') >= 2, story  # quoted speech


def write_greedily(browser, wait):
    """Set the page's temperature to 0, press the button, and wait for the story to finish cleanly."""
    from selenium.webdriver.common.by import By
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "write").click()
    wait.until(lambda b: b.find_element(By.ID, "stats").text or b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""


def test_page_for_a_plain_model_continues_a_free_prompt(stories_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(stories_server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "prompt").is_displayed())
    assert not browser.find_element(By.ID, "verb").is_displayed()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Tom had a big red ball")
    write_greedily(browser, wait)
    expected = stories_server.post("/v1/completions", {"prompt": "Tom had a big red ball", "temperature": 0,
                                                       "max_tokens": 200})[1]["choices"][0]["text"]
    story = browser.find_element(By.ID, "story").text
    # the page's story runs to the end of the context; its start is the greedy continuation
    assert story.startswith("Tom had a big red ball" + expected.split("\n")[0].rstrip())


def test_compiled_server_batches_the_same_greedy_stories():
    """--compile: one compiled decode step for every batch size; the published story alone,
    and the same story from each row of a batch."""
    # it compiles before it listens: 25-45 s on 2 quiet cores, minutes on busy ones
    with Server(STORIES260K, "--compile", start_timeout=600) as server:
        body = {"prompt": "", "max_tokens": 200, "temperature": 0}
        assert server.post("/v1/completions", body)[1]["choices"][0]["text"] == greedy_story()
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: server.post("/v1/completions", body), range(5)))
        assert [a[1]["choices"][0]["text"] for a in answers] == [greedy_story()] * 5


# ---- the command line and shutdown -----------------------------------------------------------

def test_sigterm_finishes_the_running_story_and_exits_0(slow_model):
    server = Server(slow_model)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        story = pool.submit(server.post, "/v1/completions", {"prompt": "", "max_tokens": 300, "temperature": 0})
        while server.get("/health")[1]["running"] < 1:
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):
            server.get("/health")  # no longer listening
        status, answer, _ = story.result()
    assert status == 200 and answer["usage"]["completion_tokens"] == 300
    assert server.process.wait(60) == 0
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("flags, mentions", [(["--port=abc"], "--port"), (["--quantize=int4"], "--quantize"),
                                            (["--max_batch=0"], "--max_batch"), (["--port=70000"], "--port")])
def test_cli_misuse_is_one_line_exit_2(flags, mentions):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--model_path=nowhere.pt", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and mentions in done.stderr, done.stderr


def test_missing_model_and_busy_port_are_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), f"--model_path={tmp_path}/none.pt",
                           f"--port={free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "none.pt" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), f"--model_path={tmp_path}/none.pt",
                               f"--port={port}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and str(port) in done.stderr


# ---- an engine that fails mid-story ------------------------------------------------------------------

def test_an_engine_failure_mid_story_is_a_server_error(monkeypatch):
    """The app in-process over a real engine whose decode step raises from its fourth call: a stream
    gets an error event (type server_error) and still [DONE]; a whole answer is a 500 server_error."""
    from starlette.testclient import TestClient
    from batching import BatchEngine
    from decoding import load_for_sampling
    from serve import Storyteller, create_app
    model, ckpt, tokenizer = load_for_sampling(STORIES260K, None, "cpu", "float32")
    engine = BatchEngine(model.eval(), (tokenizer.eos_id, tokenizer.bos_id), max_batch=2, max_queue=4)
    calls, decode = [], engine.step_fn

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) % 4 == 0:
            raise RuntimeError("out of memory")
        return decode(*args, **kwargs)
    monkeypatch.setattr(engine, "step_fn", failing)
    engine.start()
    try:
        with TestClient(create_app(Storyteller(engine, tokenizer, ckpt, "m"))) as client:
            body = {"prompt": "", "max_tokens": 50, "temperature": 0}
            raw = client.post("/v1/completions", json={**body, "stream": True}).text
            answer = client.post("/v1/completions", json=body)
    finally:
        engine.stop(timeout=10)
    events = sse_events(raw)
    assert events[0]["choices"][0]["text"] and events[-1]["error"]["type"] == "server_error", events
    assert "out of memory" in events[-1]["error"]["message"] and raw.endswith("data: [DONE]\n\n")
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"


def test_page_keeps_an_emoji_and_accents_typed_into_the_prompt(unicode_server, browser):
    """Typed as a person types them (the emoji as an emoji keyboard or IME enters it: ChromeDriver's
    keys stop at the BMP). The model's story goes on as UNICODE_STORY: from "café" the dragon is
    streamed, in byte pieces; from "café 🐉" just " ok."."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(unicode_server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "prompt").is_displayed())
    prompt = browser.find_element(By.ID, "prompt")
    for typed, emoji in (("café", ""), ("café ", "🐉")):
        prompt.clear()
        prompt.send_keys(typed)
        if emoji:
            browser.execute_cdp_cmd("Input.insertText", {"text": emoji})
        write_greedily(browser, wait)
        assert browser.find_element(By.ID, "story").text == UNICODE_STORY


def test_page_does_not_submit_an_empty_form(instruct_server, browser):
    """The three words are required: an empty form sends nothing (no placeholder words), and says why."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(instruct_server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "verb").is_displayed())
    requests_before = instruct_server.log().count("POST /v1/stories")
    browser.find_element(By.ID, "write").click()
    time.sleep(1)
    assert browser.execute_script("return document.getElementById('verb').validity.valueMissing")
    assert browser.find_element(By.ID, "story").text == ""
    assert instruct_server.log().count("POST /v1/stories") == requests_before


# ---- log probabilities, for evaluation harnesses ----------------------------------------------------------

def forward_logprobs(ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from stories260K's own forward over the whole sequence."""
    from checkpoints import load_model
    model, _ = load_model(STORIES260K)
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([ids]), all_logits=True)
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))], logp


def test_echo_and_logprobs_are_the_models_own(stories_server):
    """echo with max_tokens 0 scores the prompt: null for its first token, then each token's log
    probability and its top alternatives as the model's forward gives them; logprobs on a greedy
    story: each token is its step's likeliest."""
    from tokenizer import Tokenizer
    ids = [1] + Tokenizer(TOK512).encode("Once upon a time, there was a big dog")
    status, answer, _ = stories_server.post("/v1/completions", {"prompt": ids, "echo": True, "logprobs": 3,
                                                                "max_tokens": 0})
    assert status == 200, answer
    [choice] = answer["choices"]
    expected, logp = forward_logprobs(ids)
    assert choice["text"] == "Once upon a time, there was a big dog" and choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    tops = choice["logprobs"]["top_logprobs"]
    assert tops[0] is None and all(len(top) == 3 for top in tops[1:])
    assert list(tops[1].values()) == pytest.approx(logp[0].topk(3).values.tolist(), abs=1e-4)
    assert "".join(choice["logprobs"]["tokens"]).strip() == choice["text"]
    offsets = choice["logprobs"]["text_offset"]
    assert [choice["text"][o:o + 5] for o in offsets[1:4]] == ["Once ", " upon", " a ti"]

    greedy = stories_server.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                                                     "logprobs": 2})[1]["choices"][0]
    story = greedy["logprobs"]
    assert len(story["tokens"]) == 12 and "".join(story["tokens"]) == greedy["text"]
    assert all(lp == max(top.values()) for lp, top in zip(story["token_logprobs"], story["top_logprobs"]))
    whole = [1] + Tokenizer(TOK512).encode("Once upon a time" + greedy["text"])
    assert story["token_logprobs"] == pytest.approx(forward_logprobs(whole)[0][-12:], abs=1e-4)


def test_lm_evaluation_harness_scores_a_task_through_the_server(stories_server):
    """lm-evaluation-harness's own local-completions model (with the server's /tokenize) runs a
    small multiple-choice task of ours (tests/data/lm_eval); every loglikelihood it reports is the
    model's own forward over the same tokens, to 1e-4."""
    import lm_eval  # a test dependency: the Makefile's TEST_PACKAGES
    from lm_eval.tasks import TaskManager
    from tokenizer import Tokenizer
    tokenizer = Tokenizer(TOK512)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["storyteller_cloze"], log_samples=True,
        model_args={"base_url": stories_server.url + "/v1/completions", "model": "stories260K",
                    "tokenizer_backend": "remote", "tokenized_requests": True, "max_length": 512, "max_retries": 1},
        task_manager=TaskManager(include_path=os.path.join(TEST_DATA, "lm_eval")))
    samples = out["samples"]["storyteller_cloze"]
    assert len(samples) == 4 and out["results"]["storyteller_cloze"]["acc,none"] == 1.0
    for sample in samples:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"]):
            # the harness's own layout: no BOS, the continuation's tokens as the whole text spells them
            context_ids = tokenizer.encode(context)
            ids = context_ids + tokenizer.encode(context + continuation)[len(context_ids):]
            assert loglikelihood == pytest.approx(sum(forward_logprobs(ids)[0][len(context_ids) - 1:]), abs=1e-4)


def test_api_key_and_cors(unicode_model):
    """--api_key: the API wants the Bearer key (401 without it, or with another), as the openai
    client sends it; the page and /health stay open. --cors: a browser's preflight from the named
    origin is allowed, with the key check after it."""
    import openai
    with Server(unicode_model, "--api_key=s3cret", "--cors=http://localhost:3000") as server:
        status, answer, headers = server.post("/v1/completions", {"prompt": "c", "max_tokens": 2})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        wrong = server.post("/v1/completions", {"prompt": "c"}, headers={"Authorization": "Bearer s3cre"})
        assert wrong[0] == 401 and server.get("/health")[0] == 200 and server.get("/")[0] == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert client.completions.create(model="m", prompt="c", temperature=0).choices[0].text == UNICODE_STORY[1:]
        preflight = server.request("OPTIONS", "/v1/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight[0] == 200 and preflight[2]["access-control-allow-origin"] == "http://localhost:3000"
        other = server.request("OPTIONS", "/v1/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other[2]
        answered = server.post("/v1/completions", {"prompt": "c", "max_tokens": 2},
                               headers={"Authorization": "Bearer s3cret", "Origin": "http://localhost:3000"})
        assert answered[0] == 200 and answered[2]["access-control-allow-origin"] == "http://localhost:3000"
