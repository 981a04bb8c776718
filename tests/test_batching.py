"""batching.py's scheduler in-process, on the real stories260K weights, no server: rows join a
running batch, leave it packed, are cancelled, queue up to a bound, and sample the same tokens
alone as beside other rows. Most tests drive the engine one step at a time (run_step) so that
each can say exactly when a row joins or leaves; one runs the engine's own thread."""
import os
import threading

import pytest

from batching import BatchEngine, QueueFull, Sequence, ShuttingDown
from checkpoints import load_model
from decoding import prepare_for_sampling, sample_stories
from helpers import TEST_DATA
from tokenizer import Tokenizer

# prompts of different lengths: rows at different positions in one decode step
PROMPTS = [[1], [1, 403, 407], [1, 306, 330, 45, 56], [1, 99], [1, 120, 121, 122, 123, 124, 125]]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(os.path.join(TEST_DATA, "tok512.model"))


def stories260K():
    model, _ = load_model(os.path.join(TEST_DATA, "stories260K.pt"))
    return prepare_for_sampling(model.eval())


@pytest.fixture(scope="module")
def alone(tokenizer):
    """prompt (tuple), max_new_tokens -> the greedy story that prompt gets sampled by itself
    (decoding.sample_stories, on a model of its own: the engine owns its model's cache)."""
    model = stories260K()
    return lambda prompt, n: sample_stories(model, tokenizer, [list(prompt)], n, 0.0, None, 1.0)[0]


@pytest.fixture
def make_engine(tokenizer):
    def make(max_batch=3, max_queue=8):
        return BatchEngine(stories260K(), (tokenizer.eos_id, tokenizer.bos_id), max_batch, max_queue)
    return make


def story(prompt, max_new_tokens, **sampling):
    """A Sequence that records its events in .events."""
    events = []
    seq = Sequence(list(prompt), max_new_tokens, lambda kind, value: events.append((kind, value)),
                   **{"temperature": 0.0, **sampling})
    seq.events = events
    return seq


def run_until_idle(engine, limit=1000):
    for _ in range(limit):
        if not engine.rows and not engine.waiting:
            return
        engine.run_step()
    raise AssertionError("the engine did not finish its stories")


def test_greedy_rows_in_a_batch_are_the_stories_each_gets_alone(make_engine, alone):
    """Five prompts of five lengths through three rows: two wait, then join as rows finish."""
    engine = make_engine(max_batch=3)
    seqs = [story(p, 12 + 9 * i) for i, p in enumerate(PROMPTS)]
    engine.submit(seqs)
    run_until_idle(engine)
    assert engine.steps > 0 and engine.tokens_out == sum(len(s.generated) for s in seqs)
    for seq, prompt in zip(seqs, PROMPTS):
        assert seq.generated == alone(tuple(prompt), seq.max_new_tokens)
        assert seq.events[-1][0] == "done" and seq.finished
        assert [v for kind, v in seq.events if kind == "token"] == seq.generated
    assert len({tuple(s.generated) for s in seqs}) == len(seqs)  # different stories: a row mix-up would show


def test_a_request_joins_a_running_batch_at_the_next_step(make_engine, alone):
    engine = make_engine(max_batch=2)
    first, late = story(PROMPTS[1], 30), story(PROMPTS[4], 20)
    engine.submit([first])
    for _ in range(5):
        engine.run_step()
    assert engine.rows == [first] and len(first.generated) == 6  # the prefill's token, then five steps
    engine.submit([late])
    engine.run_step()
    assert engine.rows == [first, late] and len(late.generated) == 2 and len(first.generated) == 7
    run_until_idle(engine)
    assert first.generated == alone(tuple(PROMPTS[1]), 30)
    assert late.generated == alone(tuple(PROMPTS[4]), 20)


def test_rows_stay_packed_when_a_row_leaves(make_engine, alone):
    """The middle row finishes first: the last row moves into its slot, keys and values too, and
    the next step computes just two rows of the cache."""
    engine = make_engine(max_batch=3)
    seqs = [story(PROMPTS[0], 40), story(PROMPTS[2], 3), story(PROMPTS[4], 40)]
    engine.submit(seqs)
    engine.run_step()
    assert engine.rows == seqs
    while not seqs[1].finished:
        engine.run_step()
    assert engine.rows == [seqs[0], seqs[2]]
    engine.run_step()
    cache = engine.model.layers[0].attention.kv_cache
    assert cache.k.shape[0] == 2 and cache.all_k.shape[0] == 3
    run_until_idle(engine)
    for seq, prompt in zip(seqs, (PROMPTS[0], PROMPTS[2], PROMPTS[4])):
        assert seq.generated == alone(tuple(prompt), seq.max_new_tokens)


def test_cancel_frees_the_row_for_a_waiting_request(make_engine, alone):
    engine = make_engine(max_batch=1)
    running, waiting = story(PROMPTS[1], 50), story(PROMPTS[3], 10)
    engine.submit([running, waiting])
    engine.run_step()
    assert engine.load() == (1, 1)
    running.cancel()
    events_at_cancel = len(running.events)
    engine.run_step()  # the row is freed after this step's admissions...
    assert engine.load() == (0, 1) and engine.rows_cancelled == 1
    engine.run_step()  # ...so the waiting request takes it at the next
    assert engine.rows == [waiting] and engine.load() == (1, 0)
    run_until_idle(engine)
    assert len(running.events) == events_at_cancel and not running.finished  # nothing after cancel()
    assert waiting.generated == alone(tuple(PROMPTS[3]), 10)


def test_a_full_queue_refuses_a_whole_submission(make_engine):
    engine = make_engine(max_batch=1, max_queue=3)
    engine.submit([story(PROMPTS[0], 5), story(PROMPTS[1], 5)])
    with pytest.raises(QueueFull):
        engine.submit([story(PROMPTS[2], 5), story(PROMPTS[3], 5)])  # one would fit: neither is queued
    assert engine.load() == (0, 2)
    engine.submit([story(PROMPTS[2], 5)])
    assert engine.load() == (0, 3)
    cancelled = engine.waiting[0]
    cancelled.cancel()  # a cancelled request gives its queue place back
    engine.submit([story(PROMPTS[3], 5)])
    assert engine.load() == (0, 3) and cancelled not in engine.waiting


def test_a_seeded_row_samples_the_same_tokens_whatever_runs_beside_it(make_engine):
    seeded = dict(temperature=1.0, top_k=20, seed=5)

    def run(neighbours, **sampling):
        engine = make_engine(max_batch=4)
        seq = story(PROMPTS[2], 40, **sampling)
        engine.submit(neighbours[:1] + [seq] + neighbours[1:])
        run_until_idle(engine)
        return seq.generated

    lone = run([], **seeded)
    crowded = run([story(PROMPTS[0], 40, temperature=1.0, top_k=20), story(PROMPTS[1], 40),
                   story(PROMPTS[3], 40, temperature=1.0, top_k=20, seed=5)], **seeded)
    assert crowded == lone and len(lone) > 10
    assert run([], **dict(seeded, seed=6)) != lone  # the seed decides: another gives another story


def test_the_engine_thread_serves_submissions_and_stops(make_engine, alone):
    engine = make_engine(max_batch=2).start()
    finished = [threading.Event() for _ in PROMPTS[:3]]
    seqs = []
    for prompt, done in zip(PROMPTS, finished):
        seq = Sequence(list(prompt), 15, lambda kind, value, done=done: kind != "token" and done.set(),
                       temperature=0.0)
        seqs.append(seq)
    engine.submit(seqs)
    assert all(done.wait(60) for done in finished)
    engine.stop(timeout=30)
    assert not engine.thread.is_alive()
    for seq, prompt in zip(seqs, PROMPTS):
        assert seq.generated == alone(tuple(prompt), 15)
    with pytest.raises(ShuttingDown):
        engine.submit([story(PROMPTS[0], 5)])


def test_a_scored_prompt_beside_running_rows(make_engine, alone):
    """echo with max_new_tokens 0 (what an evaluation harness sends): the prompt's log
    probabilities, then done, and its row is freed at once; the running row's greedy story and
    its per-token log probabilities are unchanged by it."""
    import torch
    engine = make_engine(max_batch=2)
    running = story(PROMPTS[2], 15, logprobs=2)
    engine.submit([running])
    engine.run_step()
    scored = story(PROMPTS[4], 0, echo=True, logprobs=1)
    engine.submit([scored])
    engine.run_step()
    assert [kind for kind, _ in scored.events] == ["prompt_logprobs", "done"] and engine.rows == [running]
    [(_, entries)] = scored.events[:1]
    model = stories260K()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPTS[4]]), all_logits=True)[0][0], dim=-1)
    assert [e[0] for e in entries] == pytest.approx([logp[i, t].item() for i, t in enumerate(PROMPTS[4][1:])], abs=1e-4)
    assert [e[1][0][0] for e in entries] == logp[:-1].argmax(-1).tolist()
    run_until_idle(engine)
    assert running.generated == alone(tuple(PROMPTS[2]), 15)
    kinds = [kind for kind, _ in running.events]
    assert kinds[:-1] == ["logprob", "token"] * 15 and kinds[-1] == "done"
    for (_, (logprob, top)), token in zip(running.events[0::2], running.generated):
        assert top[0] == (token, logprob) and len(top) == 2  # greedy: the likeliest


def test_joining_rows_are_prefilled_together_and_attend_over_the_positions_in_use(make_engine, alone, monkeypatch):
    """Three requests that arrive together: one prefill call for all (not one each, which would
    stall the running rows three times); every decode step reads only the cache positions the
    rows can see, rounded up to a power of two, not the whole 512-position context."""
    engine = make_engine(max_batch=3)
    calls, prefill = [], engine.decoder.prefill
    monkeypatch.setattr(engine.decoder, "prefill", lambda tokens, lengths=None: calls.append(tokens.shape) or
                        prefill(tokens, lengths))
    seqs = [story(PROMPTS[i], 40) for i in (0, 2, 4)]
    engine.submit(seqs)
    engine.run_step()
    assert calls == [(3, len(PROMPTS[4]))]
    cache = engine.model.layers[0].attention.kv_cache
    assert cache.k.shape[2] == 32 and cache.all_k.shape[2] == 512
    run_until_idle(engine)
    assert cache.k.shape[2] == 64  # the longest row reached position 7 + 39 = 46
    for seq, i in zip(seqs, (0, 2, 4)):
        assert seq.generated == alone(tuple(PROMPTS[i]), 40)
