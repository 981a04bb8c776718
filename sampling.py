"""Choosing the next token from logits: greedy, temperature, top-k and top-p.

The draw is the exponential race: with one Exp(1) draw per candidate token, the token with the
largest probability / draw is a sample from the probabilities. The draws come from the caller's
generator, outside any compiled graph, and the rest is plain tensor arithmetic, so the sampler
compiles into the same graph as the decode step (model.Transformer.decode_and_pick) and gives the
same tokens eager and compiled.
"""
import torch


def candidate_count(vocab_size, top_k=None):
    return min(top_k, vocab_size) if top_k is not None else vocab_size


def exponential_noise(batch, vocab_size, temperature, top_k=None, generator=None, device="cpu"):
    """Exp(1) draws, one per row and candidate token; None for greedy, which needs none."""
    if temperature == 0:
        return None
    return torch.empty(batch, candidate_count(vocab_size, top_k), device=device).exponential_(generator=generator)


def pick_token(logits, temperature, top_k, top_p, noise, ids=None):
    """One token per row of logits (batch, vocab): greedy at temperature 0, else a draw from the
    tempered distribution cut to the top_k tokens and then to the smallest set holding top_p of
    the mass, made with noise from exponential_noise. ids (batch, n): the token ids of logits'
    columns, when they are some candidates, not the whole vocabulary."""
    if temperature == 0:
        choice = logits.argmax(dim=-1, keepdim=True)
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
        choice = (probs / noise.clamp(min=1e-20)).argmax(dim=-1, keepdim=True)
        choice = choice if cut is None else cut.gather(-1, choice)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """pick_token with its draws made here from generator: the eager sampler."""
    noise = exponential_noise(logits.shape[0], logits.shape[-1], temperature, top_k, generator, logits.device)
    return pick_token(logits, temperature, top_k, top_p, noise)
