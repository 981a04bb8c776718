"""Low-rank adapters (LoRA) for the Transformer's linear layers, torchtune style.

A LoRALinear keeps the base weight as `weight` (the name nn.Linear gives it), so a base
checkpoint loads into an adapted model unchanged, and adds `lora_a` (rank x in) and `lora_b`
(out x rank):  y = x W^T + (dropout(x) A^T B^T) * scaling, with scaling = alpha / rank as in the
LoRA paper, or alpha / sqrt(rank) with rslora (rank-stabilized LoRA, Kalajdzievski 2023): then
the same alpha and learning rate train alike at every rank. lora_b starts at zero, so a
freshly adapted model computes exactly what its base did. checkpoints/ applies
the same formula (merge_lora_pair, below) when it loads an adapter file or the original
instruct storyteller's unmerged parametrizations, so the two can never disagree.

Layers up to about 256 wide train through their adapted weight W + B A * scaling in one matmul
(merges_in_forward): on a CPU that is cheaper than the two thin matmuls of the textbook form.
"""
import math
from typing import Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")
TARGETABLE = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "tok_embeddings")  # `output` is tied to the embedding


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def merge_lora_pair(weight, lora_a, lora_b, alpha, rslora=False):
    """W + (B @ A) * scaling, computed in float32 (the rank is lora_a's first dimension)."""
    delta = (lora_b.float() @ lora_a.float()) * lora_scaling(alpha, lora_a.shape[0], rslora)
    return (weight.float() + delta).to(weight.dtype)


def merge_adapters(state: Dict[str, torch.Tensor], adapters: Dict[str, torch.Tensor], alpha: float,
                   rslora: bool = False):
    """A base state dict with an adapter file's `X.lora_a` / `X.lora_b` pairs folded into `X.weight`."""
    merged = dict(state)
    for key in adapters:
        if key.endswith(".lora_a"):
            prefix = key.removesuffix(".lora_a")
            merged[f"{prefix}.weight"] = merge_lora_pair(state[f"{prefix}.weight"], adapters[key],
                                                         adapters[f"{prefix}.lora_b"], alpha, rslora)
            if prefix == "tok_embeddings" and "output.weight" in merged:  # the classifier is tied to it
                merged["output.weight"] = merged["tok_embeddings.weight"]
    return merged


def merge_parametrized_lora(state: Dict[str, torch.Tensor], alpha: float):
    """Fold the original instruct storyteller's torch parametrizations,
    `X.parametrizations.weight.{original,0.lora_a,0.lora_b}`, into `X.weight`. The rank comes
    from lora_a's shape: that project stored settings it did not use."""
    merged = {}
    for key, value in state.items():
        if key.endswith(".parametrizations.weight.original"):
            prefix = key.removesuffix(".parametrizations.weight.original")
            lora_a = state[f"{prefix}.parametrizations.weight.0.lora_a"]
            lora_b = state[f"{prefix}.parametrizations.weight.0.lora_b"]
            merged[f"{prefix}.weight"] = merge_lora_pair(value, lora_a, lora_b, alpha)
        elif ".parametrizations.weight.0." not in key:
            merged[key] = value
    return merged


def adapted_weight(module):
    """W + B A * scaling as one differentiable tensor (gradients reach A and B only)."""
    return torch.addmm(module.weight, module.lora_b, module.lora_a, alpha=module.scaling)


def merges_in_forward(in_dim: int, out_dim: int) -> bool:
    """Whether a layer this size trains faster through its adapted weight, W + B A * scaling, in one
    matmul (backward then forms a dense out x in gradient) than through the two thin matmuls of
    x A^T B^T. The thin ones read the whole activation for little arithmetic, so on a CPU they lose
    on small layers: one layer's forward + backward at 128x128 took 0.68x the time merged, at
    1024x128 0.73x, at 288x288 1.00x and at 768x768 1.22x (rank 8, one thread; docs/finetuning.md,
    "The adapted weight in one matmul"). Hence: merged up to about 256 wide, where in*out / (in+out) <= 128."""
    return in_dim * out_dim <= 128 * (in_dim + out_dim)


class LoRALinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank {rank}: expected an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout {dropout}: expected a number in [0, 1)")
        self.in_dim, self.out_dim, self.rank, self.alpha, self.rslora = in_dim, out_dim, rank, float(alpha), rslora
        self.scaling = lora_scaling(self.alpha, rank, rslora)
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
        self.lora_a = nn.Parameter(torch.empty(rank, in_dim))
        self.lora_b = nn.Parameter(torch.zeros(out_dim, rank))
        # A random, B zero: training starts from the base model's function with a useful gradient
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merge_in_forward = dropout == 0 and merges_in_forward(in_dim, out_dim)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        if linear.bias is not None:
            raise ValueError("LoRALinear adapts bias-free linear layers only (as in Llama 2)")
        lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout, rslora)
        lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        lora.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)  # shares storage
        return lora

    def forward(self, x):
        if self.merge_in_forward:
            return F.linear(x, adapted_weight(self))
        base = F.linear(x, self.weight)
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return base + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return merge_lora_pair(self.weight.detach(), self.lora_a.detach(), self.lora_b.detach(), self.alpha, self.rslora)

    def extra_repr(self):
        return f"in={self.in_dim}, out={self.out_dim}, rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}"


class LoRAEmbedding(nn.Module):
    """The token embedding with a low-rank update, E + B A * alpha / rank (B: vocab x rank, zero at
    the start; A: rank x dim), shared with the tied classifier (`output`), as the base ties them.
    Tokens a base never saw in pretraining (EOS, the instruction's own words when the tokenizer
    was trained on prompts) keep indistinguishable embeddings there; this is what lets them move."""

    def __init__(self, vocab: int, dim: int, rank: int, alpha: float, rslora: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.rank, self.alpha, self.rslora = vocab, dim, rank, float(alpha), rslora  # weight: vocab x dim
        self.scaling = lora_scaling(self.alpha, rank, rslora)
        self.weight = nn.Parameter(torch.empty(vocab, dim), requires_grad=False)
        self.lora_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_b = nn.Parameter(torch.zeros(vocab, rank))
        nn.init.normal_(self.lora_a, std=1.0 / math.sqrt(dim))
        self.merge_in_forward = merges_in_forward(dim, vocab)

    def forward(self, tokens):
        if self.merge_in_forward:
            return F.embedding(tokens, adapted_weight(self))
        return F.embedding(tokens, self.weight) + F.embedding(tokens, self.lora_b) @ self.lora_a * self.scaling

    def logits(self, h):
        if self.merge_in_forward:
            return F.linear(h, adapted_weight(self))
        return F.linear(h, self.weight) + F.linear(F.linear(h, self.lora_a), self.lora_b) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return merge_lora_pair(self.weight.detach(), self.lora_a.detach(), self.lora_b.detach(), self.alpha, self.rslora)


class _TiedOutput(nn.Module):
    """The classifier of a model whose embedding is a LoRAEmbedding: the same (adapted) matrix."""

    def __init__(self, embedding: LoRAEmbedding):
        super().__init__()
        self._embedding = [embedding]  # a list: not a submodule, so no second copy in state_dict

    @property
    def weight(self):
        return self._embedding[0].merged_weight()

    def forward(self, h):
        return self._embedding[0].logits(h)


def parse_targets(targets) -> List[str]:
    """'wq,wk' or ['wq', 'wk'] -> ['wq', 'wk'], checked against the adaptable layer names."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in TARGETABLE]
    if not names or unknown:
        raise ValueError(f"lora targets {','.join(names) or '(none)'}: expected a comma-separated "
                         f"subset of {','.join(TARGETABLE)}")
    return names


def apply_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, rank: int = 2,
               alpha: float = 1.0, dropout: float = 0.0, rslora: bool = False) -> nn.Module:
    """Swap every targeted nn.Linear for a LoRALinear, in place; freeze everything else."""
    targets = parse_targets(targets)
    for param in model.parameters():
        param.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear.from_linear(child, rank, alpha, dropout, rslora))
                replaced += 1
    if "tok_embeddings" in targets and isinstance(getattr(model, "tok_embeddings", None), nn.Embedding):
        old = model.tok_embeddings
        emb = LoRAEmbedding(old.num_embeddings, old.embedding_dim, rank, alpha, rslora).to(old.weight.device, old.weight.dtype)
        emb.weight = nn.Parameter(old.weight.detach(), requires_grad=False)
        model.tok_embeddings, model.output = emb, _TiedOutput(emb)
        replaced += 1
    if not replaced:
        raise ValueError(f"lora targets {','.join(targets)}: no such linear layer in the model")
    return model


def lora_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors only (`layers.0.attention.wq.lora_a`, ...), detached copies on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k.endswith((".lora_a", ".lora_b"))}


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict a plain Transformer would have with every adapter folded in; the model
    itself is left as it is (training can go on)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))}
    for name, module in lora_modules(model):
        state[f"{name}.weight"] = module.merged_weight()
        if isinstance(module, LoRAEmbedding):
            state["output.weight"] = state[f"{name}.weight"]  # tied
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding W + B A * alpha / rank, in place."""
    for name, module in lora_modules(model):
        if isinstance(module, LoRAEmbedding):
            emb = nn.Embedding(*module.weight.shape, device=module.weight.device, dtype=module.weight.dtype)
            emb.weight = nn.Parameter(module.merged_weight())
            model.tok_embeddings = emb
            model.output = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device=emb.weight.device)
            model.output.weight = emb.weight  # tied again
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        linear = nn.Linear(module.in_dim, module.out_dim, bias=False,
                           device=module.weight.device, dtype=module.weight.dtype)
        linear.weight = nn.Parameter(module.merged_weight())
        setattr(parent, name.rsplit(".", 1)[-1], linear)
    return model
