"""The quickstart (`make demo`) shortened: the same Makefile recipe and scripts, a tiny corpus,
a tiny model and a few steps, so the main job cannot silently break."""
import json
import os
import shutil

import pytest

from helpers import run_make


TINY_MODEL = "--batch_size=4 --dim=32 --n_layers=1 --n_heads=2 --n_kv_heads=2 --multiple_of=8 --log_interval=2"




@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_shortened_demo_pipeline(tmp_path):
    demo_dir = tmp_path / "demo"
    done = run_make("demo-pipeline", demo_dir, "DEMO_PROMPTS=6",
                    "DEMO_TRAIN=--max_iters=6 --eval_interval=3 --eval_iters=1 " + TINY_MODEL)

    assert (demo_dir / "data" / "TinyStories_all_data" / "data01.json").is_file()
    assert (demo_dir / "instruct" / "ckpt.pt").is_file()
    assert (demo_dir / "instruct" / "metrics.jsonl").is_file()
    report = json.loads((demo_dir / "eval.json").read_text())
    for key in ("word_rate", "all_words_rate", "dialogue_rate", "n_prompts", "val_loss"):
        assert key in report
    assert report["n_prompts"] == 6 and report["training_word_triples"] > 0
    # the run ends with the story for the README prompt, the score table, then how to serve it
    assert "== a story for:" in done.stdout
    last_lines = done.stdout.rstrip().splitlines()[-2:]
    assert last_lines[0].startswith("evaluated ")
    assert last_lines[1].endswith(f"serve.py --model_path={demo_dir}/instruct/ckpt.pt")
    assert "| stories with all three |" in done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_shortened_demo_finetune_recipe(tmp_path):
    """`make demo-finetune` shortened: pretrain a base a few steps, LoRA-tune it a few steps,
    score both side by side on a few held-out prompts."""
    demo_dir = tmp_path / "demo"
    done = run_make("demo-finetune-pipeline", demo_dir, "DEMO_PROMPTS=4",
                    "DEMO_FT_TRAIN=--max_iters=4 --eval_interval=2 --eval_iters=1 " + TINY_MODEL)

    assert (demo_dir / "data" / "tok1024" / "data01.bin").is_file()
    base = demo_dir / "base" / "ckpt.pt"
    adapter = demo_dir / "lora" / "adapter.pt"
    assert base.is_file() and (demo_dir / "lora" / "ckpt.pt").is_file() and adapter.is_file()
    assert adapter.stat().st_size < base.stat().st_size
    reports = json.loads((demo_dir / "eval_finetune.json").read_text())["compare"]
    assert [os.path.basename(os.path.dirname(r["model_path"])) for r in reports] == ["base", "lora"]
    for report in reports:
        assert report["n_prompts"] == 4 and "all_words_rate" in report and "hit_max_new_tokens_rate" in report
    header = next(line for line in done.stdout.splitlines() if line.startswith("| metric |"))
    assert "base/ckpt.pt" in header and "lora/ckpt.pt" in header
