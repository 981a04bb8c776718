"""openai_api.py without a server: each rule a request body must pass (the field it names, the
status and the message), the typed requests it parses into with their defaults, and the shapes
of the bodies, chunks, usage and errors it writes. The fuzzed bodies run here, in-process."""
import json

import pytest
from hypothesis import given, settings, strategies as st

import openai_api
from openai_api import (BadRequest, ChatRequest, CompletionRequest, ModelLimits, Sampling,
                        parse_body, parse_chat, parse_completion, parse_story)
from prompts import build_prompt

PLAIN = ModelLimits(name="stories260K.pt", context=512, vocab_size=512, instruct=False)
INSTRUCT = ModelLimits(name="ckpt.pt", context=512, vocab_size=1024, instruct=True)
PARSERS = {"/v1/completions": parse_completion, "/v1/chat/completions": parse_chat, "/v1/stories": parse_story}
WORDS = {"verb": "climb", "noun": "ring", "adjective": "messy"}


def refusal(parse, *args):
    with pytest.raises(BadRequest) as caught:
        parse(*args)
    return caught.value


# ---- each rule: the field it names, its status and its message ----------------------------------

@pytest.mark.parametrize("data, message", [
    (b'{"prompt": "Once"', "body: not JSON ("),
    (b"\xff\xfe", "body: not JSON ("),
    (b"[1, 2]", "body: expected a JSON object"),
    (b'"Once"', "body: expected a JSON object"),
])
def test_a_body_that_is_not_a_json_object_is_refused(data, message):
    exc = refusal(parse_body, data)
    assert (exc.param, exc.status) == ("body", 400) and str(exc).startswith(message)


def test_body_size_is_refused_by_its_declared_length_and_by_what_arrives():
    limit = openai_api.MAX_BODY_BYTES
    exc = refusal(openai_api.check_declared_size, str(limit + 1))
    assert (exc.param, exc.status, str(exc)) == ("body", 400, f"body: {limit + 1} bytes; at most {limit}")
    exc = refusal(openai_api.check_received_size, limit + 1)
    assert str(exc) == f"body: over {limit} bytes"
    # a missing or malformed Content-Length leaves the check to the bytes that arrive
    for declared in (None, "", "abc", str(limit)):
        openai_api.check_declared_size(declared)
    openai_api.check_received_size(limit)


COMPLETION_RULES = [
    ({"prompt": 5}, "prompt: expected a string, a non-empty list of strings, or lists of token ids (0..511)"),
    ({"prompt": []}, "prompt: expected a string, a non-empty list of strings, or lists of token ids (0..511)"),
    ({"prompt": ["a", 1]}, "prompt: expected a string, a non-empty list of strings, or lists of token ids (0..511)"),
    ({"prompt": ["a"] * 9}, "prompt: 9 prompts; at most 8"),
    ({"max_tokens": "20"}, 'max_tokens: expected an integer, got "20"'),
    ({"max_tokens": True}, "max_tokens: expected an integer, got true"),
    ({"max_tokens": 0}, "max_tokens: expected 1..512, got 0"),
    ({"max_tokens": 513}, "max_tokens: expected 1..512, got 513"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens: expected an integer, got 2.5"),
    ({"temperature": -1}, "temperature: expected 0..2, got -1"),
    ({"temperature": float("nan")}, "temperature: expected a number, got NaN"),
    ({"temperature": "hot"}, 'temperature: expected a number, got "hot"'),
    ({"top_p": 1.5}, "top_p: expected 0..1, got 1.5"),
    ({"top_k": 513}, "top_k: expected 1..512, got 513"),  # the model's vocabulary
    ({"top_k": 2.0}, "top_k: expected an integer, got 2.0"),
    ({"seed": -1}, f"seed: expected 0..{2**62}, got -1"),
    ({"stop": [""]}, "stop: expected a non-empty string or a list of them"),
    ({"stop": 3}, "stop: expected a non-empty string or a list of them"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 stop strings"),
    ({"stream": "yes"}, 'stream: expected true or false, got "yes"'),
    ({"stream_options": {"include_usage": 1}}, 'stream_options: expected {"include_usage": true or false}'),
    ({"stream_options": []}, 'stream_options: expected {"include_usage": true or false}'),
    ({"n": 9}, "n: expected 1..8, got 9"),
    ({"prompt": ["a", "b", "c"], "n": 3}, "n: 3 choices for each of 3 prompts: at most 8 in all"),
]


@pytest.mark.parametrize("body, message", COMPLETION_RULES)
def test_completion_rules(body, message):
    exc = refusal(parse_completion, body, PLAIN)
    assert exc.status == 400 and str(exc) == message and message.startswith(exc.param + ": ")


@pytest.mark.parametrize("body, message", [
    ({}, "messages: expected a non-empty list of {role, content}"),
    ({"messages": []}, "messages: expected a non-empty list of {role, content}"),
    ({"messages": [{"content": "Hi"}]}, 'messages[0]: expected {"role": ..., "content": ...}'),
    ({"messages": [{"role": "user", "content": "Hi"}, "Hi"]}, 'messages[1]: expected {"role": ..., "content": ...}'),
    ({"messages": [{"role": "user", "content": 3}]},
     'messages[0].content: expected a string or a list of {"type": "text", "text": ...} parts'),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     'messages[0].content: expected a string or a list of {"type": "text", "text": ...} parts'),
    ({"messages": [{"role": "system", "content": "Be brief"}]}, "messages: no user message: its content is the prompt"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens: expected 1..512, got 0"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 9}, "n: expected 1..8, got 9"),
])
def test_chat_rules(body, message):
    exc = refusal(parse_chat, body, PLAIN)
    assert exc.status == 400 and str(exc) == message and message.startswith(exc.param + ": ")


@pytest.mark.parametrize("limits, body, message", [
    (PLAIN, WORDS, "verb: stories260K.pt is a plain storyteller, not an instruct one: send a prompt to continue "
                   "instead"),
    (PLAIN, {"features": ["dialogue"]}, "verb: stories260K.pt is a plain storyteller, not an instruct one: send a "
                                        "prompt to continue instead"),
    (PLAIN, {"prompt": 5}, "prompt: expected a string"),
    (INSTRUCT, {**WORDS, "prompt": "Once"}, "prompt: give either prompt or verb/noun/adjective, not both"),
    (INSTRUCT, {**WORDS, "verb": "cl1mb"}, 'verb: expected one English word (letters, up to 30), got "cl1mb"'),
    (INSTRUCT, {**WORDS, "noun": "a ring"}, 'noun: expected one English word (letters, up to 30), got "a ring"'),
    (INSTRUCT, {"verb": "climb", "noun": "ring"}, "adjective: expected one English word (letters, up to 30), got null"),
    (INSTRUCT, {**WORDS, "features": 5}, "features: expected a list of feature names or one comma-separated "
                                         "string of them"),
    (INSTRUCT, {**WORDS, "top_k": 1025}, "top_k: expected 1..1024, got 1025"),
    (INSTRUCT, {**WORDS, "stream": 1}, "stream: expected true or false, got 1"),
    (INSTRUCT, {**WORDS, "n": 2}, "n: one story per request here"),
])
def test_story_rules(limits, body, message):
    exc = refusal(parse_story, body, limits)
    assert exc.status == 400 and str(exc) == message and message.startswith(exc.param + ": ")


def test_features_as_a_list_or_a_comma_separated_string():
    expected = [build_prompt("climb", "ring", "messy", ["Dialogue", "Twist"])]
    assert parse_story({**WORDS, "features": "dialogue, twist"}, INSTRUCT).prompts == expected
    assert parse_story({**WORDS, "features": ["dialogue", "twist"]}, INSTRUCT).prompts == expected


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Once \ud800"}, "prompt"),
    ({"prompt": ["Once", "\udfff upon"]}, "prompt[1]"),
])
def test_text_that_is_not_unicode_is_refused_naming_the_field(body, param):
    exc = refusal(parse_completion, body, PLAIN)
    assert exc.param == param and "not valid Unicode text" in str(exc)
    exc = refusal(parse_chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, PLAIN)
    assert exc.param == "messages[0].content"


@pytest.mark.parametrize("field, value", [("presence_penalty", 0.1), ("frequency_penalty", -2), ("best_of", 2),
                                          ("logit_bias", {"5": 1}), ("suffix", "end"), ("echo", True),
                                          ("logprobs", 2), ("logprobs", True), ("top_logprobs", 1),
                                          ("tools", [{"type": "function"}]), ("response_format", {"type": "json"})])
def test_unsupported_fields_with_a_value_that_asks_for_something_are_refused(field, value):
    parsers = [(parse_chat, {"messages": [{"role": "user", "content": "Hi"}]})]
    if field not in ("echo", "logprobs"):  # completions take those two
        parsers.append((parse_completion, {}))
    for parse, body in parsers:
        exc = refusal(parse, {**body, field: value}, PLAIN)
        assert (exc.param, exc.code, exc.status) == (field, "unsupported_parameter", 400)


def test_neutral_values_of_unsupported_fields_are_accepted():
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "logit_bias": {}, "suffix": "",
               "echo": False, "logprobs": None, "top_logprobs": 0, "tools": [], "response_format": {"type": "text"}}
    assert parse_completion({**neutral, "prompt": "Once"}, PLAIN).prompts == ["Once"]
    # false is not 0, nor 0 false
    assert refusal(parse_completion, {"best_of": True}, PLAIN).param == "best_of"
    assert refusal(parse_completion, {"echo": 0}, PLAIN).param == "echo"


def test_completions_take_echo_logprobs_and_token_ids():
    request = parse_completion({"prompt": [1, 403, 407], "echo": True, "logprobs": 5, "max_tokens": 0}, PLAIN)
    assert (request.prompts, request.echo, request.logprobs, request.max_tokens) == ([[1, 403, 407]], True, 5, 0)
    assert parse_completion({"prompt": [[1, 2], "Once"]}, PLAIN).prompts == [[1, 2], "Once"]
    assert parse_completion({}, PLAIN).logprobs is None and not parse_completion({}, PLAIN).echo


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 0}, "max_tokens: expected 1..512, got 0"),  # nothing to answer without echo
    ({"echo": True, "max_tokens": -1}, "max_tokens: expected 0..512, got -1"),
    ({"logprobs": 6}, "logprobs: expected 0..5, got 6"),
    ({"logprobs": True}, "logprobs: expected an integer, got true"),
    ({"echo": 1}, "echo: expected true or false, got 1"),
    ({"echo": True, "stream": True}, "echo: not with stream: ask for the whole answer"),
    ({"logprobs": 1, "stream": True}, "logprobs: not with stream: ask for the whole answer"),
    ({"prompt": [1, 512]}, "prompt: expected a string, a non-empty list of strings, or lists of token ids (0..511)"),
    ({"prompt": [[1], []]}, "prompt: expected a string, a non-empty list of strings, or lists of token ids (0..511)"),
])
def test_echo_and_logprobs_rules(body, message):
    exc = refusal(parse_completion, body, PLAIN)
    assert exc.status == 400 and str(exc) == message


@pytest.mark.parametrize("temperature, greedy", [(1e-50, True), (5e-324, True), (9e-5, True), (1e-4, False)])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature, greedy):
    sampling = parse_completion({"temperature": temperature}, PLAIN).sampling
    assert (sampling.temperature == 0) == greedy


def test_an_unknown_feature_is_refused_with_prompts_own_reason():
    exc = refusal(parse_story, {**WORDS, "features": ["poetry"]}, INSTRUCT)
    assert exc.param == "features" and "poetry" in str(exc)


# ---- typed requests and their defaults ------------------------------------------------------------

def test_an_empty_completion_body_takes_every_default():
    request = parse_completion({}, PLAIN)
    assert request == CompletionRequest(prompts=[""], prompt_param="prompt", max_tokens=None,
                                        max_tokens_param="max_tokens", sampling=Sampling(1.0, 1.0, None, None),
                                        stops=[], n=1, stream=False, include_usage=False)
    # no max_tokens: the story runs to its end or the context's (serve.Storyteller.budget), not 16 tokens


def test_completion_fields_are_read_into_the_request():
    request = parse_completion({"prompt": ["a", "b"], "max_tokens": 30, "temperature": 0, "top_p": 0, "top_k": 5,
                                "seed": 7, "stop": "\n", "n": 4, "stream": True,
                                "stream_options": {"include_usage": True}, "user": "ignored"}, PLAIN)
    assert request.prompts == ["a", "b"] and request.max_tokens == 30 and request.n == 4
    # top_p 0 keeps just the likeliest token: a nucleus too small for a second one
    assert request.sampling == Sampling(temperature=0, top_p=1e-9, top_k=5, seed=7)
    assert request.stops == ["\n"] and request.stream and request.include_usage


def test_max_completion_tokens_stands_in_only_where_max_tokens_is_missing():
    request = parse_completion({"max_completion_tokens": 9}, PLAIN)
    assert (request.max_tokens, request.max_tokens_param) == (9, "max_completion_tokens")
    request = parse_completion({"max_tokens": 5, "max_completion_tokens": 9}, PLAIN)
    assert (request.max_tokens, request.max_tokens_param) == (5, "max_tokens")
    request = parse_completion({"max_tokens": None, "stream_options": None, "n": None, "stream": None}, PLAIN)
    assert request.max_tokens is None and request.n == 1 and not request.stream and not request.include_usage


def test_chat_prompt_is_the_last_user_message():
    request = parse_chat({"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "First"},
                                       {"role": "assistant", "content": "Ok"},
                                       {"role": "user", "content": [{"type": "text", "text": "Once upon "},
                                                                    {"type": "text", "text": "a time"}]}]}, PLAIN)
    assert request.prompts == ["Once upon a time"] and request.prompt_param == "messages"
    assert request.sampling == Sampling() and request.max_tokens is None


def test_story_words_become_the_template_prompt_sampled_at_the_pages_defaults():
    request = parse_story({"verb": " climb ", "noun": "ring", "adjective": "messy", "features": ["dialogue"]},
                          INSTRUCT)
    assert request.prompts == [build_prompt("climb", "ring", "messy", ["Dialogue"])]
    assert request.sampling == Sampling(temperature=0.5, top_p=1.0, top_k=10, seed=None)
    assert request.n == 1 and request.stops == [] and not request.stream
    free = parse_story({"prompt": "Tom had a ball", "n": 1, "temperature": 1.0}, PLAIN)
    assert free.prompts == ["Tom had a ball"] and free.sampling.temperature == 1.0
    assert parse_story({}, PLAIN).prompts == [""]


# ---- shaping answers --------------------------------------------------------------------------------

class Finished:
    def __init__(self, index, text, finish_reason, logprobs=None):
        self.index, self.text, self.finish_reason, self.logprobs = index, text, finish_reason, logprobs


def test_completion_and_chat_bodies():
    # two prompts, two choices each: each prompt counts once
    usage = openai_api.usage([3, 5], [10, 4, 7, 1])
    assert usage == {"prompt_tokens": 8, "completion_tokens": 22, "total_tokens": 30}
    choices = [Finished(0, "Once", "length"), Finished(1, "", "stop")]
    request = parse_completion({}, PLAIN)
    head = openai_api.response_head(request, "m")
    assert head["id"].startswith("cmpl-") and head["object"] == "text_completion" and head["model"] == "m"
    assert isinstance(head["created"], int)
    assert openai_api.whole_body(request, head, choices, usage) == {
        **head, "usage": usage,
        "choices": [{"index": 0, "text": "Once", "logprobs": None, "finish_reason": "length"},
                    {"index": 1, "text": "", "logprobs": None, "finish_reason": "stop"}]}
    chat = parse_chat({"messages": [{"role": "user", "content": "Hi"}]}, PLAIN)
    head = openai_api.response_head(chat, "m")
    assert head["id"].startswith("chatcmpl-") and head["object"] == "chat.completion"
    body = openai_api.whole_body(chat, head, choices[:1], usage)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Once"}, "logprobs": None,
                                "finish_reason": "length"}]


def test_completion_logprobs_shape():
    entries = [None, (-0.5, [(7, -0.5), (9, -1.5)]), (-2.0, [(3, -0.1), (8, -2.0)])]
    body = openai_api.completion_logprobs([1, 7, 8], entries, lambda t: {1: "", 7: " Once", 8: " upon"}.get(t, "x"),
                                          [0, 0, 4])
    assert body == {"tokens": ["", " Once", " upon"], "token_logprobs": [None, -0.5, -2.0],
                    "top_logprobs": [None, {" Once": -0.5, "x": -1.5}, {"x": -0.1, " upon": -2.0}],
                    "text_offset": [0, 0, 4]}
    request = parse_completion({"logprobs": 2}, PLAIN)
    assert openai_api.whole_body(request, {}, [Finished(0, "Once", "length", body)], {})["choices"][0]["logprobs"] == body


def test_stream_chunks():
    head = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    assert ChatRequest.opening_choices([0, 1]) == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)]
    assert openai_api.chunk(head, ChatRequest.text_choice(1, "Once")) == {
        **head, "choices": [{"index": 1, "delta": {"content": "Once"}, "logprobs": None, "finish_reason": None}]}
    assert ChatRequest.finish_choice(0, "stop") == {"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": "stop"}
    assert CompletionRequest.opening_choices([0]) == []
    assert CompletionRequest.text_choice(0, "a") == {"index": 0, "text": "a", "logprobs": None, "finish_reason": None}
    assert CompletionRequest.finish_choice(2, "length") == {"index": 2, "text": "", "logprobs": None,
                                                            "finish_reason": "length"}
    usage = openai_api.usage([1], [2])
    assert openai_api.usage_chunk(head, usage) == {**head, "choices": [], "usage": usage}


def test_server_sent_events_keep_text_as_written():
    event = openai_api.sse({"text": "café 🐉"})
    assert event == 'data: {"text": "café 🐉"}\n\n'
    assert json.loads(event[len("data: "):]) == {"text": "café 🐉"}
    assert openai_api.STREAM_END == "data: [DONE]\n\n"


def test_error_and_story_bodies():
    assert openai_api.error_body("busy", kind="server_busy") == {
        "error": {"message": "busy", "type": "server_busy", "param": None, "code": None}}
    assert openai_api.error_body("max_tokens: 600", "max_tokens", code="context_length_exceeded")["error"] == {
        "message": "max_tokens: 600", "type": "invalid_request_error", "param": "max_tokens",
        "code": "context_length_exceeded"}
    assert openai_api.error_body("prompt: bad", "prompt")["error"]["type"] == "invalid_request_error"
    summary = openai_api.story_summary("length", 50, 0.12345)
    assert summary == {"done": True, "finish_reason": "length", "tokens": 50, "seconds": 0.123, "tokens_per_s": 405.0}
    assert openai_api.story_summary("stop", 0, 0.0)["tokens_per_s"] == 0.0
    assert openai_api.story_body("p", "s", summary) == {"prompt": "p", "story": "s", **summary}
    assert openai_api.story_text_event("a") == {"text": "a"}
    assert openai_api.story_error_event("boom") == {"error": {"message": "boom", "type": "server_error"}}


# ---- stop strings --------------------------------------------------------------------------------------

def test_text_is_cut_at_a_stop_string_and_held_back_while_one_could_be_forming():
    stop = openai_api.text_before_stops
    assert stop("Once upon", 0, []) == ("Once upon", False, 9)  # no stops: all of it
    assert stop("Tom ran. He", 3, ["."]) == ("Tom ran", True, 7)
    # " T" could still grow into " The": held back, but only the part after what was sent
    assert stop("Tom ran T", 0, [" The"]) == ("Tom ran T", False, 7)
    assert stop("Tom ran Th", 0, [" The", "!"]) == ("Tom ran Th", False, 7)
    assert stop("Tom ran Tim", 0, [" The"]) == ("Tom ran Tim", False, 11)
    assert stop("Tom ran T", 9, [" The"]) == ("Tom ran T", False, 9)  # nothing sent is taken back
    # the earliest in the text wins, whatever its place in the list
    assert stop("a. b!", 0, ["!", "."]) == ("a", True, 1)
    # a stop string begun in the text sent (held back since) and completed now is still found
    assert stop("Tom ran", 5, ["ran", "x"]) == ("Tom ", True, 4)


# ---- fuzzed bodies ------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                           | st.text(max_size=30), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stop", "seed", "stream_options", "logprobs", "verb", "noun", "adjective", "features", "model"]
# valid values too, so that a body gets past its first field to the later checks
SOMETIMES_VALID = {"prompt": st.just("Once"), "max_tokens": st.integers(1, 8), "messages":
                   st.just([{"role": "user", "content": "Hi"}]), "verb": st.just("run"), "stream": st.booleans()}
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).flatmap(
    lambda body: st.fixed_dictionaries({k: SOMETIMES_VALID.get(k, st.just(v)) | st.just(v) for k, v in body.items()}))
RAW_BODIES = st.binary(max_size=60) | BODIES.map(lambda b: json.dumps(b).encode())


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(sorted(PARSERS)), body=RAW_BODIES, limits=st.sampled_from([PLAIN, INSTRUCT]),
       max_tokens_garbage=st.sampled_from([None, "x", -1, 0, 10**9, 2.5]))
def test_fuzzed_request_bodies_get_only_4xx(path, body, limits, max_tokens_garbage):
    """Every fuzzed body carries at least one bad field (max_tokens, or the body itself), so
    each must be refused with a 4xx naming a field: no other exception, no request let through."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and max_tokens_garbage is not None:
        body = json.dumps({**parsed, "max_tokens": max_tokens_garbage}).encode()
    elif isinstance(parsed, dict):
        body = body[:-1] + b"!"  # no longer JSON
    with pytest.raises(BadRequest) as caught:
        PARSERS[path](parse_body(body), limits)
    assert 400 <= caught.value.status < 500 and caught.value.param, (body, caught.value)
