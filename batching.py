"""Continuous batching for serve.py: one thread owns the model and samples every request that is
running, one token per request per step. A request that arrives while the loop runs waits in a
bounded queue and joins the batch at the next step; a finished or cancelled one leaves it and
frees its row at once.

Rows hold prompts of different lengths, so each row has its own position: the decode step is
given a (rows, 1) position tensor (model.py's per-row input_pos) and writes each row's key and
value at that row's position of one shared KV cache. The running rows are always rows 0..n-1 of
the cache (RowCaches: a leaving row's slot is filled by moving the last row into it), so a step
computes exactly the rows that run, on views of the cache, with no padding.

The engine knows nothing of HTTP: a request is a Sequence, and the engine reports its tokens and
its end through the Sequence's on_event callback, called from the engine's thread.
"""
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from decoding import decoder_for, row_count_settings
from sampling import sample


def token_logprobs(logits, tokens, top):
    """For each row of logits (positions, vocab) and the token that followed there: its log
    probability and the `top` likeliest (token, log probability) pairs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [(c, []) for c in chosen]
    values, ids = logp.topk(top, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


class QueueFull(Exception):
    """Every row is busy and the waiting queue is at its bound: the caller should retry later."""


class ShuttingDown(Exception):
    """The engine no longer takes requests."""


@dataclass
class Sequence:
    """One request's story: prompt ids in, sampled ids out through on_event(kind, value):
    ("token", id) per sampled token, then ("done", "stop" | "length") or ("error", message).
    A stop token ends the story and is not reported. With logprobs (the number of likeliest
    tokens to report, 0..5), each token's event comes after a ("logprob", (logprob, top pairs));
    with echo too, a ("prompt_logprobs", [...]) event first covers the prompt's tokens after its
    first. max_new_tokens 0 (with echo): the prompt is scored and nothing is sampled."""
    prompt_ids: List[int]
    max_new_tokens: int
    on_event: Callable[[str, object], None]
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    echo: bool = False
    generated: List[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False  # ended by a stop token or max_new_tokens, not by cancel()
    submitted_at: float = 0.0
    started_at: Optional[float] = None  # when it got a row
    # the engine's bookkeeping: the next position to feed and the token that goes there
    pos: int = 0
    last: int = 0
    generator: Optional[torch.Generator] = None

    def cancel(self):
        """Free the row (or the queue place) at the engine's next step; no more events come."""
        self.cancelled = True


class RowCaches:
    """The model's KV cache with a row per running sequence, max_rows in all. The running rows
    are kept packed as rows 0..n-1, so a step reads and writes views of just those rows."""

    def __init__(self, model, max_rows):
        self.model = model
        model.setup_cache(max_rows, model.args.max_seq_len)
        self.caches = [layer.attention.kv_cache for layer in model.layers]

    def use(self, rows: slice, positions: int):
        """The model's next call reads and writes these rows of the cache, and attends over its
        first `positions` positions only: rounded up to a power of two (32 at least), so that a
        compiled step sees few shapes."""
        bucket = min(self.model.args.max_seq_len, max(32, 1 << (positions - 1).bit_length()))
        for cache in self.caches:
            cache.select_positions(rows, bucket)

    def move(self, source: int, dest: int):
        """Row source's keys and values into row dest (a leaving row's slot refilled)."""
        for cache in self.caches:
            cache.copy_row(source, dest)


class BatchEngine:
    def __init__(self, model, stop_ids, max_batch=16, max_queue=64, compile=False):
        self.model, self.stop_ids = model, frozenset(stop_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.tok_embeddings.weight.device
        self.context = model.args.max_seq_len
        self.row_caches = RowCaches(model, max_batch)
        self.decoder = decoder_for(model)
        self.decoder.refresh_classifier()
        # the number of running rows changes from step to step: dynamic shapes, one compile
        self.step_fn, self.compiled = self.decoder.decode_step, compile
        if compile:
            self.step_fn = torch.compile(self.decoder.decode_step, dynamic=True)
            self._warm_up()
        self.rows: List[Sequence] = []
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.accepting, self.stopping = True, False
        self.steps = 0  # decode steps run; with tokens_out, the mean batch a step carried
        self.tokens_out = 0
        self.rows_cancelled = 0  # rows freed before their story ended: clients gone, stop strings
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)

    def _decode(self, tokens, positions):
        with row_count_settings(self.compiled):
            return self.step_fn(self.model, tokens, positions, compiled=self.compiled)

    def _warm_up(self):
        """Compile before the first request: torch.compile specialises a batch of 1 and
        compiles one graph for every larger batch, so both are traced here. The position-0
        keys and values they write are overwritten by each row's prefill."""
        with torch.inference_mode():
            for rows in sorted({1, min(2, self.max_batch)}):
                self.row_caches.use(slice(0, rows), self.context)
                token, position = (torch.zeros((rows, 1), dtype=torch.long, device=self.device) for _ in "tp")
                self._decode(token, position)

    # ---- the caller's side (any thread) ------------------------------------------------------

    def start(self):
        self.thread.start()
        return self

    def submit(self, sequences: List[Sequence]):
        """Queue all of sequences or none: QueueFull when they would not fit in the queue."""
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            self._drop_cancelled_waiting()
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.rows)} stories running and {len(self.waiting)} waiting")
            now = time.perf_counter()
            for seq in sequences:
                seq.submitted_at = now
                self.waiting.append(seq)
            self.cond.notify()

    def load(self):
        """(running rows, waiting requests)."""
        with self.cond:
            return len(self.rows), len(self.waiting)

    def stop(self, timeout=None):
        """Take no more requests, let the running and queued ones finish, end the thread."""
        with self.cond:
            self.accepting, self.stopping = False, True
            self.cond.notify()
        self.thread.join(timeout)

    # ---- the engine's thread -----------------------------------------------------------------

    def _drop_cancelled_waiting(self):
        if any(s.cancelled for s in self.waiting):
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)

    def _run(self):
        while self._wait_for_work():
            self.run_step()

    def _wait_for_work(self) -> bool:
        """Block until a request runs or waits; False once stopping and nothing is left."""
        with self.cond:
            while not self.rows and not self.waiting and not self.stopping:
                self.cond.wait()
            return not (self.stopping and not self.rows and not self.waiting)

    @torch.inference_mode()
    def run_step(self):
        """One turn of the engine's loop (its thread calls it; a test may instead): waiting
        requests join free rows with their prefill, then every running row samples one token."""
        with self.cond:
            self._drop_cancelled_waiting()
            joining = []
            while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                joining.append(self.waiting.popleft())
        try:
            self._prefill(joining)
            self._free_rows()
            if self.rows:
                self._decode_step()
                self._free_rows()
        except Exception as exc:  # a bug or out of memory: fail these stories, keep serving
            message = f"sampling failed: {type(exc).__name__}: {exc}"
            for seq in self.rows + joining:
                if not seq.cancelled:
                    seq.on_event("error", message)
                    seq.cancel()
            with self.cond:
                self.rows = []

    def _prefill(self, joining: List[Sequence]):
        """The joining prompts through the model together, one call for all (as generate.py's
        batched prefill: right-padded, each row in the next free row of the cache, positions
        0..len-1), and each one's first token sampled at once. An echo row needs every
        position's logits, not just its last: it goes alone."""
        joining = [s for s in joining if not s.cancelled]
        for seq in joining:
            seq.started_at = time.perf_counter()
            if seq.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
            # the last new token is never fed back in, so prompt + new - 1 positions must fit
            seq.max_new_tokens = min(seq.max_new_tokens, self.context - len(seq.prompt_ids) + 1)
        for batch in [[s] for s in joining if s.echo] + [[s for s in joining if not s.echo]]:
            if not batch:
                continue
            first, width = len(self.rows), max(len(s.prompt_ids) for s in batch)
            self.row_caches.use(slice(first, first + len(batch)), width)
            prompts = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
            for i, seq in enumerate(batch):
                prompts[i, :len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
            if batch[0].echo:  # every position's logits: the prompt's own log probabilities
                [seq] = batch
                logits = self.model.output(self.model.hidden_states(prompts, torch.arange(width, device=self.device)))[0]
                seq.on_event("prompt_logprobs", token_logprobs(logits[:-1], seq.prompt_ids[1:], seq.logprobs))
                logits = logits[-1:]
            else:
                lengths = torch.tensor([len(s.prompt_ids) for s in batch], device=self.device)
                logits = self.decoder.prefill(prompts, lengths)
            with self.cond:
                self.rows += batch
            for i, seq in enumerate(batch):
                seq.pos = len(seq.prompt_ids)
                self._first_token(seq, logits[i])

    def _first_token(self, seq: Sequence, logits):
        if seq.max_new_tokens == 0:  # echo alone: the prompt scored, nothing sampled
            seq.finished = True
            seq.on_event("done", "length")
            seq.cancel()
            return
        self._take(seq, sample(logits[None], seq.temperature, seq.top_k, seq.top_p, seq.generator)[0], logits)

    def _decode_step(self):
        rows = self.rows
        # compiled, the step keeps the whole cache: a new cache length would cost a recompile
        self.row_caches.use(slice(0, len(rows)), self.context if self.compiled else max(s.pos for s in rows) + 1)
        tokens = torch.tensor([[s.last] for s in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.pos] for s in rows], dtype=torch.long, device=self.device)
        logits = self._decode(tokens, positions)
        for seq in rows:
            seq.pos += 1
        for indices, token_ids in self._sample_rows(logits):
            for i, token in zip(indices, token_ids.tolist()):
                self._take(rows[i], token, logits[i])
        self.steps += 1

    def _sample_rows(self, logits):
        """Rows with the same settings and no seed of their own are sampled in one call;
        seeded rows alone, each from its own generator, so a seed gives the same story
        whatever else runs beside it."""
        groups = collections.defaultdict(list)
        for i, seq in enumerate(self.rows):
            if seq.temperature == 0:
                key = "greedy"
            elif seq.generator is not None:
                key = ("seeded", i)
            else:
                key = (seq.temperature, seq.top_k, seq.top_p)
            groups[key].append(i)
        for key, indices in groups.items():
            seq = self.rows[indices[0]]
            picked = logits[indices]
            yield indices, sample(picked, seq.temperature, seq.top_k, seq.top_p, seq.generator)

    def _take(self, seq: Sequence, token, logits=None):
        token = int(token)
        if seq.cancelled:
            return
        if token in self.stop_ids:
            seq.finished = True
            seq.on_event("done", "stop")
            seq.cancel()
            return
        if seq.logprobs is not None:
            seq.on_event("logprob", token_logprobs(logits[None], [token], seq.logprobs)[0])
        seq.generated.append(token)
        seq.last = token
        self.tokens_out += 1
        seq.on_event("token", token)
        if len(seq.generated) >= seq.max_new_tokens:
            seq.finished = True
            seq.on_event("done", "length")
            seq.cancel()

    def _free_rows(self):
        """Finished and cancelled rows leave; the last running row moves into each freed slot,
        so the running rows stay 0..n-1."""
        with self.cond:
            row = 0
            while row < len(self.rows):
                if not self.rows[row].cancelled:
                    row += 1
                    continue
                self.rows_cancelled += not self.rows[row].finished
                last = len(self.rows) - 1
                if row != last:
                    self.row_caches.move(last, row)
                    self.rows[row] = self.rows[last]
                self.rows.pop()
