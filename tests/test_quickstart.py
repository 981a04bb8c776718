"""The quickstart (`make demo`) shortened: the same Makefile recipe and scripts, a tiny corpus,
a tiny model and a few steps, so the main job cannot silently break."""
import json
import os
import shutil
import subprocess

import pytest

from helpers import ROOT, read_metrics, run_make


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

    # again with other training settings: the model is trained again, the data steps are skipped
    again = run_make("demo-pipeline", demo_dir, "DEMO_PROMPTS=6",
                     "DEMO_TRAIN=--max_iters=4 --eval_interval=2 --eval_iters=1 " + TINY_MODEL)
    ran = again.stdout
    assert "train.py" in ran and "--force --max_iters=4" in ran
    for data_step in ("make_demo", "train_vocab", "prepare_instruct_data"):
        assert data_step in done.stdout and data_step not in ran, data_step
    assert max(r["iter"] for r in read_metrics(demo_dir / "instruct")) == 4
    # and continued from there: DEMO_TRAIN="--init_from=resume ..." picks up at step 4
    resumed = run_make("demo-pipeline", demo_dir, "DEMO_PROMPTS=6",
                       "DEMO_TRAIN=--init_from=resume --max_iters=6 --eval_interval=2 --eval_iters=1 " + TINY_MODEL)
    assert "train_vocab" not in resumed.stdout and "--init_from=resume" in resumed.stdout
    assert max(r["iter"] for r in read_metrics(demo_dir / "instruct")) == 6


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


def planned_install(tmp_path, nvidia_gpu, *variables):
    """The commands `make venv` would run for a fresh .venv (make -n: nothing runs, nothing is
    downloaded), on a PATH that holds a stand-in nvidia-smi or none."""
    bin_dir = tmp_path / ("gpu-bin" if nvidia_gpu else "cpu-bin")
    bin_dir.mkdir(exist_ok=True)
    if nvidia_gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MAKE", "TORCH"))}
    done = subprocess.run([shutil.which("make"), "-n", "--no-print-directory", "venv", f"VENV={tmp_path}/venv",
                           *variables], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "PATH": str(bin_dir)})
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if "pip install" in line or line.startswith("echo")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_torch_build_fits_the_machine(tmp_path):
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    note, torch_install, requirements = planned_install(tmp_path, nvidia_gpu=False)
    assert "no NVIDIA GPU (nvidia-smi not found)" in note
    assert torch_install.endswith('"torch>=2.13" ' + cpu_index) and cpu_index not in requirements
    note, torch_install, _ = planned_install(tmp_path, nvidia_gpu=True)
    assert "NVIDIA GPU" in note and "not found" not in note
    assert torch_install.endswith('"torch>=2.13"')
    # a pinned TORCH (as CI passes it) comes from pip's configured indexes, GPU or not
    for gpu in (False, True):
        assert planned_install(tmp_path, gpu, "TORCH=torch==2.13.0")[1].endswith('"torch==2.13.0"')
    # TORCH_INDEX says where to look, or (empty) leaves it to pip
    assert planned_install(tmp_path, False, "TORCH=torch==2.5.1", "TORCH_INDEX=https://example.test/cpu")[1] \
        .endswith('"torch==2.5.1" --index-url https://example.test/cpu')
    assert planned_install(tmp_path, False, "TORCH_INDEX=")[1].endswith('"torch>=2.13"')
