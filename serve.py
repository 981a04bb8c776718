"""Serve a storyteller: a page to write stories in a browser, and an OpenAI-compatible API.

    python serve.py --model_path=out/demo/instruct/ckpt.pt      # then open http://127.0.0.1:8000/
    python serve.py --model_path=stories15M.pt --quantize=int8 --port=8080

Endpoints: GET / (the page), POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health, and POST /v1/stories {verb, noun, adjective, features} (or {prompt}), which words
the prompt as prompts.py does and encodes it as the model's training data was.

Requests that arrive together are sampled together: batching.py's engine runs one step for
every running story, and a new request joins at the next step. Past --max_batch running and
--max_queue waiting, requests are answered 503 with Retry-After. SIGTERM (or Ctrl-C) stops
taking requests, lets running ones finish for up to --shutdown_timeout seconds, and exits 0.

The chat endpoint has no chat template to follow (these models were never trained on one): the
last user message is the prompt, read as an instruction by an instruct model and continued by
a plain one.
"""
import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import sys
import time
import uuid

from cli import OneLineParser, UsageError, check_device, default_device, positive_int, report_error, run_main

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
MAX_BODY_BYTES = 256 * 1024
MAX_CHOICES = 8  # n times the number of prompts, per request
MAX_STOP_STRINGS = 4  # OpenAI's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
WORD = re.compile(r"[A-Za-z][A-Za-z'-]{0,29}")


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint: .pt, llama2.c .bin, LoRA adapter")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the checkpoint's own)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=default_device())
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 matmuls, quantized at load time")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (dynamic batch size), before the server starts listening: "
                        "25-45 s on 2 cores")
    p.add_argument("--max_batch", type=positive_int, default=16, help="stories sampled together at most")
    p.add_argument("--max_queue", type=positive_int, default=64,
                   help="requests waiting for a row at most; past it: 503 with Retry-After")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    return p


class BadRequest(Exception):
    """A request body we refuse: 400 with {"error": {"message", "type", "param"}}."""

    def __init__(self, param, message, status=400):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status = param, status


# ---- reading a request's fields: each check names the field it refuses --------------------------

def _number(body, name, default, low, high, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    # bool is an int to Python, not to JSON
    if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, float) and not math.isfinite(value)):
        raise BadRequest(name, f"expected {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise BadRequest(name, f"expected {low}..{high}, got {value}")
    return value


def _bool(body, name, default=False):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(name, f"expected true or false, got {json.dumps(value)[:40]}")
    return value


def _stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop", "expected a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return stops


def _word(body, name):
    value = body.get(name)
    if not isinstance(value, str) or not WORD.fullmatch(value.strip()):
        raise BadRequest(name, f"expected one English word (letters, up to 30), got {json.dumps(value)[:40]}")
    return value.strip()


def message_text(content, where):
    """A message's content: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(where, "expected a string or a list of {\"type\": \"text\", \"text\": ...} parts")


class Storyteller:
    """The model and its tokenizer as the HTTP side sees them: prompts in, token events out."""

    def __init__(self, engine, tokenizer, ckpt, name):
        self.engine, self.tokenizer, self.ckpt, self.name = engine, tokenizer, ckpt, name
        self.instruct = ckpt.is_instruct
        self.context = ckpt.model_args.max_seq_len

    def encode(self, text, param):
        from prompts import prompt_ids
        ids = prompt_ids(self.tokenizer, text, self.instruct, self.ckpt.prompt_encoding)
        if len(ids) >= self.context:
            raise BadRequest(param, f"the prompt is {len(ids)} tokens; the model's context is {self.context}")
        return ids

    def budget(self, body, prompts, default):
        """max_tokens (or max_completion_tokens), checked against the context left by the longest prompt."""
        name = "max_completion_tokens" if body.get("max_tokens") is None and \
            body.get("max_completion_tokens") is not None else "max_tokens"
        room = self.context - max(len(p) for p in prompts)
        value = _number(body, name, None, 1, self.context, integer=True)
        if value is None:
            return min(default or room, room)
        if value > room:
            raise BadRequest(name, f"{value} new tokens after a prompt of {max(len(p) for p in prompts)} "
                                   f"exceed the model's context of {self.context} tokens (at most {room})")
        return value

    def sampling(self, body, temperature=1.0, top_k=None):
        top_p = _number(body, "top_p", 1.0, 0, 1)
        if top_p == 0:  # OpenAI takes 0 too; the nucleus then holds just the likeliest token
            top_p = 1e-9
        return dict(temperature=_number(body, "temperature", temperature, 0, 2), top_p=top_p,
                    top_k=_number(body, "top_k", top_k, 1, self.tokenizer.vocab_size, integer=True),
                    seed=_number(body, "seed", None, 0, 2**62, integer=True))


class Choice:
    """One sampled story, fed from the engine's thread into this request's asyncio queue; the
    text is decoded as it grows, cut at a stop string."""

    def __init__(self, loop, teller, prompt_ids, stops, index):
        from batching import Sequence
        self.teller, self.stops, self.index = teller, stops, index
        # a plain model's story continues its prompt: decode them together so that the first
        # word keeps its space; an instruct model's story starts after the prompt's BOS
        self.prefix = [] if teller.instruct else list(prompt_ids)
        self.prefix_text = teller.tokenizer.decode(self.prefix)
        self.ids, self.text, self.sent = [], "", 0
        self.finish_reason = None
        self.events = asyncio.Queue()
        self.seq = Sequence(prompt_ids, 0, lambda kind, value: loop.call_soon_threadsafe(
            self.events.put_nowait, (kind, value)))

    async def chunks(self):
        """Yields the new text after every token, until the story ends."""
        while self.finish_reason is None:
            kind, value = await self.events.get()
            if kind == "error":
                raise RuntimeError(value)
            if kind == "done":
                self.finish_reason = value
                pending = self.text[self.sent:]
            else:
                self.ids.append(value)
                self.text = self.teller.tokenizer.decode(self.prefix + self.ids)[len(self.prefix_text):]
                pending = self._unsent()
            if pending:
                self.sent += len(pending)
                yield pending

    def _unsent(self):
        """The text not yet sent, held back while its end could still become a stop string."""
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                self.seq.cancel()
                return self.text[self.sent:]
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = len(self.text)
        for cut in range(max(self.sent, safe - hold), safe):
            if any(s.startswith(self.text[cut:]) for s in self.stops):
                safe = cut
                break
        return self.text[self.sent:safe]

    async def finish(self):
        async for _ in self.chunks():
            pass
        return self.text


def create_app(teller, shutdown_timeout=30.0):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from batching import QueueFull, ShuttingDown

    app = FastAPI(title="storyteller", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status, message, param=None, kind="invalid_request_error", headers=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status, headers=headers)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return error(exc.status, str(exc), exc.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc):
        return error(503, f"busy: {exc}; retry shortly", kind="server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request, exc):
        return error(503, str(exc), kind="server_busy", headers={"Retry-After": "5"})

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def wrong_method(request, exc):
        return error(405, f"{request.url.path} does not take {request.method}")

    async def read_body(request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadRequest("body", f"{declared} bytes; at most {MAX_BODY_BYTES}")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY_BYTES:
                raise BadRequest("body", f"over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("body", f"not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadRequest("body", "expected a JSON object")
        return body

    def start(prompts, body, max_tokens, sampling, stops):
        """One Choice per prompt and per n, all queued at once (or none: QueueFull)."""
        n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
        if n * len(prompts) > MAX_CHOICES:
            raise BadRequest("n", f"{n} choices for each of {len(prompts)} prompts: at most {MAX_CHOICES} in all")
        loop = asyncio.get_running_loop()
        choices = []
        for ids in prompts:
            for _ in range(n):
                choice = Choice(loop, teller, ids, stops, len(choices))
                choice.seq.max_new_tokens = max_tokens
                choice.seq.temperature, choice.seq.top_k = sampling["temperature"], sampling["top_k"]
                choice.seq.top_p = sampling["top_p"]
                # n choices from one seed must still differ
                choice.seq.seed = None if sampling["seed"] is None else sampling["seed"] + len(choices)
                choices.append(choice)
        teller.engine.submit([c.seq for c in choices])
        return choices

    def usage(prompts, choices, n):
        prompt_tokens = sum(len(p) for p in prompts) * n
        completion_tokens = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def merged(choices):
        """(choice, text) as any choice produces text, until all are done."""
        queue = asyncio.Queue()

        async def pump(choice):
            try:
                async for text in choice.chunks():
                    await queue.put((choice, text))
            except RuntimeError as exc:
                await queue.put((choice, exc))
            await queue.put((choice, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining = len(choices)
            while remaining:
                choice, text = await queue.get()
                if isinstance(text, Exception):
                    raise text
                if text is None:
                    remaining -= 1
                else:
                    yield choice, text
        finally:
            for task in tasks:
                task.cancel()
            for choice in choices:
                choice.seq.cancel()  # a client gone mid-story frees its rows

    async def collect(request, choices):
        """Wait for every choice; a client that disconnects meanwhile frees its rows."""
        waiter = asyncio.ensure_future(asyncio.gather(*(c.finish() for c in choices)))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.5)
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    return None
        except RuntimeError as exc:
            raise BadRequest(None, str(exc), status=500) from None
        finally:
            waiter.cancel()
            for choice in choices:
                choice.seq.cancel()

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def streaming(events):
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_options(body):
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
            raise BadRequest("stream_options", "expected {\"include_usage\": true or false}")
        return bool(options and options.get("include_usage"))

    # ---- the page, models, health ----------------------------------------------------------

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        running, waiting = teller.engine.load()
        from prompts import FEATURE_PHRASES
        return {"status": "ok", "model": teller.name, "instruct": teller.instruct,
                "features": list(FEATURE_PHRASES), "context": teller.context,
                "running": running, "waiting": waiting, "max_batch": teller.engine.max_batch,
                "tokens_generated": teller.engine.tokens_out, "decode_steps": teller.engine.steps,
                "rows_cancelled": teller.engine.rows_cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": teller.name, "object": "model", "created": teller.created,
                                            "owned_by": "storyteller"}]}

    # ---- OpenAI completions ----------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = prompt
        else:
            raise BadRequest("prompt", "expected a string or a non-empty list of strings")
        if len(texts) > MAX_CHOICES:
            raise BadRequest("prompt", f"{len(texts)} prompts; at most {MAX_CHOICES}")
        prompts = [teller.encode(t, "prompt") for t in texts]
        max_tokens = teller.budget(body, prompts, COMPLETIONS_DEFAULT_MAX_TOKENS)
        sampling, stops, stream = teller.sampling(body), _stop_strings(body), _bool(body, "stream")
        include_usage = stream_options(body)
        n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
        choices = start(prompts, body, max_tokens, sampling, stops)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": teller.name}
        if not stream:
            await collect(request, choices)
            return {**head, "choices": [{"index": c.index, "text": c.text, "logprobs": None,
                                         "finish_reason": c.finish_reason} for c in choices],
                    "usage": usage(prompts, choices, n)}

        async def events():
            async for choice, text in merged(choices):
                yield sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": None,
                                                "finish_reason": None}]})
            for c in choices:
                yield sse({**head, "choices": [{"index": c.index, "text": "", "logprobs": None,
                                                "finish_reason": c.finish_reason}]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompts, choices, n)})
            yield "data: [DONE]\n\n"
        return streaming(events())

    # ---- OpenAI chat completions -----------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages", "expected a non-empty list of {role, content}")
        prompt = None
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"messages[{i}]", "expected {\"role\": ..., \"content\": ...}")
            if message["role"] == "user":
                prompt = message_text(message.get("content"), f"messages[{i}].content")
        if prompt is None:
            raise BadRequest("messages", "no user message: its content is the prompt")
        prompts = [teller.encode(prompt, "messages")]
        max_tokens = teller.budget(body, prompts, None)
        sampling, stops, stream = teller.sampling(body), _stop_strings(body), _bool(body, "stream")
        include_usage = stream_options(body)
        n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
        choices = start(prompts, body, max_tokens, sampling, stops)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": teller.name}
        if not stream:
            await collect(request, choices)
            return {**head, "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                                         "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
                    "usage": usage(prompts, choices, n)}
        head["object"] = "chat.completion.chunk"

        async def events():
            for c in choices:
                yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for choice, text in merged(choices):
                yield sse({**head, "choices": [{"index": choice.index, "delta": {"content": text},
                                                "logprobs": None, "finish_reason": None}]})
            for c in choices:
                yield sse({**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                                "finish_reason": c.finish_reason}]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompts, choices, n)})
            yield "data: [DONE]\n\n"
        return streaming(events())

    # ---- our own: a story from three words and features ------------------------------------

    @app.post("/v1/stories")
    async def stories(request: Request):
        body = await read_body(request)
        from prompts import build_prompt
        words = [body.get(k) for k in ("verb", "noun", "adjective")]
        if any(w is not None for w in words) or body.get("features"):
            if not teller.instruct:
                raise BadRequest("verb", f"{teller.name} is a plain storyteller, not an instruct one: "
                                         f"send a prompt to continue instead")
            if body.get("prompt") is not None:
                raise BadRequest("prompt", "give either prompt or verb/noun/adjective, not both")
            verb, noun, adjective = (_word(body, k) for k in ("verb", "noun", "adjective"))
            features = body.get("features") or []
            if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                raise BadRequest("features", "expected a list of feature names")
            try:
                text = build_prompt(verb, noun, adjective, features)
            except ValueError as exc:
                raise BadRequest("features", str(exc)) from None
        else:
            text = body.get("prompt", "")
            if not isinstance(text, str):
                raise BadRequest("prompt", "expected a string")
        prompts = [teller.encode(text, "prompt")]
        max_tokens = teller.budget(body, prompts, None)
        sampling, stream = teller.sampling(body, temperature=0.5, top_k=10), _bool(body, "stream")
        if body.get("n") not in (None, 1):
            raise BadRequest("n", "one story per request here")
        began = time.perf_counter()
        [choice] = start(prompts, body, max_tokens, sampling, [])

        def summary():
            seconds = time.perf_counter() - began
            return {"done": True, "finish_reason": choice.finish_reason, "tokens": len(choice.ids),
                    "seconds": round(seconds, 3), "tokens_per_s": round(len(choice.ids) / max(seconds, 1e-9), 1)}

        if not stream:
            await collect(request, [choice])
            return {"prompt": text, "story": choice.text, **summary()}

        async def events():
            try:
                async for _, text_part in merged([choice]):
                    yield sse({"text": text_part})
            except RuntimeError as exc:  # the engine failed this story; the page shows why
                yield sse({"error": {"message": str(exc), "type": "server_error"}})
                return
            yield sse(summary())
        return streaming(events())

    return app


def check_address(host, port):
    """A port in use or a host that is not ours, refused in one line before the model loads."""
    if not 0 < port < 65536:
        raise UsageError(f"--port={port}: expected 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host={host}: not an address here ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"--host={host} --port={port}: cannot listen there ({exc.strerror})") from None


def serve(args):
    import torch
    import uvicorn
    from batching import BatchEngine
    from decoding import load_for_sampling

    check_device(args.device)
    check_address(args.host, args.port)
    model, ckpt, tokenizer = load_for_sampling(args.model_path, args.tokenizer, args.device, "float32", args.quantize)
    model.eval()
    engine = BatchEngine(model, (tokenizer.eos_id, tokenizer.bos_id), args.max_batch, args.max_queue,
                         compile=args.compile)
    teller = Storyteller(engine, tokenizer, ckpt, os.path.basename(os.path.normpath(args.model_path)))
    teller.created = int(os.path.getmtime(args.model_path))
    app = create_app(teller, args.shutdown_timeout)
    engine.start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="off")
    server = uvicorn.Server(config)
    kind = "instruct" if teller.instruct else "plain"
    print(f"serving {teller.name} ({kind}, {ckpt.model_args.max_seq_len}-token context, up to {args.max_batch} "
          f"stories at once, {torch.get_num_threads()} threads) at http://{args.host}:{args.port}/", file=sys.stderr,
          flush=True)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; a handler that only notes
    # it lets the process end with 0 rather than die by the signal
    for name in (signal.SIGTERM, signal.SIGINT):
        signal.signal(name, lambda *_: None)
    server.run()
    engine.stop(timeout=args.shutdown_timeout)
    print("server stopped", file=sys.stderr)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except UsageError as exc:
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(run_main(main))
