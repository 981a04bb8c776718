"""Llama 2 transformer with weights laid out exactly as llama2.c lays them out.

Training uses `Transformer.forward(tokens, targets)`. Inference uses a per-layer KV cache:
`prefill` runs the whole prompt once, `decode_step` then adds one token at a time, and
`generate` strings the two together with temperature / top-k / top-p sampling.
"""
import inspect
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


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
    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim / 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k, v):
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, start_pos: Optional[int] = None):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if start_pos is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        # a lone new token may see every cached position; a chunk after a cached prefix
        # needs a causal mask shifted by the prefix length
        mask, causal = None, seq > 1
        if start_pos and seq > 1:
            mask = torch.ones(seq, k.shape[2], dtype=torch.bool, device=x.device).tril(start_pos)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
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
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, start_pos: Optional[int] = None, all_logits=False):
        """With targets: logits for every position and the mean cross entropy (ignoring -1).
        Without: logits of the last position only (all of them if all_logits), loss None."""
        h = self.hidden_states(tokens, start_pos)
        if targets is not None:
            logits = self.output(h)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        return self.output(h if all_logits else h[:, [-1], :]), None

    def hidden_states(self, tokens, start_pos: Optional[int] = None):
        """The final-norm outputs; start_pos (set by prefill/decode_step) is where the tokens go
        in the KV cache."""
        seq = tokens.shape[1]
        offset = start_pos or 0
        if offset + seq > self.args.max_seq_len:
            raise ValueError(f"{offset + seq} positions exceed max_seq_len {self.args.max_seq_len}")
        cos, sin = self.freqs_cos[offset:offset + seq], self.freqs_sin[offset:offset + seq]
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        return self.norm(h)

    # ---- inference -------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int):
        param = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len,
                                               self.args.head_dim, param.dtype, param.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def next_token_logits(self, h, classifier):
        """Logits of the last position. classifier is output.weight laid out (dim, vocab): a
        one-row product against that layout runs about 3x faster on a CPU than nn.Linear's."""
        return h[:, -1, :] @ classifier

    def prefill(self, tokens, classifier):
        """Run the whole prompt through the model once, filling the cache; last logits."""
        return self.next_token_logits(self.hidden_states(tokens, start_pos=0), classifier)

    def decode_step(self, token, pos: int, classifier):
        """One new token per sample at position pos; returns its logits."""
        return self.next_token_logits(self.hidden_states(token, start_pos=pos), classifier)

    @torch.inference_mode()
    def generate(self, prompt, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                 stop_ids=(), use_cache=True, generator=None) -> Iterator[torch.Tensor]:
        """Yield a (batch,) tensor of new token ids per step. A sample that produced a stop id
        keeps yielding that id; the loop ends once every sample has stopped."""
        batch, prompt_len = prompt.shape
        # the last new token is never fed back in, so prompt + new - 1 positions must fit
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - prompt_len + 1)
        stop = torch.tensor(list(stop_ids) or [-1], device=prompt.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        tokens = prompt
        classifier = self.output.weight.t().contiguous()  # a copy, for this call only
        if use_cache:
            self.setup_cache(batch, prompt_len + max_new_tokens - 1)
        try:
            for step in range(max_new_tokens):
                if not use_cache:
                    logits = self.next_token_logits(self.hidden_states(tokens), classifier)
                elif step == 0:
                    logits = self.prefill(prompt, classifier)
                else:
                    logits = self.decode_step(tokens, prompt_len + step - 1, classifier)
                nxt = sample(logits, temperature, top_k, top_p, generator)
                nxt = torch.where(finished, tokens[:, -1], nxt)
                finished |= torch.isin(nxt, stop)
                # the cached path only ever feeds back the newest token
                tokens = nxt[:, None] if use_cache else torch.cat((tokens, nxt[:, None]), dim=1)
                yield nxt
                if finished.all():
                    break
        finally:
            if use_cache:
                self.clear_cache()

    # ---- training helpers ------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused AdamW exists for CUDA and, since PyTorch 2.4, for CPUs (3x faster steps there)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len=None) -> float:
        """Training FLOPs per token: 6 per parameter plus attention (PaLM appendix B), whose share
        grows with the sequence length trained on (max_seq_len unless a shorter one is given)."""
        a = self.args
        n_params = sum(p.numel() for p in self.parameters())
        return 6 * n_params + 12 * a.n_layers * a.n_heads * a.head_dim * (seq_len or a.max_seq_len)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len=None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row: greedy at temperature 0, else from the tempered distribution
    cut to the top_k tokens and then to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass BEFORE it already reaches top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
