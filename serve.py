"""Serve a storyteller: a page to write stories in a browser, and an OpenAI-compatible API.

    python serve.py --model_path=out/demo/instruct/ckpt.pt      # then open http://127.0.0.1:8000/
    python serve.py --model_path=stories15M.pt --quantize=int8 --port=8080

Endpoints: the page (GET /), /v1/completions (logprobs and echo too), /v1/chat/completions,
/v1/models, /health, /tokenize, and /v1/stories {verb, noun, adjective, features} or {prompt}.
Requests that arrive together are sampled together (batching.py). The chat endpoint has no
chat template to follow: the last user message is the prompt. Every flag, route, limit and
difference from OpenAI's API: docs/usage.md, serve.py.
"""
import argparse
import asyncio
import os
import signal
import socket
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from cli import OneLineParser, UsageError, check_device, default_device, positive_int, report_error, run_main
from generate import add_prompt_format_args, model_prompt_format
# the wire format (bodies parsed and shaped) is openai_api.py's; here, the HTTP routes and the bridge
# from typed requests to the batching engine
from openai_api import (STREAM_END, BadRequest, ModelLimits, check_declared_size, check_received_size, chunk,
                        error_body, parse_body, parse_chat, parse_completion, parse_story, response_head, sse,
                        story_body, story_error_event, story_summary, story_text_event, text_before_stops, usage,
                        usage_chunk, whole_body, StoryText, completion_logprobs, parse_detokenize, parse_tokenize,
                        token_piece)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint: .pt, llama2.c .bin, LoRA adapter")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the checkpoint's own)")
    add_prompt_format_args(p)
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
    p.add_argument("--api_key", default=os.environ.get("STORYTELLER_API_KEY"),
                   help="require `Authorization: Bearer <key>` on the API (default: $STORYTELLER_API_KEY; "
                        "none: open); the page and /health stay open")
    p.add_argument("--cors", default="", help="comma-separated origins whose pages may call the API from a "
                                              "browser, e.g. http://localhost:3000 (* for any)")
    p.add_argument("--access_log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr (uvicorn's); --no-access_log silences it")
    return p


# ---- the bridge: typed requests in, token events from the engine out -----------------------------

class EngineFailed(Exception):
    """The engine failed a story (a bug, out of memory): the server's fault, not the request's."""


class Storyteller:
    """The model and its tokenizer as the HTTP side sees them: prompts in, token events out."""

    def __init__(self, engine, tokenizer, ckpt, name, created=0, prompt_format=None):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        prompt_format = prompt_format or model_prompt_format(ckpt)
        self.instruct, self.prompt_encoding = prompt_format["is_instruct"], prompt_format["prompt_encoding"]
        self.context = ckpt.model_args.max_seq_len
        self.created = created  # the model file's time, as /v1/models reports it
        self.limits = ModelLimits(name, self.context, tokenizer.vocab_size, self.instruct)

    def encode(self, text, param):
        """A prompt's tokens: text laid out as the model's training data was, token ids as given."""
        from prompts import prompt_ids
        ids = text if isinstance(text, list) else prompt_ids(self.tokenizer, text, self.instruct, self.prompt_encoding)
        if len(ids) >= self.context:
            raise BadRequest(param, f"the prompt is {len(ids)} tokens; the model's context is {self.context}",
                             code="context_length_exceeded")
        return ids

    def budget(self, request, prompts):
        """The request's max_tokens, checked against the context left by the longest prompt; without
        one, the story runs until it ends or the context is full (as generate.py's does)."""
        # the last new token is never fed back in: a prompt of p tokens leaves context - p + 1
        room = self.context - max(len(p) for p in prompts) + 1
        value = request.max_tokens
        if value is None:
            return room
        if value > room:
            raise BadRequest(request.max_tokens_param, f"{value} new tokens after a prompt of "
                             f"{max(len(p) for p in prompts)} exceed the model's context of {self.context} "
                             f"tokens (at most {room})", code="context_length_exceeded")
        return value


class Choice:
    """One sampled story, fed from the engine's thread into this request's asyncio queue; the
    text is decoded as it grows, cut at a stop string."""

    def __init__(self, loop, teller, prompt_ids, stops, index):
        from batching import Sequence
        self.teller, self.stops, self.index = teller, stops, index
        self.story = StoryText(teller.tokenizer, [] if teller.instruct else prompt_ids)
        self.prompt_ids, self.ids, self.text, self.sent = prompt_ids, [], "", 0
        self.prompt_entries, self.entries = None, []  # log probabilities, where asked for
        self.finish_reason = None
        self.events = asyncio.Queue()
        self.seq = Sequence(prompt_ids, 0, lambda kind, value: loop.call_soon_threadsafe(
            self.events.put_nowait, (kind, value)))

    async def chunks(self):
        """Yields the new text after every token, until the story ends."""
        while self.finish_reason is None:
            kind, value = await self.events.get()
            if kind == "error":
                raise EngineFailed(value)
            if kind == "prompt_logprobs":  # the first token has no context to be scored in
                self.prompt_entries = [None] + value
                continue
            if kind == "logprob":  # the next token's
                self.entries.append(value)
                continue
            if kind == "done":
                self.text += self.story.flush()
                self._unsent()  # the last text may complete a stop string
                self.finish_reason = self.finish_reason or value
                pending = self.text[self.sent:]
            else:
                self.ids.append(value)
                self.text += self.story.add(value)
                pending = self._unsent()
            if pending:
                self.sent += len(pending)
                yield pending

    def _unsent(self):
        """The text not yet sent; at a stop string the story ends there."""
        self.text, stopped, end = text_before_stops(self.text, self.sent, self.stops)
        if stopped:
            self.finish_reason = "stop"
            self.seq.cancel()
        return self.text[self.sent:end]

    async def finish(self):
        async for _ in self.chunks():
            pass
        return self.text

    @property
    def logprobs(self):
        """OpenAI's logprobs of the story's tokens (after the prompt's, echoed); None unless asked for."""
        if not self.entries and self.prompt_entries is None:
            return None
        echo = self.prompt_entries is not None
        shown, decode = (self.prompt_ids if echo else []) + self.ids, self.teller.tokenizer.decode
        # offsets in the answer's text: a plain story's is decoded after its prompt (where its first space goes)
        before = [] if echo or self.teller.instruct else self.prompt_ids
        offsets = [len(decode(before + shown[:i])) - len(decode(before)) for i in range(len(shown))]
        return completion_logprobs(shown, (self.prompt_entries or []) + self.entries,
                                   lambda token: token_piece(self.teller.tokenizer, token), offsets)


class Generation:
    """One request's stories in flight: its prompts tokenized, its budget checked against the
    context, one Choice per prompt and per n queued at once (or none: QueueFull), then collected
    whole or merged into one stream."""

    def __init__(self, teller, request):
        self.request = request
        self.prompts = [teller.encode(text, request.prompt_param) for text in request.prompts]
        max_tokens = teller.budget(request, self.prompts)
        stories = len(self.prompts) * request.n
        if stories > teller.engine.max_queue:  # it could never be queued: not "busy", a request too big
            raise BadRequest("n", f"{stories} stories in one request; this server queues at most "
                                  f"{teller.engine.max_queue} (--max_queue)")
        loop = asyncio.get_running_loop()
        sampling, self.choices = request.sampling, []
        for ids in self.prompts:
            for _ in range(request.n):
                choice = Choice(loop, teller, ids, request.stops, len(self.choices))
                choice.seq.max_new_tokens = max_tokens
                choice.seq.temperature, choice.seq.top_k = sampling.temperature, sampling.top_k
                choice.seq.top_p = sampling.top_p
                choice.seq.logprobs, choice.seq.echo = getattr(request, "logprobs", None), getattr(request, "echo", False)
                # n choices from one seed must still differ
                choice.seq.seed = None if sampling.seed is None else sampling.seed + len(self.choices)
                self.choices.append(choice)
        self.began = time.perf_counter()
        teller.engine.submit([c.seq for c in self.choices])

    def usage(self):
        return usage([len(p) for p in self.prompts], [len(c.ids) for c in self.choices])

    async def collect(self, http_request):
        """Wait for every choice; a client that disconnects meanwhile frees its rows."""
        waiter = asyncio.ensure_future(asyncio.gather(*(c.finish() for c in self.choices)))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.5)
                if done:
                    return waiter.result()
                if await http_request.is_disconnected():
                    return None
        finally:
            waiter.cancel()
            for choice in self.choices:
                choice.seq.cancel()

    async def merged(self):
        """(choice, text) as any choice produces text, and (choice, None) as each ends, until all have."""
        queue = asyncio.Queue()

        async def pump(choice):
            try:
                async for text in choice.chunks():
                    await queue.put((choice, text))
            except EngineFailed as exc:
                await queue.put((choice, exc))
            await queue.put((choice, None))

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            remaining = len(self.choices)
            while remaining:
                choice, text = await queue.get()
                if isinstance(text, Exception):
                    raise text
                remaining -= text is None
                yield choice, text
        finally:
            for task in tasks:
                task.cancel()
            for choice in self.choices:
                choice.seq.cancel()  # a client gone mid-story frees its rows


# ---- HTTP: reading bodies, answering ------------------------------------------------------------

async def read_body(request):
    check_declared_size(request.headers.get("content-length"))
    data = bytearray()
    async for part in request.stream():
        data += part
        check_received_size(len(data))
    return parse_body(data)


def error_response(status, message, param=None, kind="invalid_request_error", headers=None, code=None):
    return JSONResponse(error_body(message, param, kind, code), status_code=status, headers=headers)


def streaming(events):
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def answer_openai(http_request, request):
    """Completions and chat: one body once every choice ends, or a stream of chunks."""
    teller = http_request.app.state.teller
    generation = Generation(teller, request)
    head = response_head(request, teller.name)
    if not request.stream:
        await generation.collect(http_request)
        for choice in generation.choices if getattr(request, "echo", False) else []:
            choice.text = teller.tokenizer.decode(choice.prompt_ids) + choice.text  # the prompt as the model read it
        return whole_body(request, head, generation.choices, generation.usage())
    return streaming(openai_events(generation, {**head, "object": request.chunk_object_name}))


async def openai_events(generation, head):
    """The chunks of a stream: each choice's text as it comes and its finish as it ends; an
    engine failure mid-stream is an error event, and the stream still ends with [DONE]."""
    request = generation.request
    for opening in request.opening_choices([c.index for c in generation.choices]):
        yield sse(chunk(head, opening))
    try:
        async for choice, text in generation.merged():
            yield sse(chunk(head, request.text_choice(choice.index, text) if text is not None
                            else request.finish_choice(choice.index, choice.finish_reason)))
    except EngineFailed as exc:
        yield sse(error_body(str(exc), kind="server_error"))
        yield STREAM_END
        return
    if request.include_usage:
        yield sse(usage_chunk(head, generation.usage()))
    yield STREAM_END


async def story_events(generation):
    [choice] = generation.choices
    try:
        async for _, text in generation.merged():
            if text is not None:
                yield sse(story_text_event(text))
    except EngineFailed as exc:  # the engine failed this story; the page shows why
        yield sse(story_error_event(str(exc)))
        return
    yield sse(story_summary(choice.finish_reason, len(choice.ids), time.perf_counter() - generation.began))


# ---- the routes ------------------------------------------------------------------------------------

async def page():
    return FileResponse(PAGE, media_type="text/html")


async def health(request: Request):
    from prompts import FEATURE_PHRASES
    teller = request.app.state.teller
    running, waiting = teller.engine.load()
    return {"status": "ok", "model": teller.name, "instruct": teller.instruct,
            "features": list(FEATURE_PHRASES), "context": teller.context,
            "running": running, "waiting": waiting, "max_batch": teller.engine.max_batch,
            "tokens_generated": teller.engine.tokens_out, "decode_steps": teller.engine.steps,
            "rows_cancelled": teller.engine.rows_cancelled}


async def models(request: Request):
    teller = request.app.state.teller
    return {"object": "list", "data": [{"id": teller.name, "object": "model", "created": teller.created,
                                        "owned_by": "storyteller"}]}


async def completions(request: Request):
    body = await read_body(request)
    return await answer_openai(request, parse_completion(body, request.app.state.teller.limits))


async def chat_completions(request: Request):
    body = await read_body(request)
    return await answer_openai(request, parse_chat(body, request.app.state.teller.limits))


async def stories(request: Request):
    """Our own: a story from three words and features (instruct models), or from a prompt."""
    teller = request.app.state.teller
    story_request = parse_story(await read_body(request), teller.limits)
    generation = Generation(teller, story_request)
    if story_request.stream:
        return streaming(story_events(generation))
    await generation.collect(request)
    [choice] = generation.choices
    summary = story_summary(choice.finish_reason, len(choice.ids), time.perf_counter() - generation.began)
    return story_body(story_request.prompts[0], choice.text, summary)


async def tokenize(request: Request):
    """Text to token ids as the model's tokenizer spells them; "<s>" and "</s>" alone are BOS and EOS."""
    tokenizer = request.app.state.teller.tokenizer
    text, add_bos = parse_tokenize(await read_body(request))
    ids = {"<s>": [tokenizer.bos_id], "</s>": [tokenizer.eos_id]}.get(text) or tokenizer.encode(text)
    return {"tokens": [tokenizer.bos_id] * add_bos + ids}


async def detokenize(request: Request):
    teller = request.app.state.teller
    return {"prompt": teller.tokenizer.decode(parse_detokenize(await read_body(request), teller.limits))}


async def tokenizer_info(request: Request):
    return {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None,
            "model_max_length": request.app.state.teller.context}


# ---- errors as OpenAI shapes them --------------------------------------------------------------

async def bad_request(request, exc):
    return error_response(exc.status, str(exc), exc.param, code=exc.code)


async def engine_failed(request, exc):
    return error_response(500, str(exc), kind="server_error")


async def busy(request, exc):
    """Every row and queue place taken (retry in a second), or shutting down (in a few)."""
    from batching import QueueFull
    if isinstance(exc, QueueFull):
        return error_response(503, f"busy: {exc}; retry shortly", kind="server_busy", headers={"Retry-After": "1"})
    return error_response(503, str(exc), kind="server_busy", headers={"Retry-After": "5"})


async def not_found(request, exc):
    return error_response(404, f"no such endpoint: {request.method} {request.url.path}")


async def wrong_method(request, exc):
    return error_response(405, f"{request.url.path} does not take {request.method}")


ROUTES = [("GET", "/", page), ("GET", "/health", health), ("GET", "/v1/models", models),
          ("POST", "/v1/completions", completions), ("POST", "/v1/chat/completions", chat_completions),
          ("POST", "/v1/stories", stories), ("POST", "/tokenize", tokenize), ("POST", "/detokenize", detokenize),
          ("GET", "/tokenizer_info", tokenizer_info)]


def key_check(api_key):
    """Middleware: every route but the page and /health wants `Authorization: Bearer <api_key>`."""
    import hmac
    expected = f"Bearer {api_key}".encode()

    async def check(request, call_next):
        given = request.headers.get("authorization", "").encode()
        if request.url.path in ("/", "/health") or hmac.compare_digest(given, expected):
            return await call_next(request)
        return error_response(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(teller, shutdown_timeout=30.0, api_key=None, cors_origins=()):
    from batching import QueueFull, ShuttingDown
    from fastapi.middleware.cors import CORSMiddleware
    app = FastAPI(title="storyteller", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.teller = teller
    for error, handler in [(BadRequest, bad_request), (EngineFailed, engine_failed), (QueueFull, busy),
                           (ShuttingDown, busy), (404, not_found), (405, wrong_method)]:
        app.add_exception_handler(error, handler)
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    if api_key:
        app.middleware("http")(key_check(api_key))
    if cors_origins:  # added last, so outermost: a browser's preflight is answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
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
    prompt_format = model_prompt_format(ckpt, args.instruct, args.prompt_encoding)
    model.eval()
    engine = BatchEngine(model, (tokenizer.eos_id, tokenizer.bos_id), args.max_batch, args.max_queue,
                         compile=args.compile)
    teller = Storyteller(engine, tokenizer, ckpt, os.path.basename(os.path.normpath(args.model_path)),
                         created=int(os.path.getmtime(args.model_path)), prompt_format=prompt_format)
    app = create_app(teller, args.shutdown_timeout, args.api_key, [o.strip() for o in args.cors.split(",") if o.strip()])
    engine.start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.access_log else "warning",
                            access_log=args.access_log,
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
