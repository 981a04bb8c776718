"""The wire format serve.py speaks: OpenAI's completions and chat completions, and our own
/v1/stories. A request body is parsed here, early and whole, into a typed request; response
bodies, stream chunks and error bodies are shaped here too. JSON lives in this layer only.

Plain Python on purpose (no torch, no asyncio, no web framework): every rule can be checked
without a model or a server. The few facts a check needs about the model (its context, its
vocabulary, whether it is an instruct one) come in as ModelLimits.
"""
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Union

from cli import greedy_if_tiny
from prompts import build_prompt

MAX_BODY_BYTES = 256 * 1024
MAX_CHOICES = 8  # n times the number of prompts, per request
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions
# OpenAI fields we do not implement, with the values that ask for nothing (accepted as the
# neutral default); any other value is refused, naming the field, rather than silently ignored
NEUTRAL_VALUES = {"best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                  "logit_bias": (None, {}), "suffix": (None, ""), "echo": (None, False),
                  "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
                  "response_format": (None, {"type": "text"})}
WORD = re.compile(r"[A-Za-z][A-Za-z'-]{0,29}")
STREAM_END = "data: [DONE]\n\n"


class BadRequest(Exception):
    """A request we refuse: its status (400 unless said), the field it names and why."""

    def __init__(self, param, message, status=400, code=None):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status, self.code = param, status, code  # code: OpenAI's, e.g. context_length_exceeded


@dataclass(frozen=True)
class ModelLimits:
    """What checking a request needs to know of the served model."""
    name: str
    context: int  # tokens of prompt and story together
    vocab_size: int  # top_k's ceiling
    instruct: bool  # only an instruct model takes verb/noun/adjective


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: Optional[int] = None


@dataclass
class GenerationRequest:
    """What every endpoint asks of the model: prompts (text, not yet tokens: the tokenizer is
    the model's side), a budget of new tokens, how to sample, and how to answer."""
    prompts: List[Union[str, List[int]]]  # text, or token ids as given (no BOS added)
    prompt_param: str  # the field a prompt the model cannot take is blamed on
    max_tokens: Optional[int]  # None: the endpoint's default, else as much as the context leaves
    max_tokens_param: str  # max_tokens, or max_completion_tokens where only that was given
    sampling: Sampling
    stops: List[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest(GenerationRequest):
    echo: bool = False  # the prompt's text (and with logprobs its log probabilities) before the story
    logprobs: Optional[int] = None  # per token its log probability and this many likeliest alternatives
    id_prefix: ClassVar[str] = "cmpl"
    object_name: ClassVar[str] = "text_completion"
    chunk_object_name: ClassVar[str] = "text_completion"

    @staticmethod
    def choice(index, text, finish_reason, logprobs=None):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def opening_choices(indexes):
        return []

    @classmethod
    def text_choice(cls, index, text):
        return cls.choice(index, text, None)

    @classmethod
    def finish_choice(cls, index, finish_reason):
        return cls.choice(index, "", finish_reason)


@dataclass
class ChatRequest(GenerationRequest):
    """The answer is an assistant message; a stream opens with its role."""

    @staticmethod
    def opening_choices(indexes):
        """A stream opens with the assistant's role, one chunk per choice."""
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in indexes]

    @staticmethod
    def choice(index, text, finish_reason, logprobs=None):
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    @staticmethod
    def text_choice(index, text):
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def finish_choice(index, finish_reason):
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    id_prefix: ClassVar[str] = "chatcmpl"
    object_name: ClassVar[str] = "chat.completion"
    chunk_object_name: ClassVar[str] = "chat.completion.chunk"


@dataclass
class StoryRequest(GenerationRequest):
    """One story; prompts[0] is the prompt as worded from verb/noun/adjective, or as sent."""


# ---- reading a request's fields: each check names the field it refuses --------------------------

def check_declared_size(content_length):
    if content_length and content_length.isdigit() and int(content_length) > MAX_BODY_BYTES:
        raise BadRequest("body", f"{content_length} bytes; at most {MAX_BODY_BYTES}")


def check_received_size(size):
    if size > MAX_BODY_BYTES:
        raise BadRequest("body", f"over {MAX_BODY_BYTES} bytes")


def parse_body(data):
    """The body's bytes as a JSON object."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body", f"not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object")
    return body


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


def _include_usage(body):
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise BadRequest("stream_options", "expected {\"include_usage\": true or false}")
    return bool(options and options.get("include_usage"))


def _choices_per_prompt(body, prompts):
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    if n * prompts > MAX_CHOICES:
        raise BadRequest("n", f"{n} choices for each of {prompts} prompts: at most {MAX_CHOICES} in all")
    return n


def _budget_and_sampling(body, limits, temperature=1.0, top_k=None, fewest_tokens=1):
    """max_tokens (or max_completion_tokens) and the sampling settings: the fields every endpoint reads.
    Whether max_tokens fits beside the prompt is the model's side to check, once it is tokenized."""
    name = "max_completion_tokens" if body.get("max_tokens") is None and \
        body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, fewest_tokens, limits.context, integer=True)
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:  # OpenAI takes 0 too; the nucleus then holds just the likeliest token
        top_p = 1e-9
    temperature = _number(body, "temperature", temperature, 0, 2)
    sampling = Sampling(temperature=greedy_if_tiny(temperature), top_p=top_p,
                        top_k=_number(body, "top_k", top_k, 1, limits.vocab_size, integer=True),
                        seed=_number(body, "seed", None, 0, 2**62, integer=True))
    return dict(max_tokens=max_tokens, max_tokens_param=name, sampling=sampling)


def _unsupported(body, supported=()):
    for name, neutral in NEUTRAL_VALUES.items():
        if name in supported:
            continue
        value = body.get(name)
        # 0 == False to Python, not to JSON
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                         for v in neutral):
            raise BadRequest(name, f"not supported by this server; leave it out (got {json.dumps(value)[:40]})",
                             code="unsupported_parameter")


def text_field(value, where):
    """A string the tokenizer can take: valid Unicode (JSON lets a lone surrogate such as \\ud800 through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(where, f"not valid Unicode text ({exc.reason} at character {exc.start})") from None
    return value


def _openai_fields(body, limits, prompts, supported=(), fewest_tokens=1):
    """The fields completions and chat share, in the order they are checked."""
    _unsupported(body, supported)
    fields = _budget_and_sampling(body, limits, fewest_tokens=fewest_tokens)
    fields.update(stops=_stop_strings(body), stream=_bool(body, "stream"), include_usage=_include_usage(body))
    fields["n"] = _choices_per_prompt(body, prompts)
    return fields


def message_text(content, where):
    """A message's content: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(content, str):
        return text_field(content, where)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return text_field("".join(p["text"] for p in content), where)
    raise BadRequest(where, "expected a string or a list of {\"type\": \"text\", \"text\": ...} parts")


# ---- the three requests ---------------------------------------------------------------------------

def _token_ids(value, limits):
    return (isinstance(value, list) and value and
            all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limits.vocab_size for t in value))


def _completion_prompts(prompt, limits):
    """A string, a list of strings, a list of token ids, or a list of such lists (as OpenAI takes)."""
    if isinstance(prompt, str):
        return [text_field(prompt, "prompt")]
    if _token_ids(prompt, limits):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p, limits) for p in prompt):
        if len(prompt) > MAX_CHOICES:
            raise BadRequest("prompt", f"{len(prompt)} prompts; at most {MAX_CHOICES}")
        return [text_field(p, f"prompt[{i}]") if isinstance(p, str) else p for i, p in enumerate(prompt)]
    raise BadRequest("prompt", f"expected a string, a non-empty list of strings, or lists of token ids "
                               f"(0..{limits.vocab_size - 1})")


def parse_completion(body, limits):
    prompts = _completion_prompts(body.get("prompt", ""), limits)
    echo = _bool(body, "echo")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    fields = _openai_fields(body, limits, len(prompts), supported=("echo", "logprobs"), fewest_tokens=0 if echo else 1)
    if fields["stream"] and (echo or logprobs is not None):
        raise BadRequest("echo" if echo else "logprobs", "not with stream: ask for the whole answer")
    return CompletionRequest(prompts=prompts, prompt_param="prompt", echo=echo, logprobs=logprobs, **fields)


def parse_chat(body, limits):
    """There is no chat template to follow: the last user message is the prompt."""
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
    return ChatRequest(prompts=[prompt], prompt_param="messages", **_openai_fields(body, limits, 1))


def _story_prompt(body, limits):
    """The prompt worded from verb/noun/adjective and features as prompts.py does, or sent as is."""
    words = [body.get(k) for k in ("verb", "noun", "adjective")]
    if not (any(w is not None for w in words) or body.get("features")):
        text = body.get("prompt", "")
        if not isinstance(text, str):
            raise BadRequest("prompt", "expected a string")
        return text_field(text, "prompt")
    if not limits.instruct:
        raise BadRequest("verb", f"{limits.name} is a plain storyteller, not an instruct one: "
                                 f"send a prompt to continue instead")
    if body.get("prompt") is not None:
        raise BadRequest("prompt", "give either prompt or verb/noun/adjective, not both")
    verb, noun, adjective = (_word(body, k) for k in ("verb", "noun", "adjective"))
    features = body.get("features") or []
    if isinstance(features, str):  # "dialogue,twist", as generate.py's --features takes them
        features = [f for f in features.split(",") if f.strip()]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise BadRequest("features", "expected a list of feature names or one comma-separated string of them")
    try:
        return build_prompt(verb, noun, adjective, features)
    except ValueError as exc:
        raise BadRequest("features", str(exc)) from None


def parse_story(body, limits):
    prompt = _story_prompt(body, limits)
    fields = _budget_and_sampling(body, limits, temperature=0.5, top_k=10)
    stream = _bool(body, "stream")
    if body.get("n") not in (None, 1):
        raise BadRequest("n", "one story per request here")
    return StoryRequest(prompts=[prompt], prompt_param="prompt", stream=stream, **fields)


def parse_tokenize(body):
    """/tokenize (as vLLM's and lm-evaluation-harness's remote tokenizer ask it): (text, add BOS)."""
    text = body.get("prompt")
    if not isinstance(text, str):
        raise BadRequest("prompt", "expected a string")
    return text_field(text, "prompt"), _bool(body, "add_special_tokens")


def parse_detokenize(body, limits):
    tokens = body.get("tokens")
    if tokens != [] and not _token_ids(tokens, limits):
        raise BadRequest("tokens", f"expected a list of token ids (0..{limits.vocab_size - 1})")
    return tokens


# ---- stop strings: text the client may see yet ------------------------------------------------------

def text_before_stops(text, sent, stops):
    """(text, stopped, end): the text cut at the earliest stop string in it, or else the text
    whole with `end` held back while its tail could still become one. Text up to `sent` has
    gone to the client already, and held no stop string: only its last few characters are
    searched again."""
    found = [at for at in (text.find(stop, max(0, sent - len(stop) + 1)) for stop in stops) if at >= 0]
    if found:
        at = min(found)
        return text[:at], True, at
    hold = max((len(s) - 1 for s in stops), default=0)
    safe = len(text)
    for cut in range(max(sent, safe - hold), safe):
        if any(s.startswith(text[cut:]) for s in stops):
            safe = cut
            break
    return text, False, safe


# ---- a story's text as its tokens arrive ------------------------------------------------------------

class StoryText:
    """A story's text as its tokens arrive, decoded in constant time per token. sentencepiece
    knows where a space goes only from the piece before, so the tokens since the last settled
    one are decoded again, and text is settled only once it ends in a whole character: byte
    pieces (an emoji, most non-Latin letters) decode to U+FFFD until their last byte arrives."""

    def __init__(self, tokenizer, prefix_ids):
        # a plain model's story continues its prompt: its last pieces are decoded with the story
        # so that the first word keeps its space; an instruct story starts after the prompt's BOS
        self.tokenizer, self.ids = tokenizer, list(prefix_ids)
        self.start, self.settled = max(0, len(self.ids) - 4), len(self.ids)
        self.settled_text = tokenizer.decode(self.ids[self.start:])

    def add(self, token):
        """The text token adds, or "" while it ends in an unfinished character."""
        self.ids.append(token)
        return self._new_text(final=False)

    def flush(self):
        """What is held back when the story ends (an unfinished character stays U+FFFD)."""
        return self._new_text(final=True) if len(self.ids) > self.settled else ""

    def _new_text(self, final):
        text = self.tokenizer.decode(self.ids[self.start:])
        if not final and (len(text) <= len(self.settled_text) or text.endswith("\ufffd")):
            return ""
        new = text[len(self.settled_text):]
        self.start, self.settled = self.settled, len(self.ids)
        self.settled_text = self.tokenizer.decode(self.ids[self.start:])
        return new


# ---- shaping answers --------------------------------------------------------------------------------

def error_body(message, param=None, kind="invalid_request_error", code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def response_head(request, model):
    """The fields every body and chunk of one answer shares."""
    return {"id": f"{request.id_prefix}-{uuid.uuid4().hex}", "object": request.object_name,
            "created": int(time.time()), "model": model}


def usage(prompt_lengths, completion_lengths):
    """Each prompt is counted once, however many choices were sampled from it (as OpenAI counts)."""
    prompt_tokens = sum(prompt_lengths)
    completion_tokens = sum(completion_lengths)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def whole_body(request, head, choices, usage_body):
    """The answer not streamed; choices: anything with index, text, finish_reason and logprobs."""
    return {**head, "choices": [request.choice(c.index, c.text, c.finish_reason, c.logprobs) for c in choices],
            "usage": usage_body}


def token_piece(tokenizer, token):
    """A token's text as a logprobs answer shows it: its piece, with sentencepiece's ▁ as a space;
    BOS and EOS show as nothing."""
    if token in (tokenizer.bos_id, tokenizer.eos_id):
        return ""
    return tokenizer.sp.id_to_piece(token).replace("\u2581", " ")


def completion_logprobs(token_ids, entries, piece, offsets):
    """OpenAI's completion `logprobs`: entries[i] is token i's (log probability, [(token, log
    probability)] of the likeliest), or None (an echoed prompt's first token); piece(id) is a
    token's text; offsets, where each token's text starts in the answer's text."""
    return {"tokens": [piece(t) for t in token_ids], "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {piece(t): v for t, v in e[1]} for e in entries],
            "text_offset": offsets}


def chunk(head, choice):
    return {**head, "choices": [choice]}


def usage_chunk(head, usage_body):
    return {**head, "choices": [], "usage": usage_body}


def sse(obj):
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def story_summary(finish_reason, tokens, seconds):
    return {"done": True, "finish_reason": finish_reason, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


def story_body(prompt, story, summary):
    return {"prompt": prompt, "story": story, **summary}


def story_text_event(text):
    return {"text": text}


def story_error_event(message):
    """The engine failed this story mid-stream; the page shows why."""
    return {"error": {"message": message, "type": "server_error"}}
