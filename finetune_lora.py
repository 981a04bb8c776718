"""LoRA fine-tuning of any checkpoint the loader reads, on the instruct data, with train.py's loop.

    python finetune_lora.py configs/demo_lora.py
    python finetune_lora.py --init_from=data/stories110M.pt --lora_rank=2 --lora_targets=wq,wk,wv,wo

The settings are train.py's plus lora_rank, lora_alpha, lora_rslora (scaling = alpha /
sqrt(rank), the default, so a rank can change without retuning alpha or the learning rate; False:
alpha / rank, as the LoRA paper and the original project), lora_dropout, lora_targets and
lora_b_lr_ratio (LoRA+: the zero-initialised B matrices train at that many times the learning rate
of the A matrices; 1, the default, trains both alike).
out_dir gets adapter.pt (the best adapter alone: a few KB to MB, with the
base checkpoint's path, relative to out_dir where they share a tree so that a moved out/ folder
still finds it, and its sha256, of every file for a folder base, so it is refused on any other
base), ckpt.pt = best.pt (the
best model with the adapter merged: a plain checkpoint for generate.py and the exporters) and
last.pt (merged too, plus the unmerged adapter and optimizer state that --init_from=resume needs).
--init_from=BASE --auto_resume is one command for the first start and every restart: it continues
out_dir's run when its settings are the same (docs/usage.md, "More than one machine").
"""
import os
import sys

import train
from checkpoints import (CheckpointError, base_reference, checkpoint_sha256, find_base_checkpoint, load_checkpoint,
                         save_checkpoint)
from cli import UsageError, run_main
from lora import apply_lora, lora_state_dict, merged_state_dict, parse_targets
from model import Transformer

DEFAULTS = {
    **train.DEFAULTS,
    "out_dir": "out/lora", "init_from": "", "dataset": "instruct",
    "max_seq_len": 1024,  # the instruct rows' width or the model's limit, whichever is shorter
    # the original project's schedule (docs/formats.md, "The original instruct storyteller") at a
    # CPU-sized batch; its adapters (--lora_rank=2 --lora_alpha=1.0 --lora_targets=wq,wk,wv,wo)
    # learned neither to use the requested words nor to stop in the study of docs/finetuning.md:
    # rank 8 on the attention matrices (the copy from the prompt), plus the embedding the base
    # never trained for EOS, by default
    "batch_size": 32, "gradient_accumulation_steps": 1, "learning_rate": 5e-4, "max_iters": 5000,
    "weight_decay": 0.0, "warmup_iters": 100, "eval_interval": 250, "eval_iters": 20,
    # rsLoRA's alpha / sqrt(rank): the same alpha and lr train alike at ranks 2-16 on the real stories260K
    # (docs/finetuning.md, "rsLoRA: alpha / sqrt(rank)"); the demo's CPU recipe raises alpha and lr for its short run
    "lora_rank": 8, "lora_alpha": 4.0, "lora_rslora": True, "lora_dropout": 0.0,
    "lora_targets": "wq,wk,wv,wo,tok_embeddings", "lora_b_lr_ratio": 1.0,
}


class LoRATraining(train.FullTraining):
    """Base weights frozen, adapters trained; checkpoints hold the merged model."""
    name = "finetune_lora"

    def build(self, cfg, resume):
        check_lora_settings(cfg)
        self.out_dir = cfg["out_dir"]
        if resume is not None:
            if "lora_state" not in resume.extra or "base_checkpoint" not in resume.extra:
                raise UsageError(f"init_from=resume: {resume.path} is not a LoRA run's last.pt")
            self.base_path = find_base_checkpoint(resume.path, resume.extra)
            expected_sha = resume.extra.get("base_sha256")
        elif cfg["init_from"] in ("", "scratch", "resume"):
            raise UsageError("init_from: finetune_lora needs --init_from=PATH (the base checkpoint), "
                                    "or --init_from=resume to continue a LoRA run")
        else:
            self.base_path, expected_sha = cfg["init_from"], None
        self.base_sha256 = checkpoint_sha256(self.base_path) if os.path.exists(self.base_path) else None
        if expected_sha and self.base_sha256 != expected_sha:
            raise CheckpointError(f"{self.base_path}: changed since this LoRA run started (sha256 differs)")
        base = load_checkpoint(self.base_path)
        base.model_args.dropout = cfg["dropout"]
        model = Transformer(base.model_args)
        model.load_state_dict(base.state_dict)
        apply_lora(model, parse_targets(cfg["lora_targets"]), cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"],
                   cfg["lora_rslora"])
        if resume is not None:
            # every setting that shapes or scales the adapters: a changed alpha would silently rescale them
            # (lora_b_lr_ratio too: the saved optimizer groups would keep the old one)
            keys = ("lora_rank", "lora_alpha", "lora_rslora", "lora_dropout", "lora_targets", "lora_b_lr_ratio")
            older_runs = {"lora_rslora": False, "lora_b_lr_ratio": 1.0}  # alpha / rank, one learning rate
            saved = {k: resume.config.get(k, older_runs.get(k)) for k in keys}
            now = {k: cfg[k] for k in keys}
            # targets compared as lists: "wq, wk" is what a run saved as "wq,wk" trained
            saved["lora_targets"] = parse_targets(saved["lora_targets"]) if saved["lora_targets"] else None
            now["lora_targets"] = parse_targets(now["lora_targets"])
            if saved != now:
                changed = ", ".join(f"{k} {saved[k]!r} (now {now[k]!r})" for k in keys if saved[k] != now[k])
                raise UsageError(f"init_from=resume: this run used {changed}; resume with the same settings")
            model.load_state_dict(resume.extra["lora_state"], strict=False)
        return model

    def checkpoint_weights(self, model):
        return {"model": merged_state_dict(model), "lora_state": lora_state_dict(model),
                **base_reference(self.base_path, self.out_dir), "base_sha256": self.base_sha256}

    def lr_scale(self, name, cfg):
        return cfg["lora_b_lr_ratio"] if name.endswith(".lora_b") else 1.0

    def after_save(self, model, cfg, path, is_best):
        if is_best:
            save_checkpoint(os.path.join(cfg["out_dir"], "adapter.pt"), {
                "kind": "lora_adapter", "lora": lora_state_dict(model), "lora_rank": cfg["lora_rank"],
                "lora_alpha": cfg["lora_alpha"], "lora_rslora": cfg["lora_rslora"], "lora_dropout": cfg["lora_dropout"],
                "lora_targets": parse_targets(cfg["lora_targets"]), **base_reference(self.base_path, cfg["out_dir"]),
                "base_sha256": self.base_sha256, "config": cfg})


def check_lora_settings(cfg):
    if cfg["lora_rank"] < 1:
        raise UsageError(f"lora_rank={cfg['lora_rank']}: expected an integer >= 1")
    if cfg["lora_alpha"] <= 0 or not 0 <= cfg["lora_dropout"] < 1:
        raise UsageError("lora_alpha must be > 0 and lora_dropout in [0, 1)")
    if not cfg["lora_b_lr_ratio"] > 0:
        raise UsageError(f"lora_b_lr_ratio={cfg['lora_b_lr_ratio']}: expected a number > 0")
    try:
        parse_targets(cfg["lora_targets"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv=None):
    return train.main(argv, DEFAULTS, LoRATraining())


if __name__ == "__main__":
    sys.exit(run_main(main))
