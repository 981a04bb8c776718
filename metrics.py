"""What a training run records: metrics.jsonl (one JSON object a line: a row per logged step,
and a row with "eval": true per evaluation) and loss.png drawn from it."""
import json
import os

from cli import atomic_write


class MetricsLog:
    """metrics.jsonl, one JSON object a line, written by the master process only."""

    def __init__(self, out_dir, append, enabled):
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a" if append else "w") if enabled else None

    def write(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def plot_losses(out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
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
