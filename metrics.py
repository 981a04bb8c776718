"""What a training run records: metrics.jsonl (one JSON object a line: a row per logged step,
and a row with "eval": true per evaluation), loss.png drawn from it, and the MFU it logs: the
model's training FLOPs per token, and the peak FLOP/s they are measured against."""
import json
import os
import time

import torch

from cli import atomic_write, torch_dtype

# dense bf16 FLOP/s from the datasheets, by what torch.cuda.get_device_name() says: the first
# entry whose words all appear in the name wins, so the PCIe and NVL cards come before the SXM
# ones ("NVIDIA H100 80GB HBM3" is an SXM H100); a GPU not listed gets a measured matmul peak
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                 ("H200 NVL", 835e12), ("H200", 989e12), ("A100", 312e12)]


class MetricsLog:
    """metrics.jsonl, one JSON object a line, written by the master process only."""

    def __init__(self, out_dir, resume_from, enabled):
        """resume_from: the iteration a resumed run continues from (None: a new run). Rows a killed
        run logged after its last checkpoint, and a line torn by the kill, are dropped: the resumed
        run logs those iterations again."""
        self.file = None
        if not enabled:
            return
        path = os.path.join(out_dir, "metrics.jsonl")
        if resume_from is not None and os.path.isfile(path):
            kept = [row for row in read_rows(path) if row["iter"] <= resume_from]
            atomic_write(path, lambda tmp: write_rows(tmp, kept))
        self.file = open(path, "a" if resume_from is not None else "w")

    def write(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def read_rows(path):
    """The complete rows of a metrics.jsonl (a line torn by a killed run is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "iter" in row:
                rows.append(row)
    return rows


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def plot_losses(out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return
    rows = read_rows(os.path.join(out_dir, "metrics.jsonl"))
    steps = [r for r in rows if not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (per step)")
    for key in ("train_loss", "val_loss"):
        ax.plot([r["iter"] for r in evals], [r[key] for r in evals], "o-", label=f"{key} (fixed batches)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic_write(os.path.join(out_dir, "loss.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def flops_per_token(model, seq_len=None) -> float:
    """Training FLOPs per token: 6 per parameter plus attention over seq_len positions (the
    length actually trained on; default the model's max_seq_len) (PaLM appendix B)."""
    a = model.args
    n_params = sum(p.numel() for p in model.parameters())
    return 6 * n_params + 12 * a.n_layers * a.n_heads * a.head_dim * (seq_len or a.max_seq_len)


def estimate_mfu(model, tokens_per_s: float, peak_flops: float, seq_len=None) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak."""
    return flops_per_token(model, seq_len) * tokens_per_s / peak_flops


def peak_flops(cfg, device_type) -> (float, str):
    """FLOP/s that MFU is measured against, and where that figure came from."""
    if cfg["peak_flops"] > 0:
        return cfg["peak_flops"], "stated by peak_flops"
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        flops = gpu_peak_bf16(name)
        if flops:
            return flops, f"{name} datasheet bf16 dense peak"
    return measure_matmul_flops(cfg["device"], torch_dtype(cfg["dtype"])), f"measured {cfg['dtype']} matmul on {cfg['device']}"


def gpu_peak_bf16(name: str):
    """The datasheet peak for a GPU name, or None when the card is not in GPU_PEAK_BF16."""
    words = name.upper().replace("-", " ").split()
    for model, flops in GPU_PEAK_BF16:
        if all(word in words for word in model.upper().split()):
            return flops
    return None


def measure_matmul_flops(device, dtype, n=1024, seconds=0.3) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - t0)
