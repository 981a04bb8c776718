"""What a training run records: metrics.jsonl (one JSON object a line: a row per logged step,
and a row with "eval": true per evaluation) and loss.png drawn from it."""
import json
import os

from cli import atomic_write


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
