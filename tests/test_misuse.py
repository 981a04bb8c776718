"""A careless user's inputs: each script run as a user runs it, with the mistakes a
new user makes. None may print a traceback, exit 0 having done the wrong thing, or replace a
file or folder the user did not ask to lose. Tiny settings throughout: the file runs in well
under two minutes on two cores."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import demo_corpus
import evaluate
import prepare_instruct_data
import tinystories
import train
from helpers import (ROOT, VOCAB, assert_refused, message_lines, run_main, run_script, write_instruct_shards,
                     write_pretrain_shards)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_TRAIN = ["--vocab_source=custom", f"--vocab_size={VOCAB}", "--dim=32", "--n_layers=1", "--n_heads=2",
              "--n_kv_heads=2", "--multiple_of=8", "--max_seq_len=32", "--batch_size=4",
              "--gradient_accumulation_steps=1", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
              "--device=cpu", "--dtype=float32", "--compile=False", "--peak_flops=1e12"]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_only_folder(tmp_path):
    """A folder this process cannot write in. chmod does not stop root, so root gets /sys."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder
    (folder / "probe").unlink()
    return "/sys"


class Lines:
    """A process's stream read on a thread, so the test can wait for text without blocking."""

    def __init__(self, stream):
        self.text, self.stream = "", stream
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for chunk in iter(lambda: self.stream.read(1), ""):
            self.text += chunk

    def wait_for(self, pattern, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.text):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s: {self.text[-2000:]}")


def interrupt(argv, ready_on, ready_pattern):
    """Start a script in its own process group, wait until it shows ready_pattern on its stdout or
    stderr, then Ctrl-C it the way a terminal does (SIGINT to the whole group)."""
    # a suite started in the background of a non-interactive shell (`make test &`) runs with
    # SIGINT ignored, and a child inherits that: Python then installs no KeyboardInterrupt
    # handler. A terminal's Ctrl-C finds the default action, so the child starts with it
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    streams = {"stdout": Lines(proc.stdout), "stderr": Lines(proc.stderr)}
    try:
        streams[ready_on].wait_for(ready_pattern)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    for s in streams.values():
        s.thread.join(timeout=10)
    return proc.returncode, streams["stdout"].text, streams["stderr"].text


@pytest.fixture
def model(shared_data):
    """The real stories260K checkpoint and its tokenizer, as flags."""
    return [f"--model_path={shared_data}/stories260K.pt", f"--tokenizer={shared_data}/tok512.model", "--device=cpu"]


# ---- 1, 13: a finished run in out_dir ----------------------------------------------------------

def test_rerun_keeps_a_finished_run_resume_names_ignored_shape_force_keeps_user_files(tmp_path, capsys):
    data, out = write_pretrain_shards(str(tmp_path / "data")), tmp_path / "out"
    first = run_script("train.py", *TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {name: sha(out / name) for name in ("last.pt", "best.pt", "ckpt.pt")}

    assert_refused(run_main(train.main, capsys, *[*TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--seed=7"]),
                       f"out_dir={out}", "--init_from=resume", "--force")
    assert {name: sha(out / name) for name in before} == before  # (1) nothing replaced

    resumed = run_script("train.py", *TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume",
                  "--max_iters=3", "--dim=64", "--n_layers=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    notes = [line for line in message_lines(resumed.stderr) if line.startswith("note:")]
    assert len(notes) == 1 and "dim=64" in notes[0] and "n_layers=3" in notes[0] and "ignored" in notes[0]  # (13)

    (out / "notes.txt").write_text("my notes")
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_bytes(b"png")
    forced = run_script("train.py", *TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--force", "--seed=7")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "my notes" and (out / "plots" / "mine.png").read_bytes() == b"png"
    assert sha(out / "last.pt") != before["last.pt"]
    assert len(open(out / "metrics.jsonl").readlines()) == 4  # the new run's rows only: 2 steps, 2 evaluations
    # --force never replaces the checkpoint the new run starts from
    digest = sha(out / "ckpt.pt")
    assert_refused(run_main(train.main, capsys, *[*TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--force",
                                    f"--init_from={out / 'ckpt.pt'}"]), "init_from=", "copy it elsewhere")
    assert sha(out / "ckpt.pt") == digest


def test_out_dir_that_is_a_file_or_read_only_is_bad_input(tmp_path, capsys):
    data = write_pretrain_shards(str(tmp_path / "data"))
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert_refused(run_script("train.py", *TINY_TRAIN, f"--data_dir={data}", f"--out_dir={a_file}"), str(a_file), "folder")
    assert a_file.read_text() == "keep me"
    locked = read_only_folder(tmp_path)
    assert_refused(run_main(train.main, capsys, *[*TINY_TRAIN, f"--data_dir={data}", f"--out_dir={locked}/run"]),
                       "cannot write")


# ---- 2: --help ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script, flag", [("train.py", "--help"), ("finetune_lora.py", "-h")])
def test_help_as_a_command(script, flag):
    result = run_script(script, flag)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(("Train a Llama 2", "LoRA fine-tuning")) and "--max_iters=" in result.stdout


def test_help_both_spellings_in_process(capsys):
    import finetune_lora
    assert train.main(["-h"]) == 0 and "--out_dir='out'" in capsys.readouterr().out
    assert finetune_lora.main(["--help"]) == 0 and "--lora_rank=8" in capsys.readouterr().out


# ---- 3, 4, 14: generate.py -----------------------------------------------------------------------

def test_generate_into_a_closed_pipe_ends_quietly(model):
    proc = subprocess.Popen([sys.executable, "generate.py", *model, "--prompt=Once upon a time", "--temperature=0",
                             "--max_new_tokens=400", "--no_kv_cache"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    first = proc.stdout.read(20)  # what `| head -c 20` does: read 20 bytes, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert first.startswith(b"Once upon a time")
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 141


def test_ctrl_c_in_generate_is_one_line_and_130(model):
    code, out, err = interrupt(["generate.py", *model, "--prompt=Once upon a time", "--temperature=0",
                                "--max_new_tokens=500", "--no_kv_cache"], "stdout", r"Once upon a time\S* \S")
    assert code == 130 and "Traceback" not in err, err
    assert message_lines(err) == ["interrupted"] and out.startswith("Once upon a time")


def test_ctrl_c_in_train_is_one_line_and_130_and_keeps_last_pt(tmp_path):
    data, out = write_pretrain_shards(str(tmp_path / "data")), tmp_path / "out"
    code, stdout, err = interrupt(["train.py", *TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}",
                                   "--max_iters=100000", "--eval_interval=1000"], "stdout", r"iter 0: train loss")
    assert code == 130 and "Traceback" not in err, err
    assert message_lines(err) == ["interrupted"], err
    assert "saved" in stdout and (out / "last.pt").is_file()


def test_generate_names_a_capped_max_new_tokens(model, shared_data):
    from tokenizer import Tokenizer
    words = "the cat sat on the mat and"
    prompt = " ".join([words] * (480 // len(Tokenizer(f"{shared_data}/tok512.model").encode(words))))
    result = run_script("generate.py", *model, f"--prompt={prompt}", "--max_new_tokens=100", "--temperature=0")
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in message_lines(result.stderr) if line.startswith("note:")]
    assert len(notes) == 1 and "--max_new_tokens=100" in notes[0] and "capped at" in notes[0], result.stderr


# ---- 4, 9, 11, 12, 8, 15, 17: evaluate.py ------------------------------------------------------

def test_ctrl_c_in_evaluate_writes_the_partial_report(model, tmp_path):
    report = tmp_path / "eval.json"
    code, out, err = interrupt(["evaluate.py", *model, "--num_prompts=60", "--max_new_tokens=300",
                                f"--report={report}"], "stderr", r"sampling stories:\s+\d+%\|[^|]*\|\s*[1-9]\d*/60")
    assert code == 130 and "Traceback" not in err, err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and str(report) in lines[0], err
    partial = json.loads(report.read_text())
    assert partial["interrupted"] is True and partial["n_prompts_asked"] == 60
    assert 1 <= partial["n_prompts"] == len(partial["samples"]) < 60 and "all_words_rate" in partial


def test_report_path_checked_before_the_work(model, shared_data, tmp_path, capsys):
    loss = [f"--data={shared_data}/tinystories_valid_head.txt", "--max_tokens=512"]
    folder = tmp_path / "reports"
    folder.mkdir()
    assert_refused(run_main(evaluate.main, capsys, *[*model, *loss, f"--report={folder}"]), f"--report={folder}", "folder")
    locked = read_only_folder(tmp_path)
    result = run_script("evaluate.py", *model, *loss, f"--report={locked}/eval.json")
    assert_refused(result, "cannot write")
    assert "validation loss" not in result.stdout  # (9) refused before evaluating, not after


def test_report_never_replaces_a_users_file_unless_forced(model, shared_data, tmp_path, capsys):
    loss = [f"--data={shared_data}/tinystories_valid_head.txt", "--max_tokens=512"]
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(open(f"{shared_data}/stories260K.pt", "rb").read())
    digest = sha(checkpoint)
    model_flags = [f"--model_path={checkpoint}", *model[1:]]
    # the checkpoint being evaluated: not even with --force
    assert_refused(run_main(evaluate.main, capsys, *[*model_flags, *loss, f"--report={checkpoint}", "--force"]), "input")
    assert sha(checkpoint) == digest
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    assert_refused(run_main(evaluate.main, capsys, *[*model_flags, *loss, f"--report={mine}"]), "--force")
    assert mine.read_text() == '{"mine": 1}'
    assert evaluate.main([*model_flags, *loss, f"--report={mine}", "--force"]) == 0
    assert json.loads(mine.read_text())["model_path"] == str(checkpoint)
    # our own earlier report is ours to replace: a rerun needs no --force
    assert evaluate.main([*model_flags, *loss, f"--report={mine}", "--max_tokens=1024"]) == 0
    assert json.loads(mine.read_text())["loss_tokens"] > 512


def test_empty_prompt_list_is_refused(model, tmp_path, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n\n")
    assert evaluate.main([*model, f"--prompts_file={empty}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "no prompts" in err[0]


def test_shards_of_another_vocabulary_are_refused(model, tmp_path):
    folder = tmp_path / "data" / "tok400"  # another tokenizer's shards: every id < 400 fits vocab 512
    folder.mkdir(parents=True)
    np.random.default_rng(0).integers(0, 400, 5000).astype(np.uint16).tofile(folder / "data00.bin")
    assert_refused(run_script("evaluate.py", *model, f"--data={folder}"), "400", "512")


@pytest.mark.parametrize("flag", ["--batch_size=0", "--max_tokens=0"])
def test_zero_batch_size_or_max_tokens_is_refused(model, shared_data, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*model, f"--data={shared_data}/tinystories_valid_head.txt", flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag.split("=")[0] in err[0] and ">= 1" in err[0]


# ---- 5: the device -----------------------------------------------------------------------------

def test_train_checks_the_device_first(tmp_path, capsys):
    data, out = write_pretrain_shards(str(tmp_path / "data")), tmp_path / "out"
    assert_refused(run_script("train.py", *TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--device=mps"), "--device=mps")
    assert_refused(run_main(train.main, capsys, *[*TINY_TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--device=gpu"]),
                       "--device=gpu")
    assert not out.exists()  # no out_dir left holding only .lock


# ---- 6, 7: instruct data that cannot teach anything ---------------------------------------------

def test_zero_examples_are_refused_and_train_then_says_why(shared_data, tmp_path, capsys):
    data = tmp_path / "data"
    demo_corpus.make_demo(str(data), num_shards=2, stories_per_shard=20, seed=3)
    os.link(f"{shared_data}/tok512.model", data / "tok512.model")
    assert prepare_instruct_data.main(["--vocab_size=512", f"--data_dir={data}", "--max_seq_len=20",
                                       "--workers=1"]) == 2
    err = [line for line in message_lines(capsys.readouterr().err) if "shard/s" not in line]
    assert len(err) == 1 and "40 records -> 0 examples" in err[0] and "--max_seq_len" in err[0], err
    assert not (data / "instruct512" / "meta.json").exists()
    result = run_script("train.py", *TINY_TRAIN, "--dataset=instruct", "--vocab_size=512", f"--data_dir={data}",
                 f"--out_dir={tmp_path / 'out'}")
    assert_refused(result, "instruct512", "prepare_instruct_data")


def test_window_shorter_than_every_prompt_is_a_setting_error(tmp_path):
    data = write_instruct_shards(str(tmp_path / "data"))  # prompts of 3 to 7 tokens
    result = run_script("train.py", *TINY_TRAIN, "--dataset=instruct", "--max_seq_len=2", f"--data_dir={data}",
                 f"--out_dir={tmp_path / 'out'}")
    assert_refused(result, "max_seq_len=2", "shorter than every prompt")
    assert not (tmp_path / "out").exists()  # a run refused before it wrote anything leaves no out_dir behind


# ---- 10: export --force into a folder ------------------------------------------------------------

def test_export_force_replaces_only_its_own_files(shared_data, tmp_path, capsys):
    import export
    checkpoint = [f"--checkpoint={shared_data}/stories260K.pt", f"--tokenizer={shared_data}/tok512.model"]
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.txt").write_text("mine")
    (folder / "sub" / "data.csv").write_text("1,2")
    (folder / "config.json").write_text("{}")
    assert_refused(run_main(export.main, capsys, *[*checkpoint, "--format=hf", f"--out={folder}"]), "--force")
    assert (folder / "config.json").read_text() == "{}"
    done = run_script("export.py", *checkpoint, "--format=hf", f"--out={folder}", "--force")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "README.txt").read_text() == "mine" and (folder / "sub" / "data.csv").read_text() == "1,2"
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 512
    assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temporary folder left


def test_export_out_never_replaces_the_checkpoint_or_a_users_file(shared_data, tmp_path, capsys):
    import export
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(open(f"{shared_data}/stories260K.pt", "rb").read())
    digest = sha(checkpoint)
    tokenizer = f"--tokenizer={shared_data}/tok512.model"
    assert export.main([f"--checkpoint={checkpoint}", "--format=pt", f"--out={checkpoint}", "--force", tokenizer]) == 2
    assert "input" in capsys.readouterr().err and sha(checkpoint) == digest
    mine = tmp_path / "model.gguf"
    mine.write_text("mine")
    assert export.main([f"--checkpoint={checkpoint}", "--format=gguf", f"--out={mine}", tokenizer]) == 2
    assert "--force" in capsys.readouterr().err and mine.read_text() == "mine"


# ---- 16 and the smaller ones: the data stages ----------------------------------------------------

def test_pretokenize_without_a_story_writes_nothing(shared_data, tmp_path, capsys):
    shards = tmp_path / "TinyStories_all_data"
    shards.mkdir()
    (shards / "data00.json").write_text(json.dumps([{"summary": "no story"}, {"story": "  "}]))
    os.link(f"{shared_data}/tok512.model", tmp_path / "tok512.model")
    assert tinystories.main(["pretokenize", "--vocab_size=512", f"--data_dir={tmp_path}", "--workers=1"]) == 2
    err = [line for line in message_lines(capsys.readouterr().err) if "shard/s" not in line]
    assert len(err) == 1 and "data00.json" in err[0] and "no record with a story" in err[0], err
    assert not (tmp_path / "tok512" / "data00.bin").exists()


def test_empty_data_dir_and_missing_tokenizer_are_bad_input(tmp_path, capsys):
    assert tinystories.main(["pretokenize", "--vocab_size=512", f"--data_dir={tmp_path}"]) == 2
    assert "make_demo" in capsys.readouterr().err
    assert prepare_instruct_data.main(["--vocab_size=512", f"--data_dir={tmp_path}"]) == 2
    demo_corpus.make_demo(str(tmp_path), num_shards=1, stories_per_shard=3, seed=1)
    capsys.readouterr()
    assert tinystories.main(["pretokenize", "--vocab_size=512", f"--data_dir={tmp_path}"]) == 2
    assert prepare_instruct_data.main(["--vocab_size=512", f"--data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("train_vocab --vocab_size=512" in line for line in err), err


def test_train_vocab_error_is_our_line_alone(tmp_path):
    demo_corpus.make_demo(str(tmp_path), num_shards=1, stories_per_shard=20, seed=1)
    result = subprocess.run([sys.executable, "tinystories.py", "train_vocab", "--vocab_size=300",
                             f"--data_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in message_lines(result.stderr) if "shard/s" not in line]
    assert len(lines) == 2 and lines[0].startswith("train_vocab: training"), result.stderr
    assert lines[1].startswith("error: train_vocab --vocab_size=300 failed")
