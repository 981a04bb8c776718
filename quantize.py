"""Weight-only int8 for sampling: every matmul weight, the classifier included, is stored as int8
with one bfloat16 scale per output channel, quantized at load time from whatever checkpoint was
read. The embedding table stays as it was: a lookup reads one row, so int8 would save nothing.

The matmul runs through torch.ops.aten._weight_int8pack_mm. On a CPU only its bfloat16 kernel is
vectorised (its float32 one is a scalar loop, about 4x slower than the float32 matmul it would
replace), so activations are rounded to bfloat16 for the product and the result is cast back.
That kernel reads 16 columns at a time with aligned loads and does not check the shape: with
in_features not a multiple of 16 it reads past the rows and returns wrong numbers or crashes
(measured on PyTorch 2.13: 64x40 gave a relative error of 37, 64x172 a segfault). Such layers
(stories260K's w2, hidden size 172) fall back to dequantizing in the matmul, correct at any shape.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_BLOCK = 16  # in_features must be a multiple of this for the int8 kernel


def kernel_available(device) -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, use_kernel: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        # the kernel takes scales in the activations' dtype; quantizing against the scale as
        # rounded to bfloat16 keeps that rounding out of the weights' error
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)
        q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.use_kernel = use_kernel

    def forward(self, x):
        if self.use_kernel:
            # contiguous and 2-D: the kernel's layout; its rows start 32-byte aligned since
            # in_features is a multiple of 16 bfloat16s
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, kernel={self.use_kernel}"


@torch.no_grad()
def quantize_int8(model, stream=None):
    """Replace every nn.Linear of model (the tied classifier too: it gets its own int8 copy)
    with Int8Linear, in place. Says once on stream which shapes fall back, and why."""
    kernel = kernel_available(model.tok_embeddings.weight.device)
    fallback = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                use = kernel and child.in_features % KERNEL_BLOCK == 0
                if not use:
                    fallback.setdefault(tuple(child.weight.shape), []).append(name)
                setattr(parent, name, Int8Linear(child.weight, use))
    if fallback:
        shapes = ", ".join(f"{names[0]} {o}x{i} ({len(names)}x)" for (o, i), names in fallback.items())
        why = (f"in_features not a multiple of {KERNEL_BLOCK}" if kernel else
               "this PyTorch or device has no _weight_int8pack_mm kernel")
        print(f"int8: {shapes}: {why}; these dequantize in the matmul instead",
              file=stream or sys.stderr)
    return model
