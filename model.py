"""Llama 2 transformer with weights laid out exactly as llama2.c lays them out.

Training calls `Transformer.forward(tokens, targets)`. Sampling (decoding.py) gives each layer a
KV cache of fixed size with `setup_cache` and passes the positions of the tokens it feeds, so
that each decode step sees tensors of the same shapes (the position is a tensor, the cache is
written in place) and compiles once for every position.
"""
import math
from dataclasses import dataclass
from typing import Optional

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
    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim / 2), or (batch, seq, head_dim / 2)
    for rows at different positions. Each pair is one complex number turned by the position's
    angle: a single multiply forwards and backwards, about 5x cheaper on a CPU than rotating the
    real pairs element by element (docs/finetuning.md, "Cheaper steps, and the floor under them")."""
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
        self.all_k, self.all_v = self.k, self.v  # every row; k and v may become views of some

    def select_rows(self, rows: slice):
        """Read and write only these rows from now on, as views: nothing is copied. Continuous
        batching keeps its running sequences in the first rows and computes just those."""
        self.k, self.v = self.all_k[rows], self.all_v[rows]

    def select_positions(self, rows: slice, positions: int):
        """select_rows, and of those rows only the first `positions` positions: attention then
        reads as much of the cache as the rows can see, not max_seq_len (serve.py's batching)."""
        self.k, self.v = self.all_k[rows, :, :positions], self.all_v[rows, :, :positions]

    def copy_row(self, source: int, dest: int):
        self.all_k[dest].copy_(self.all_k[source])
        self.all_v[dest].copy_(self.all_v[source])

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
        self.wqkv: Optional[nn.Module] = None  # wq, wk, wv as one matmul: decoding.fuse_projections
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, input_pos=None, mask=None, decode_attention=False):
        """decode_attention: one new token per row, attending to the cache through
        one_query_attention() below; a compiled decode step asks for it."""
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
        if decode_attention and self.kv_cache is not None and seq == 1:
            out = one_query_attention(q, k, v, mask)
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.resid_dropout(self.wo(out))


def one_query_attention(q, k, v, mask):
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
        self.w13: Optional[nn.Module] = None  # w1 and w3 as one matmul: decoding.fuse_projections
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

    def forward(self, x, cos, sin, input_pos=None, mask=None, decode_attention=False):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, decode_attention)
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

    def forward(self, tokens, targets=None, input_pos=None, all_logits=False, target_weights=None):
        """With targets: the mean cross entropy over the positions whose target is not -1 (weighted
        by target_weights when given), and those positions' logits, (positions, vocab) in row-major
        order. Without: logits of the last position only (all of them if all_logits), loss None.
        input_pos (set by decoding's prefill/decode_step): the tokens' positions, where they go in the cache;
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

    def hidden_states(self, tokens, input_pos=None, decode_attention=False):
        """The final-norm outputs. Without input_pos the tokens are positions 0.. and attend
        causally among themselves; with it they are written into the KV cache at those positions
        and attend to every cached position up to their own (decode_attention: see Attention)."""
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
            h = layer(h, cos, sin, input_pos, mask, decode_attention)
        return self.norm(h)

    def setup_cache(self, batch_size: int, max_seq_len: int):
        param = self.tok_embeddings.weight
        shape = (batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim)
        caches = [layer.attention.kv_cache for layer in self.layers]
        if all(c is not None and c.k.shape == shape and c.k.dtype == param.dtype for c in caches):
            return  # reused as it is: what an earlier run left in it is masked until overwritten
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len,
                                               self.args.head_dim, param.dtype, param.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def select_cache_rows(self, rows: slice):
        """Every layer's cache reads and writes only these rows from now on (KVCache.select_rows)."""
        for layer in self.layers:
            layer.attention.kv_cache.select_rows(rows)
