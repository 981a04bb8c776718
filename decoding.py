"""Sampling from a trained model: loading it for sampling, prefill, decode steps, generate.

`Decoder` wraps a model prepared for sampling (fused projections, maybe int8 weights) with what
only sampling needs: a classifier laid out for one-row products, a bfloat16 copy of it to rank
large vocabularies, and the compiled decode step. `prefill` runs the whole prompt once, filling
the model's KV cache; `decode_step` then adds one token at a time; `generate` strings the two
together with temperature / top-k / top-p sampling. This module is also the one place that holds
torch.compile's settings, for generate, the AOTInductor package and continuous batching.
"""
import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import load_model, load_tokenizer_for
from cli import UsageError, torch_dtype
from quantize import quantize_int8
from sampling import exponential_noise, pick_token, sample

# a compiled float32 step ranks vocabularies of at least RANKED_VOCAB tokens in bfloat16, and
# takes exact logits for RANKED_SPARE more candidates than top_k asks for. A bfloat16 score is
# off from the exact logit by at most RANK_ERROR * |h| * |w| (bfloat16 keeps 8 significant bits:
# 2^-8 for each rounded factor and 2^-8 for the rounded sum, with room to spare), so a step can
# tell whether a token left out might have beaten the candidates; where it might (near-ties, as in
# a freshly initialised model) the step computes every exact logit instead
RANKED_VOCAB, RANKED_SPARE, RANK_ERROR = 8192, 8, 2.0 ** -6

# inductor settings for the compiled decode step on a CPU, each measured to pay at stories15M's
# shape (docs/benchmarks.md): the weights become constants of the graph (freezing), matmuls pick
# the faster of ATen's kernel and inductor's own packed C++ GEMM (max_autotune), and the code
# around the kernels runs as C++, not Python (cpp_wrapper)
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "cpp_wrapper": True}


# ---- compile settings ------------------------------------------------------------------------

def inductor_options(device) -> dict:
    """The inductor settings a decode step compiles with on this device (COMPILE_OPTIONS on a CPU)."""
    return dict(COMPILE_OPTIONS) if torch.device(device).type == "cpu" else {}


def compiled_call_settings(compiled: bool, first: bool, device):
    """A generation's first compiled step runs with COMPILE_OPTIONS (on a CPU), since only it can
    compile: the rest of the generation keeps its shapes. Those later steps skip dynamo's guards,
    about 90 us a call at stories15M's size, which the first step has checked."""
    if not compiled:
        return contextlib.nullcontext()
    if first:
        return torch._inductor.config.patch(inductor_options(device))
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


def row_count_settings(compiled: bool):
    """For a step compiled once for every number of rows (continuous batching): torch.compile
    takes a module buffer's shape as fixed, and the KV cache's row views are module buffers whose
    row count changes; without this every batch size compiles anew."""
    if not compiled:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(force_nn_module_property_static_shapes=False,
                                      force_parameter_static_shapes=False)


# ---- loading a model for sampling ------------------------------------------------------------

@torch.no_grad()
def fuse_projections(model):
    """wq, wk, wv become one matmul, and so do w1, w3. A decode step's matmuls are small enough
    that each call's fixed cost counts (docs/benchmarks.md)."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if attn.wqkv is None:
            attn.wqkv = concat_linear(attn.wq, attn.wk, attn.wv)
            del attn.wq, attn.wk, attn.wv
        if ffn.w13 is None:
            ffn.w13 = concat_linear(ffn.w1, ffn.w3)
            del ffn.w1, ffn.w3
    return model


def concat_linear(*linears):
    out = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears), bias=False)
    out.weight = nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
    return out


def prepare_for_sampling(model, quantize="none"):
    """The load-time steps of the fast path: wq/wk/wv and w1/w3 fused into one matmul each,
    then the weights quantized if asked."""
    fuse_projections(model)
    if quantize == "int8":
        quantize_int8(model)
    return model


def load_for_sampling(model_path, tokenizer_path, device, dtype, quantize="none"):
    """(model, checkpoint, tokenizer) with the tokenizer checked against the model's vocab.
    The model is for sampling only: its projections are fused (and maybe quantized)."""
    model, ckpt = load_model(model_path, device=device, dtype=torch_dtype(dtype))
    tokenizer = load_tokenizer_for(ckpt, tokenizer_path)
    return prepare_for_sampling(model, quantize), ckpt, tokenizer


# ---- the decoder -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """One generation's sampling settings, with the generator its draws come from."""
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None

    def sample(self, logits):
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def noise(self, batch, vocab_size, device):
        return exponential_noise(batch, vocab_size, self.temperature, self.top_k, self.generator, device)


_decoders = weakref.WeakKeyDictionary()


def decoder_for(model) -> "Decoder":
    """The model's Decoder, made once: its classifier copies and its compiled step (one graph for
    every later call) live as long as the model."""
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = Decoder(model)
    return decoder


class Decoder(nn.Module):
    """A model's sampling side. It holds the model weakly (decoder_for keeps one per model);
    its compiled step takes the model as an argument, so dynamo guards it as it guards any input.
    It is a module only so that its copies of the classifier are buffers: a compiled step folds a
    module's buffers into the graph as constants (freezing), but not a plain object's tensors,
    which cost float32 about a quarter of its tokens/s at stories15M's shape."""

    def __init__(self, model):
        super().__init__()
        self._model = weakref.ref(model)
        self.register_buffer("classifier", None, persistent=False)  # output.weight as (dim, vocab), float32
        self.register_buffer("ranker", None, persistent=False)  # output.weight in bfloat16, large vocabularies
        self.register_buffer("ranker_norm", None, persistent=False)  # the largest norm of a row of output.weight
        self._classifier_made_from = (None, None)  # (weight, version) they were copied from
        self._compiled_pick = None

    @property
    def model(self):
        return self._model()

    def refresh_classifier(self):
        # a one-row float32 product against (dim, vocab) runs about 1.1-1.4x faster on a CPU
        # than nn.Linear's (vocab, dim); in bfloat16 it is the other way round (docs/benchmarks.md)
        output = self.model.output
        weight = output.weight
        # the copy takes 20 ms at stories15M's size, so it is kept until the weight changes
        # (an inference tensor keeps no version: made in inference mode, it is taken as unchanged)
        version = None if weight.is_inference() else weight._version
        if self._classifier_made_from[0] is weight and self._classifier_made_from[1] == version:
            return
        float32 = type(output) is nn.Linear and weight.dtype == torch.float32
        self.classifier = weight.t().contiguous() if float32 else None
        # the compiled step ranks a large vocabulary with a bfloat16 copy: half the bytes
        self.ranker = weight.bfloat16() if float32 and weight.shape[0] >= RANKED_VOCAB else None
        self.ranker_norm = weight.norm(dim=1).max() if self.ranker is not None else None
        self._classifier_made_from = (weight, version)

    def next_token_logits(self, model, h, last=None):
        """Logits of each row's last position: h's final one, or the index in last (batch,)."""
        h = h[:, -1, :] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        return h @ self.classifier if self.classifier is not None else model.output(h)

    def prefill(self, tokens, lengths=None):
        """Run the prompts through the model once, filling the cache; each row's last logits.
        lengths (batch,): rows padded on the right to one width. A row's padding lands in the
        cache after its prompt, where its decode steps overwrite it before any query sees it."""
        model = self.model
        input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        last = None if lengths is None else lengths - 1
        return self.next_token_logits(model, model.hidden_states(tokens, input_pos), last)

    def decode_step(self, model, token, input_pos, compiled=False):
        """One new token per sample at position input_pos (a 1-element tensor, or (batch, 1):
        each sample at its own position); its logits. compiled: the step is being compiled, and
        so takes the attention that inductor fuses."""
        return self.next_token_logits(model, model.hidden_states(token, input_pos, decode_attention=compiled))

    def decode_and_pick(self, model, token, input_pos, temperature, top_k, top_p, noise, compiled=False):
        """decode_step and the sampler in one function, so that both compile into one graph.
        Compiled, a float32 model with a large vocabulary reads its classifier in bfloat16 to rank
        the tokens, then computes exact float32 logits for the best RANKED_SPARE (+ top_k) of them,
        which is all that greedy and top-k sampling look at (about 0.3 ms less a token at
        stories15M's shape; docs/benchmarks.md), unless the ranking's error bound says a token
        outside them might belong: then it takes every exact logit, as the eager step does."""
        if self.ranker is None or not compiled or (temperature != 0 and top_k is None):
            return pick_token(self.decode_step(model, token, input_pos, compiled), temperature, top_k, top_p, noise)
        h = model.hidden_states(token, input_pos, decode_attention=True)[:, -1, :]
        count = min(RANKED_SPARE + (top_k or 0), model.args.vocab_size)
        ranked = F.linear(h.bfloat16(), self.ranker).topk(count, dim=-1)
        ids, logits = candidate_logits(model, h, ranked.indices)
        # no token outside ids scores above the last candidate's score plus the error bound
        outside = ranked.values[:, -1].float() + RANK_ERROR * h.norm(dim=-1) * self.ranker_norm
        needed = logits.topk(min(top_k or 1, count), dim=-1).values[:, -1]

        def ranked_candidates(h, ids, logits):
            return ids.clone(), logits.clone()  # torch.cond's branches may not return their inputs

        def exact_candidates(h, ids, logits):
            every = self.next_token_logits(model, h[:, None, :])
            best = every.topk(count, dim=-1).indices
            # topk may leave out the first of more than count tied maxima: the argmax goes in
            # for the last of them
            first = every.argmax(dim=-1, keepdim=True)
            last_column = torch.arange(count, device=h.device) == count - 1
            best = torch.where(last_column & ~(best == first).any(-1, keepdim=True), first, best).sort(dim=-1).values
            return best, every.gather(-1, best)
        ids, logits = torch.cond((needed > outside).all(), ranked_candidates, exact_candidates, (h, ids, logits))
        return pick_token(logits, temperature, top_k, top_p, noise, ids)

    def compiled_decode_and_pick(self, model, token, input_pos, temperature, top_k, top_p, noise):
        return self.decode_and_pick(model, token, input_pos, temperature, top_k, top_p, noise, compiled=True)

    def compiled_step(self):
        """compiled_decode_and_pick compiled once for this model's weights: the cache always holds
        max_seq_len positions, so one graph serves every prompt length and position. On a CPU,
        COMPILE_OPTIONS fold the weights into the graph (compiled_call_settings), so it is for
        sampling only: weights changed in place afterwards are not seen. torch.compile is lazy,
        so this costs nothing until the first call."""
        if self._compiled_pick is None:
            self._compiled_pick = torch.compile(self.compiled_decode_and_pick, fullgraph=True)
        return self._compiled_pick

    @torch.inference_mode()
    def generate(self, prompt, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                 stop_ids=(), use_cache=True, generator=None, compile=False,
                 lengths=None, package=None) -> Iterator[torch.Tensor]:
        """Yield a (batch,) tensor of new token ids per step. A sample that produced a stop id
        keeps yielding that id; the loop ends once every sample has stopped. compile: run the
        decode step and the sampler through torch.compile (the prompt's prefill stays eager).
        lengths (batch,): prompts of different lengths, padded on the right (needs the cache).
        package: decode_package's runner for these settings, which holds its own cache: the
        prompt goes through it a token at a time."""
        if lengths is not None and not use_cache:
            raise ValueError("prompts of different lengths need the KV cache")
        longest = prompt.shape[1] if lengths is None else int(max(lengths))
        # the last new token is never fed back in, so prompt + new - 1 positions must fit
        max_new_tokens = min(max_new_tokens, self.model.args.max_seq_len - longest + 1)
        sampling = Sampling(temperature, top_k, top_p, generator)
        compile = compile or package is not None
        if not use_cache:
            next_tokens = self._recomputing_steps(sampling)
        elif package is not None:
            next_tokens = self._packaged_steps(prompt, lengths, sampling, package)
        else:
            next_tokens = self._cached_steps(prompt, lengths, sampling, compile, longest + max_new_tokens - 1)
        try:
            yield from until_stopped(next_tokens, prompt, max_new_tokens, stop_ids, use_cache)
        finally:
            if not compile:  # the compiled step keeps its cache for the next call
                self.model.clear_cache()

    # each of the three ways of stepping is a function (step, tokens fed back) -> next tokens

    def _recomputing_steps(self, sampling):
        """No cache: every step runs the whole context again."""
        model = self.model
        self.refresh_classifier()
        return lambda step, tokens: sampling.sample(self.next_token_logits(model, model.hidden_states(tokens)))

    def _cached_steps(self, prompt, lengths, sampling, compile, positions_needed):
        """The prompt's prefill, then one decode step a token (compiled: one graph for all)."""
        model, batch = self.model, prompt.shape[0]
        lengths, input_pos = start_positions(prompt, lengths, compile)
        pick = self.compiled_step() if compile else self.decode_and_pick
        self.refresh_classifier()
        model.setup_cache(batch, model.args.max_seq_len if compile else positions_needed)

        def next_tokens(step, tokens):
            if step == 0:
                return sampling.sample(self.prefill(prompt, lengths))
            noise = sampling.noise(batch, model.args.vocab_size, prompt.device)
            with compiled_call_settings(compile, step == 1, prompt.device):
                picked = pick(model, tokens, input_pos, sampling.temperature, sampling.top_k, sampling.top_p,
                              noise=noise)
            input_pos.add_(1)  # in place: the next step sees the same tensor, one further
            return picked
        return next_tokens

    def _packaged_steps(self, prompt, lengths, sampling, package):
        """Every step through the package, the prompt too, a position at a time. The prompt's
        positions share one draw of noise, as the eager prefill's one pick does, so that a seed
        gives the same story either way."""
        batch, width = prompt.shape
        _, input_pos = start_positions(prompt, lengths, compiled=True)
        no_noise = torch.zeros(batch, 1, device=prompt.device)  # greedy: the package's placeholder input

        def draw():
            noise = sampling.noise(batch, self.model.args.vocab_size, prompt.device)
            return no_noise if noise is None else noise

        def next_tokens(step, tokens):
            if step == 0:  # a row's pick after its last prompt token is its first
                noise = draw()
                picks = [package(prompt[:, i:i + 1], torch.full_like(input_pos, i), noise) for i in range(width)]
                return torch.stack(picks, dim=1).gather(1, input_pos - 1).squeeze(1)
            picked = package(tokens, input_pos, draw())
            input_pos.add_(1)
            return picked
        return next_tokens


def candidate_logits(model, h, ids):
    """(ids in id order, their exact logits): in id order, so that exact ties go to the lowest
    id, as the eager argmax's do."""
    ids = ids.sort(dim=-1).values
    return ids, (model.output.weight[ids] @ h[:, :, None]).squeeze(-1)


def start_positions(prompt, lengths, compiled):
    """(lengths, the position of each row's first new token). Compiled steps always take
    (batch, 1) positions, so that one graph serves every call."""
    batch, width = prompt.shape
    if lengths is None and compiled:
        lengths = [width] * batch
    if lengths is None:
        return None, torch.tensor([width], device=prompt.device)  # every row at one position
    lengths = torch.as_tensor(lengths, device=prompt.device)
    return lengths, lengths[:, None].clone()


def until_stopped(next_tokens, prompt, max_new_tokens, stop_ids, use_cache):
    """Yield next_tokens(step, tokens fed back) until each row has produced a stop id (a
    stopped row keeps yielding it) or max_new_tokens steps."""
    stop = torch.tensor(list(stop_ids) or [-1], device=prompt.device)
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens = prompt
    for step in range(max_new_tokens):
        next_token = torch.where(finished, tokens[:, -1], next_tokens(step, tokens))
        finished |= torch.isin(next_token, stop)
        # the cached path only ever feeds back the newest token
        tokens = next_token[:, None] if use_cache else torch.cat((tokens, next_token[:, None]), dim=1)
        yield next_token
        if finished.all():
            break


def generate(model, prompt, max_new_tokens, **kwargs) -> Iterator[torch.Tensor]:
    """Decoder.generate with the model's decoder."""
    return decoder_for(model).generate(prompt, max_new_tokens, **kwargs)


# ---- stories ---------------------------------------------------------------------------------

def check_prompt_length(model, prompts):
    longest = max(len(ids) for ids in prompts)
    if longest >= model.args.max_seq_len:
        raise UsageError(f"prompt is {longest} tokens; the model's context is {model.args.max_seq_len}")


def sample_stories(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p,
                   seed=None, use_cache=True, on_token=None, compile=False, package=None):
    """Sample one continuation per prompt (token lists, of any lengths) as one batch; returns
    one token list per prompt, cut before its stop token. on_token(step) sees every step."""
    check_prompt_length(model, prompts)
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    lengths = [len(ids) for ids in prompts]
    width = max(lengths)
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in prompts], dtype=torch.long, device=device)
    stop_ids = (tokenizer.eos_id, tokenizer.bos_id)
    steps = []
    for step in generate(model, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_ids=stop_ids, use_cache=use_cache, generator=generator, compile=compile,
                         package=package, lengths=None if min(lengths) == width else lengths):
        steps.append(step.tolist())
        if on_token:
            on_token(steps[-1])
    samples = []
    for i in range(len(prompts)):
        tokens = [s[i] for s in steps]
        cut = next((j for j, t in enumerate(tokens) if t in stop_ids), len(tokens))
        samples.append(tokens[:cut])
    return samples
