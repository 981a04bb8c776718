"""Training that survives faults: Ctrl-C mid-step, a full disk while saving, two runs on one
out_dir, SIGKILL at random moments, and the DDP and MFU bookkeeping that only a GPU run would
otherwise show."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import distributed
import metrics
import train
from checkpoints import load_checkpoint
from helpers import ROOT, assert_refused, free_port, run_main, step_losses, tiny_config, write_pretrain_shards


@pytest.fixture
def pretrain_dir(tmp_path):
    return write_pretrain_shards(str(tmp_path / "data"))


def final_weights(out_dir):
    return load_checkpoint(os.path.join(out_dir, "last.pt")).state_dict


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def temp_files(out_dir):
    return [name for name in os.listdir(out_dir) if name.endswith(".tmp")]


# ---- Ctrl-C, full disk, a second run --------------------------------------------------------------

def run_cut_by_ctrl_c_then_resumed(pretrain_dir, tmp_path, monkeypatch, settings, after_step):
    """A reference run in tmp_path/ref; the same run in tmp_path/cut, sent SIGINT right after its
    optimizer's step `after_step` (weights moved, iteration not yet counted), then resumed."""
    train.train(tiny_config(pretrain_dir, tmp_path / "ref", **settings))
    real_step = torch.optim.AdamW.step
    steps = {"n": 0}

    def step_then_sigint(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == after_step:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_config(pretrain_dir, tmp_path / "cut", **settings))
    assert load_checkpoint(str(tmp_path / "cut" / "last.pt")).extra["iter_num"] == after_step
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train.train(tiny_config(pretrain_dir, tmp_path / "cut", **dict(settings, init_from="resume")))


def test_ctrl_c_inside_the_optimizer_step_does_not_repeat_a_batch(pretrain_dir, tmp_path, monkeypatch):
    """SIGINT arriving after the weights moved but before the iteration was counted: the run
    finishes that iteration, saves, and resume continues exactly (before the fix it saved the
    stepped weights under the old iteration number and replayed a batch)."""
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=100, dropout=0.1)
    run_cut_by_ctrl_c_then_resumed(pretrain_dir, tmp_path, monkeypatch, settings, after_step=5)
    assert step_losses(tmp_path / "ref") == step_losses(tmp_path / "cut")
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut"))


def saved_files(out_dir):
    """ckpt.pt, best.pt and last.pt as dicts, less the settings (out_dir, init_from differ)."""
    files = {}
    for name in ("ckpt.pt", "best.pt", "last.pt"):
        obj = torch.load(os.path.join(out_dir, name), weights_only=True)
        obj.pop("config")
        obj.pop("settings")
        files[name] = obj
    return files


def assert_same_contents(a, b, where=""):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_contents(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_contents(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_ctrl_c_on_an_eval_boundary_then_resume_writes_the_same_files(pretrain_dir, tmp_path, monkeypatch):
    """SIGINT during the last step saves last.pt at max_iters before that iteration's evaluation:
    the resumed run must still evaluate it (before the fix it did 0 steps and no evaluation, and
    ckpt.pt/best.pt stayed at the previous evaluation's weights)."""
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, learning_rate=1e-2)
    run_cut_by_ctrl_c_then_resumed(pretrain_dir, tmp_path, monkeypatch, settings, after_step=8)
    assert_same_contents(saved_files(tmp_path / "ref"), saved_files(tmp_path / "cut"))


SLOW_STEP_WORKER = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
import train
real_step, steps = torch.optim.AdamW.step, [0]

def slow_step(self, *args, **kwargs):  # widen the window between the weights moving and the count
    result = real_step(self, *args, **kwargs)
    steps[0] += 1
    time.sleep(0.2)
    return result

torch.optim.AdamW.step = slow_step
code = train.main(sys.argv[1:])
with open(os.path.join({out!r}, "steps.rank" + os.environ["RANK"]), "w") as f:
    f.write(str(steps[0]))
sys.exit(code)
"""


def test_one_ctrl_c_under_torchrun_stops_every_rank_after_the_same_finished_step(pretrain_dir, tmp_path):
    """One Ctrl-C under torchrun reaches each worker twice: the terminal's SIGINT and torchrun's
    forwarded copy. Both ranks must stop after the same step, counted: last.pt holds exactly
    iter_num steps' weights (before the fix the second SIGINT raised inside the step, saving
    moved weights under the previous iteration number)."""
    out = tmp_path / "ddp"
    out.mkdir()
    settings = dict(max_iters=10_000, eval_interval=10_000, decay_lr=False, batch_size=4,
                    gradient_accumulation_steps=2)
    worker = tmp_path / "worker.py"
    worker.write_text(SLOW_STEP_WORKER.format(root=ROOT, out=str(out)))
    argv = [f"--{k}={v}" for k, v in tiny_config(pretrain_dir, out, **settings).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker), *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(step_losses_or_none(out)) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.1)
        workers = child_pids(proc.pid)
        assert len(workers) == 2, workers
        # the terminal's Ctrl-C reaches torchrun's process group, and (with torch versions that keep
        # the workers in that group) the workers too; torchrun then forwards its own copy to each
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.05)  # two signals that arrive together are handled once; a terminal's rarely do
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    iter_num = load_checkpoint(str(out / "last.pt")).extra["iter_num"]
    assert [int((out / f"steps.rank{r}").read_text()) for r in (0, 1)] == [iter_num, iter_num]
    train.train(tiny_config(pretrain_dir, tmp_path / "ref", **dict(settings, max_iters=iter_num)))
    reference, stopped = final_weights(tmp_path / "ref"), final_weights(out)
    for key in reference:
        torch.testing.assert_close(stopped[key], reference[key], rtol=1e-4, atol=1e-5)


def child_pids(parent):
    """The processes whose parent is `parent` (torchrun's workers), from /proc."""
    children = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(name))
    return children


def step_losses_or_none(out_dir):
    try:
        return step_losses(out_dir)
    except (OSError, ValueError):
        return {}


def test_full_disk_while_saving_keeps_the_previous_checkpoint(pretrain_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    c = tiny_config(pretrain_dir, out, max_iters=10, eval_interval=5)
    real_save, saves = torch.save, {"n": 0}

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second last.pt: half written, then the disk is full
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    assert train.main([f"--{k}={v}" for k, v in c.items()]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and "Traceback" not in "\n".join(err)
    assert load_checkpoint(str(out / "last.pt")).extra["iter_num"] == 0  # the previous one, intact
    assert temp_files(out) == []


def test_a_second_run_on_the_same_out_dir_refuses_and_a_dead_one_does_not_block(pretrain_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [f"--{k}={v}" for k, v in tiny_config(pretrain_dir, out, max_iters=2).items()]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.'); import run_folder; "
        f"lock = run_folder.lock_out_dir({str(out)!r}); print('locked', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another training run" in err and str(holder.pid) in err, err
    finally:
        holder.kill()  # as a crash would: the lock goes with the process
        holder.wait()
    (out / ".last.pt.999999.tmp").write_bytes(b"left by a killed run")
    assert train.main(argv) == 0
    assert temp_files(out) == []


# ---- bookkeeping a GPU run would otherwise show first -----------------------------------------------

def test_every_tensor_crossing_dist_is_on_the_training_device():
    procs = distributed.Processes(ddp=True, device=torch.device("meta"))  # stands for "cuda:0" here
    with pytest.raises(RuntimeError, match="training device"):
        distributed.all_reduce(torch.zeros(2), procs)  # a CPU tensor, as NCCL would refuse it


def test_evaluation_and_step_totals_live_on_the_training_device(pretrain_dir, tmp_path, monkeypatch):
    """Under a fake one-process "DDP", every all_reduce must receive a tensor on procs.device."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: seen.append(tensor.device))
    monkeypatch.setattr(train, "start_processes", lambda cfg: distributed.Processes(ddp=True, device=torch.device("cpu")))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    # the start-up checks' object collectives, in a job of one
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src=0: None)
    monkeypatch.setattr(dist, "all_gather_object", lambda gathered, obj: gathered.__setitem__(0, obj))
    monkeypatch.setattr(distributed, "DDP", lambda model, device_ids=None: NoSyncWrapper(model))
    train.train(tiny_config(pretrain_dir, tmp_path / "out", max_iters=2, eval_interval=2))
    assert seen and all(device == torch.device("cpu") for device in seen)


class NoSyncWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def no_sync(self):
        from contextlib import nullcontext
        return nullcontext()


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peak_is_the_cards_own(name, peak):
    assert metrics.gpu_peak_bf16(name) == peak


def test_mfu_counts_the_length_actually_trained_on(tmp_path):
    """Instruct rows are cut to the batch's longest example: attention FLOPs follow that length."""
    from model import ModelArgs, Transformer
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=1024))
    assert metrics.estimate_mfu(model, 1000, 1e12, seq_len=100) < metrics.estimate_mfu(model, 1000, 1e12)
    n_params = sum(p.numel() for p in model.parameters())
    assert metrics.flops_per_token(model, 100) == 6 * n_params + 12 * 2 * 4 * 16 * 100


# ---- DDP resume: every rank's dropout repeats ----------------------------------------------------

def torchrun(argv, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_ddp_resume_with_dropout_repeats_the_run_exactly(pretrain_dir, tmp_path):
    """Before the fix every rank restored rank 0's generator state, so rank 1's dropout changed."""
    settings = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, dropout=0.2, batch_size=4,
                    gradient_accumulation_steps=2)
    whole = torchrun([f"--{k}={v}" for k, v in tiny_config(pretrain_dir, tmp_path / "whole", **settings).items()])
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = torchrun([f"--{k}={v}" for k, v in tiny_config(pretrain_dir, tmp_path / "cut", **dict(settings, max_iters=3)).items()])
    assert first.returncode == 0, first.stderr[-2000:]
    rest = torchrun([f"--{k}={v}" for k, v in tiny_config(pretrain_dir, tmp_path / "cut", **dict(settings, init_from="resume")).items()])
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "cut")
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"))


# ---- SIGKILL at random moments -------------------------------------------------------------------

KILL_POINTS = 20


def start_training(argv):
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def logged_iters(out):
    rows = metrics.read_rows(str(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else []
    return max((row["iter"] for row in rows), default=-1)


def wait_for_steps(out, steps, proc, timeout=60):
    """Until proc's run has logged `steps` iterations past where it started (it rewrites the
    log from its resume point), it ends, or timeout seconds pass."""
    start = logged_iters(out)
    deadline = time.time() + timeout
    while steps and proc.poll() is None and time.time() < deadline and logged_iters(out) < start + steps:
        time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_last_pt_and_resume_is_exact(pretrain_dir, tmp_path):
    """A run killed (SIGKILL: no cleanup at all) at KILL_POINTS moments, half of them while a
    checkpoint is being written, then resumed until done, ends with exactly the weights of a run
    never killed; every last.pt on the way loads."""
    settings = dict(max_iters=30, lr_decay_iters=30, eval_interval=2, dropout=0.1)
    argv = lambda out, **extra: [f"--{k}={v}" for k, v in tiny_config(pretrain_dir, out, **dict(settings, **extra)).items()]
    reference = start_training(argv(tmp_path / "ref"))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]

    out, rng = tmp_path / "killed", random.Random(0)
    kills = during_write = 0
    while kills < KILL_POINTS:
        resume = (out / "last.pt").exists()
        proc = start_training(argv(out, init_from="resume") if resume else argv(out))
        if kills % 2:  # wait for this process's checkpoint write to begin (cli.atomic_write's temp name)
            writing = lambda: out.exists() and any(f".{proc.pid}.tmp" in name for name in temp_files(out))
            deadline = time.time() + 60
            while proc.poll() is None and time.time() < deadline and not writing():
                time.sleep(0.001)
            during_write += writing()
        else:  # after 0 to 3 more logged steps: some kills land before any step, on any CPU's speed
            wait_for_steps(out, rng.randint(0, 3), proc)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:
            break  # finished before this kill: the run is complete
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if (out / "last.pt").exists():
            load_checkpoint(str(out / "last.pt"))  # never half a file
    final = start_training(argv(out, init_from="resume") if (out / "last.pt").exists() else argv(out))
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    assert kills >= KILL_POINTS // 2 and during_write >= 3, (kills, during_write)
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(out))
    assert temp_files(out) == []
    print(f"\nSIGKILL: {kills} kills, {during_write} during a checkpoint write; final weights identical")


# ---- --auto_resume: one command for the first start and every restart ----------------------------

def file_bytes(out_dir):
    return {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir)) if name != ".lock"}


@pytest.mark.slow
def test_auto_resume_after_sigkill_finishes_as_the_uninterrupted_run_and_refuses_other_settings(pretrain_dir, tmp_path,
                                                                                               capsys):
    """The same `python train.py --auto_resume ...` started, SIGKILLed at a logged step, started
    again: it continues from last.pt and ends with the uninterrupted run's weights and losses,
    each step logged once. Then the command with another setting is refused in one line, and
    the finished run's files stay byte for byte as they were."""
    settings = dict(max_iters=16, lr_decay_iters=16, eval_interval=4, dropout=0.1, auto_resume=True)
    train.train(tiny_config(pretrain_dir, tmp_path / "ref", **settings))
    out = tmp_path / "auto"
    argv = [f"--{k}={v}" for k, v in tiny_config(pretrain_dir, out, **settings).items()]
    proc, kill_at, deadline = start_training(argv), random.Random(32).randint(5, 10), time.time() + 120
    while max(step_losses_or_none(out), default=0) < kill_at:  # step 5 is logged after last.pt of iter 4
        assert proc.poll() is None and time.time() < deadline, "finished, or too slow, before the kill"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(step_losses_or_none(out))
    capsys.readouterr()
    again = run_main(train.main, capsys, *argv)  # the same command, in this process
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"auto_resume: continuing the run in {out} from iter " in again.stdout
    resumed_at = int(again.stdout.split(" from iter ")[1].split()[0])
    assert 4 <= resumed_at <= killed_at < settings["max_iters"]
    with capsys.disabled():
        print(f"\nauto_resume: SIGKILL after step {killed_at} was logged, continued from iteration {resumed_at}")
    assert step_losses(tmp_path / "ref") == step_losses(out)
    assert [r["iter"] for r in metrics.read_rows(str(out / "metrics.jsonl")) if not r.get("eval")] == list(range(1, 17))
    assert_same_contents(saved_files(tmp_path / "ref"), saved_files(out))

    finished = file_bytes(out)
    assert_refused(run_main(train.main, capsys, *argv, "--learning_rate=0.01"),
                   "holds a run of other settings (learning_rate=0.003 (now 0.01))")
    assert file_bytes(out) == finished
    # the unchanged command on the finished run: nothing to do, nothing rewritten but the plot
    assert train.main(argv) == 0
    assert {k: v for k, v in file_bytes(out).items() if k != "loss.png"} == \
        {k: v for k, v in finished.items() if k != "loss.png"}


def test_auto_resume_starts_fresh_where_there_is_no_run_and_never_replaces_one_it_cannot_continue(pretrain_dir,
                                                                                                tmp_path, capsys):
    out = tmp_path / "out"
    c = tiny_config(pretrain_dir, out, max_iters=2, eval_interval=2, auto_resume=True)
    assert train.main([f"--{k}={v}" for k, v in c.items()]) == 0  # no out_dir yet: a new run
    assert "auto_resume: continuing" not in capsys.readouterr().out
    os.remove(out / "last.pt")  # best.pt and ckpt.pt alone: a run that cannot be continued
    kept = file_bytes(out)
    assert_refused(run_main(train.main, capsys, *[f"--{k}={v}" for k, v in c.items()]),
                   "it holds a training run (best.pt, ckpt.pt)")
    assert_refused(run_main(train.main, capsys, *[f"--{k}={v}" for k, v in c.items()], "--force"),
                   "auto_resume=True and force=True")
    assert file_bytes(out) == kept
