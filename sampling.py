"""Choosing the next token from logits: greedy, temperature, top-k and top-p.

The draw is the exponential race: with one Exp(1) draw per candidate token, the token with the
largest probability / draw is a sample from the probabilities. The draws come from the caller's
generator, outside any compiled graph, and the rest is plain tensor arithmetic, so the sampler
compiles into the same graph as the decode step (decoding.Decoder.decode_and_pick) and gives the
same tokens eager and compiled.
"""
import torch

# compiled, a row's argmax becomes one scalar loop in inductor's C++ (about 90 us over stories15M's
# 32,000 bfloat16 logits on 2 cores, 9% of a token); the maxima of blocks of a row vectorize
ARGMAX_BLOCK = 256


def candidate_count(vocab_size, top_k=None):
    return min(top_k, vocab_size) if top_k is not None else vocab_size


def exponential_noise(batch, vocab_size, temperature, top_k=None, generator=None, device="cpu"):
    """Exp(1) draws, one per row and candidate token; None for greedy, which needs none."""
    if temperature == 0:
        return None
    return torch.empty(batch, candidate_count(vocab_size, top_k), device=device).exponential_(generator=generator)


def first_argmax(x):
    """x.argmax(dim=-1, keepdim=True) for x (rows, n): the first index of each row's largest value.
    Compiled, a long row goes in blocks: the largest of the block maxima, then the first index
    within that block. The first block that holds the row's maximum holds its first index, so
    the pick is the same, ties and NaN included (about 12 us instead of 90, docs/benchmarks.md)."""
    rows, n = x.shape
    if not torch.compiler.is_compiling() or n <= ARGMAX_BLOCK or n % ARGMAX_BLOCK:
        return x.argmax(dim=-1, keepdim=True)
    blocks = x.reshape(rows, n // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block = blocks.amax(dim=-1).argmax(dim=-1)
    within = blocks[torch.arange(rows, device=x.device), block].argmax(dim=-1)
    return (block * ARGMAX_BLOCK + within)[:, None]


def pick_token(logits, temperature, top_k, top_p, noise, ids=None):
    """One token per row of logits (batch, vocab): greedy at temperature 0, else a draw from the
    tempered distribution cut to the top_k tokens and then to the smallest set holding top_p of
    the mass, made with noise from exponential_noise. ids (batch, n): the token ids of logits'
    columns, when they are some candidates, not the whole vocabulary."""
    if temperature == 0:
        choice = first_argmax(logits)
    else:
        logits = logits.float() / temperature
        cut = None
        if top_k is not None and top_k < logits.size(-1):
            # torch.topk returns its k values sorted, so top_p needs no further sort
            logits, cut = torch.topk(logits, top_k, dim=-1)
        elif top_p is not None and top_p < 1.0:
            logits, cut = torch.sort(logits, descending=True, dim=-1)
        probs = logits.softmax(dim=-1)
        if top_p is not None and top_p < 1.0:
            # drop a token once the mass BEFORE it already reaches top_p; the first always stays
            probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, 0.0)
        # a zero draw must not make 0 / 0 of a dropped token
        choice = first_argmax(probs / noise.clamp(min=1e-20))
        choice = choice if cut is None else cut.gather(-1, choice)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """pick_token with its draws made here from generator: the eager sampler."""
    noise = exponential_noise(logits.shape[0], logits.shape[-1], temperature, top_k, generator, logits.device)
    return pick_token(logits, temperature, top_k, top_p, noise)
