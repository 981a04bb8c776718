"""Llama 2 transformer with weights laid out exactly as llama2.c lays them out.

Training uses `Transformer.forward(tokens, targets)`. Inference uses a per-layer KV cache of
fixed size: `prefill` runs the whole prompt once, `decode_step` then adds one token at a time,
and `generate` strings the two together with temperature / top-k / top-p sampling. The decode
step only ever sees tensors of the same shapes (the position is a tensor, the cache is written
in place), so `generate(compile=True)` compiles it once for every position.
"""
import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sampling import exponential_noise, pick_token, sample


# a compiled float32 step ranks vocabularies of at least RANKED_VOCAB tokens in bfloat16, and
# takes exact logits for RANKED_SPARE more candidates than top_k asks for: a bfloat16 logit is off
# by about 0.4% of its size, far less than the gap between the best token and the 8th best
RANKED_VOCAB, RANKED_SPARE = 8192, 8

# inductor settings for the compiled decode step on a CPU, each measured to pay at stories15M's
# shape (docs/benchmarks.md): the weights become constants of the graph (freezing), matmuls pick
# the faster of ATen's kernel and inductor's own packed C++ GEMM (max_autotune), and the code
# around the kernels runs as C++, not Python (cpp_wrapper)
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "cpp_wrapper": True}


@dataclass
class ModelArgs:
    # llama2.c's defaults, so its model_args dicts load unchanged
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads "
                             f"{self.n_kv_heads} must divide evenly")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 for the statistics: bfloat16 loses too much in the mean of squares
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate ADJACENT pairs (x0, x1), (x2, x3)... as Meta's and llama2.c's weights expect.
    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim / 2), or (batch, seq, head_dim / 2)
    for rows at different positions. Each pair is one complex number turned by the position's
    angle: a single multiply forwards and backwards, about 5x cheaper on a CPU than rotating the
    real pairs element by element (docs/finetuning.md, round 3)."""
    cos, sin = (t[:, :, None, :] if t.dim() == 3 else t[None, :, None, :] for t in (cos, sin))
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # inductor generates no code for complex numbers; the real pairs fuse into one kernel
        x0, x1 = pairs.unbind(-1)
        turned = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return turned.flatten(-2).type_as(x)
    turned = torch.view_as_complex(pairs) * torch.complex(cos.float(), sin.float())
    return torch.view_as_real(turned).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position, written in place at the positions in a tensor and
    read whole: no shape depends on how far generation has got. The zeros never written are
    masked out, and being finite they cannot turn the masked softmax into NaNs."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        if input_pos.dim() == 2:  # (batch, seq): row b's tokens go to its own positions
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
            return self.k, self.v
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: Optional[nn.Module] = None  # wq, wk, wv as one matmul: fuse_projections()
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        batch, seq, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if self.kv_cache is not None:
            # the whole cache comes back; mask says which positions each query may see
            k, v = self.kv_cache.update(input_pos, k, v)
        if self.kv_cache is not None and seq == 1 and torch.compiler.is_compiling():
            out = decode_attention(q, k, v, mask)
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.resid_dropout(self.wo(out))


def decode_attention(q, k, v, mask):
    """One query per row against the whole cache, written out so that inductor fuses it: the
    flash-attention kernel costs about 30 us a call on a CPU, whatever the size."""
    batch, n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[1]
    q = q.view(batch, n_kv_heads, n_heads // n_kv_heads, head_dim)  # the query heads of each kv head
    scores = (q.float() @ k.float().transpose(2, 3)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~mask.view(-1, 1, 1, mask.shape[-1]), float("-inf"))
    out = scores.softmax(dim=-1) @ v.float()
    return out.view(batch, n_heads, 1, head_dim).type_as(q)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: Optional[nn.Module] = None  # w1 and w3 as one matmul: fuse_projections()
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as in llama2.c
        cos, sin = rope_tables(args.head_dim, args.max_seq_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.classifier: Optional[torch.Tensor] = None  # set for inference: setup_classifier()
        self.ranker: Optional[torch.Tensor] = None
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, input_pos=None, all_logits=False, target_weights=None):
        """With targets: the mean cross entropy over the positions whose target is not -1 (weighted
        by target_weights when given), and those positions' logits, (positions, vocab) in row-major
        order. Without: logits of the last position only (all of them if all_logits), loss None.
        input_pos (set by prefill/decode_step): the tokens' positions, where they go in the cache;
        (seq,) for every row alike, or (batch, seq) for rows at different positions."""
        h = self.hidden_states(tokens, input_pos)
        if targets is not None:
            h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
            weights = None if target_weights is None else target_weights.reshape(-1)
            if not torch.compiler.is_compiling():
                # instruct rows score only the story (about half of a demo batch): the prompt and
                # the padding need no classifier. Compiled graphs keep their static shapes instead
                scored = (targets != -1).nonzero().squeeze(1)
                h, targets = h[scored], targets[scored]
                weights = None if weights is None else weights[scored]
            logits = self.output(h)
            if weights is None:
                return logits, F.cross_entropy(logits.float(), targets, ignore_index=-1)
            weights = weights * (targets != -1)
            losses = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")
            return logits, (losses * weights).sum() / weights.sum()
        return self.output(h if all_logits else h[:, [-1], :]), None

    def hidden_states(self, tokens, input_pos=None):
        """The final-norm outputs. Without input_pos the tokens are positions 0.. and attend
        causally among themselves; with it they are written into the KV cache at those positions
        and attend to every cached position up to their own."""
        seq = tokens.shape[1]
        if input_pos is None:
            if seq > self.args.max_seq_len:
                raise ValueError(f"{seq} positions exceed max_seq_len {self.args.max_seq_len}")
            cos, sin, mask = self.freqs_cos[:seq], self.freqs_sin[:seq], None
        else:
            cos, sin = self.freqs_cos[input_pos], self.freqs_sin[input_pos]
            cache_len = self.layers[0].attention.kv_cache.k.shape[2]
            mask = torch.arange(cache_len, device=tokens.device) <= input_pos[..., None]
            if input_pos.dim() == 2:
                mask = mask[:, None]  # (batch, 1, seq, cache_len): one mask per row, every head
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask)
        return self.norm(h)

    # ---- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def fuse_projections(self):
        """For inference: wq, wk, wv become one matmul, and so do w1, w3. A decode step's
        matmuls are small enough that each call's fixed cost counts (docs/benchmarks.md)."""
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            if attn.wqkv is None:
                attn.wqkv = _concat_linear(attn.wq, attn.wk, attn.wv)
                del attn.wq, attn.wk, attn.wv
            if ffn.w13 is None:
                ffn.w13 = _concat_linear(ffn.w1, ffn.w3)
                del ffn.w1, ffn.w3
        return self

    def setup_cache(self, batch_size: int, max_seq_len: int):
        param = self.tok_embeddings.weight
        shape = (batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim)
        caches = [layer.attention.kv_cache for layer in self.layers]
        if all(c is not None and c.k.shape == shape and c.k.dtype == param.dtype for c in caches):
            return  # reused as it is: what an earlier run left in it is masked until overwritten
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len,
                                               self.args.head_dim, param.dtype, param.device)

    def setup_classifier(self):
        # a one-row float32 product against (dim, vocab) runs about 1.1-1.4x faster on a CPU
        # than nn.Linear's (vocab, dim); in bfloat16 it is the other way round (docs/benchmarks.md)
        linear = type(self.output) is nn.Linear
        weight = self.output.weight
        # the copy takes 20 ms at stories15M's size, so it is kept until the weight changes
        # (an inference tensor keeps no version: made in inference mode, it is taken as unchanged)
        version = None if weight.is_inference() else weight._version
        made_from = getattr(self, "_classifier_made_from", (None, None))
        if made_from[0] is not weight or made_from[1] != version:
            float32 = linear and weight.dtype == torch.float32
            self.classifier = weight.t().contiguous() if float32 else None
            # the compiled step ranks a large vocabulary with a bfloat16 copy: half the bytes
            self.ranker = weight.bfloat16() if float32 and weight.shape[0] >= RANKED_VOCAB else None
            self._classifier_made_from = (weight, version)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def next_token_logits(self, h, last=None):
        """Logits of each row's last position: h's final one, or the index in last (batch,)."""
        h = h[:, -1, :] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        return h @ self.classifier if self.classifier is not None else self.output(h)

    def prefill(self, tokens, lengths=None):
        """Run the prompts through the model once, filling the cache; each row's last logits.
        lengths (batch,): rows padded on the right to one width. A row's padding lands in the
        cache after its prompt, where its decode steps overwrite it before any query sees it."""
        input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.next_token_logits(self.hidden_states(tokens, input_pos), None if lengths is None else lengths - 1)

    def decode_step(self, token, input_pos):
        """One new token per sample at position input_pos (a 1-element tensor, or (batch, 1):
        each sample at its own position); its logits."""
        return self.next_token_logits(self.hidden_states(token, input_pos))

    def decode_and_pick(self, token, input_pos, temperature, top_k, top_p, noise):
        """decode_step and the sampler in one function, so that both compile into one graph.
        Compiled, a float32 model with a large vocabulary reads its classifier in bfloat16 to rank
        the tokens, then computes exact float32 logits for the best RANKED_SPARE (+ top_k) of them,
        which is all that greedy and top-k sampling look at (about 0.3 ms less a token at
        stories15M's shape; docs/benchmarks.md)."""
        if getattr(self, "ranker", None) is None or not torch.compiler.is_compiling() or (
                temperature != 0 and top_k is None):
            return pick_token(self.decode_step(token, input_pos), temperature, top_k, top_p, noise)
        h = self.hidden_states(token, input_pos)[:, -1, :]
        count = min(RANKED_SPARE + (top_k or 0), self.args.vocab_size)
        ids = F.linear(h.bfloat16(), self.ranker).topk(count, dim=-1).indices
        logits = (self.output.weight[ids] @ h[:, :, None]).squeeze(-1)
        return pick_token(logits, temperature, top_k, top_p, noise, ids)

    def compiled_decode_step(self):
        """decode_and_pick compiled once for this model's weights: the cache always holds
        max_seq_len positions, so one graph serves every prompt length and position. On a CPU,
        COMPILE_OPTIONS fold the weights into the graph (compiled_call_settings), so it is for
        sampling only: weights changed in place afterwards are not seen. torch.compile is lazy,
        so this costs nothing until the first call."""
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(self.decode_and_pick, fullgraph=True)
        return self._compiled_step

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
        batch, width = prompt.shape
        if lengths is not None and not use_cache:
            raise ValueError("prompts of different lengths need the KV cache")
        longest = width if lengths is None else int(max(lengths))
        # the last new token is never fed back in, so prompt + new - 1 positions must fit
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - longest + 1)
        stop = torch.tensor(list(stop_ids) or [-1], device=prompt.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        tokens = prompt
        compile = compile or package is not None
        if lengths is None and compile:
            lengths = [width] * batch  # one graph for every compiled call: each row at its own position
        if lengths is None:
            input_pos = torch.tensor([width], device=prompt.device)  # every row at one position
        else:
            lengths = torch.as_tensor(lengths, device=prompt.device)
            input_pos = lengths[:, None].clone()
        draw = lambda: exponential_noise(batch, self.args.vocab_size, temperature, top_k, generator, prompt.device)
        if package is not None:
            no_noise = torch.zeros(batch, 1, device=prompt.device)  # greedy: the package's placeholder input
            step_fn = lambda token, position, *_, noise: package(token, position, no_noise if noise is None else noise)
        else:
            step_fn = self.compiled_decode_step() if compile else self.decode_and_pick
            self.setup_classifier()
        if use_cache and package is None:
            self.setup_cache(batch, self.args.max_seq_len if compile else longest + max_new_tokens - 1)
        try:
            for step in range(max_new_tokens):
                if not use_cache:
                    next_token = sample(self.next_token_logits(self.hidden_states(tokens)),
                                        temperature, top_k, top_p, generator)
                elif step == 0 and package is not None:
                    # every row's prompt, a position at a time; a row's pick after its last token is its first
                    picks = [step_fn(prompt[:, i:i + 1], torch.full_like(input_pos, i), noise=draw())
                             for i in range(width)]
                    next_token = torch.stack(picks, dim=1).gather(1, input_pos - 1).squeeze(1)
                elif step == 0:
                    next_token = sample(self.prefill(prompt, lengths), temperature, top_k, top_p, generator)
                else:
                    with compiled_call_settings(compile and package is None, step == 1, prompt.device):
                        next_token = step_fn(tokens, input_pos, temperature, top_k, top_p, noise=draw())
                    input_pos += 1  # in place: the next step sees the same tensor, one further
                next_token = torch.where(finished, tokens[:, -1], next_token)
                finished |= torch.isin(next_token, stop)
                # the cached path only ever feeds back the newest token
                tokens = next_token[:, None] if use_cache else torch.cat((tokens, next_token[:, None]), dim=1)
                yield next_token
                if finished.all():
                    break
        finally:
            if not compile:  # the compiled step keeps its cache for the next call
                self.clear_cache()

    # ---- training helpers ------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, lr_scale_of=None):
        """AdamW; matrices decay, vectors do not. lr_scale_of(name) gives a parameter a learning rate
        that many times the schedule's (train.train_step applies each group's lr_scale)."""
        # (lr scale, decays) -> params; the two unscaled groups always exist, so optimizer states
        # saved before lr_scale still load
        by_kind = {(1.0, True): [], (1.0, False): []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                by_kind.setdefault((lr_scale_of(name) if lr_scale_of else 1.0, p.dim() >= 2), []).append(p)
        groups = [{"params": params, "weight_decay": weight_decay if decays else 0.0, **({"lr_scale": s} if s != 1.0 else {})}
                  for (s, decays), params in by_kind.items()]
        # fused AdamW exists for CUDA and, since PyTorch 2.4, for CPUs (3x faster steps there)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len=None) -> float:
        """Training FLOPs per token: 6 per parameter plus attention over seq_len positions (the
        length actually trained on; default the model's max_seq_len) (PaLM appendix B)."""
        a = self.args
        n_params = sum(p.numel() for p in self.parameters())
        return 6 * n_params + 12 * a.n_layers * a.n_heads * a.head_dim * (seq_len or a.max_seq_len)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len=None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


def compiled_call_settings(compiled: bool, first: bool, device):
    """A generation's first compiled step runs with COMPILE_OPTIONS (on a CPU), since only it can
    compile: the rest of the generation keeps its shapes. Those later steps skip dynamo's guards,
    about 90 us a call at stories15M's size, which the first step has checked."""
    if not compiled:
        return contextlib.nullcontext()
    if first:
        return torch._inductor.config.patch(COMPILE_OPTIONS if device.type == "cpu" else {})
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


def _concat_linear(*linears):
    out = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears), bias=False)
    out.weight = nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
    return out
