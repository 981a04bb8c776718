"""Training over more than one machine, on 127.0.0.1 with gloo: two torchrun "nodes" (two agents
meeting at a c10d rendezvous) train exactly as one node with two processes; an elastic job
(torchrun --max_restarts) whose workers are SIGKILLed resumes by itself to the same weights; and
what loopback would hide is checked: one writer (global rank 0, while every node has a local rank
0), an out_dir every node must see, the same data on every node."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoints import load_checkpoint
from helpers import ROOT, free_port, read_metrics, tiny_config, write_pretrain_shards

# two processes in every job: 2 micro-batches each (no_sync used), dropout (per-rank RNG), an
# evaluation and last.pt every 4 iterations
SETTINGS = dict(max_iters=24, lr_decay_iters=24, eval_interval=4, batch_size=4, gradient_accumulation_steps=4,
                dropout=0.1, auto_resume=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_pretrain_shards(str(tmp_path_factory.mktemp("multinode") / "data"))


def flags(data, out, **overrides):
    return [f"--{k}={v}" for k, v in tiny_config(data, out, **dict(SETTINGS, **overrides)).items()]


def torchrun(launch, argv):
    """One torchrun agent (a node) in its own process group, so that a test can stop all of it; as
    docs/usage.md starts it, with a rendezvous store of its own for every restart."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, "train.py", *argv], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs, timeout=240):
    """Each agent's (exit code, output); agents still running at the deadline are killed."""
    deadline, results = time.time() + timeout, []
    try:
        for proc in procs:
            output = proc.communicate(timeout=max(1, deadline - time.time()))[0]
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def one_node(nproc, argv, *extra):
    return torchrun([f"--nproc_per_node={nproc}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                     *extra], argv)


def standalone(nproc, argv):
    """torchrun's one-machine form: it picks its own port."""
    return torchrun(["--standalone", f"--nproc_per_node={nproc}"], argv)


def two_nodes(argvs):
    """Two agents, one process each, at one c10d rendezvous: as two machines would start."""
    endpoint = f"--rdzv_endpoint=127.0.0.1:{free_port()}"
    return [torchrun(["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", endpoint, "--rdzv_id=job"], argv)
            for argv in argvs]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """One --standalone node x two processes, never stopped: the run the others must equal bit for bit."""
    out = tmp_path_factory.mktemp("one_node") / "out"
    [(code, output)] = finish([standalone(2, flags(data_dir, out))])
    assert code == 0, output[-3000:]
    return out


def assert_same_run(out, reference):
    """last.pt's weights, AdamW state and position bitwise equal; metrics.jsonl logs each step and
    each evaluation exactly once, with the reference's losses."""
    a, b = load_checkpoint(str(reference / "last.pt")), load_checkpoint(str(out / "last.pt"))
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    for state_a, state_b in zip(a.extra["optimizer"]["state"].values(), b.extra["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.extra["iter_num"] == b.extra["iter_num"] == SETTINGS["max_iters"]
    rows = read_metrics(out)
    steps, evals = [r["iter"] for r in rows if not r.get("eval")], [r["iter"] for r in rows if r.get("eval")]
    assert steps == list(range(1, SETTINGS["max_iters"] + 1)), steps
    assert evals == list(range(0, SETTINGS["max_iters"] + 1, SETTINGS["eval_interval"])), evals
    losses = lambda rows: [(r["iter"], r.get("eval", False), r["loss"]) for r in rows]
    assert losses(rows) == losses(read_metrics(reference))


@pytest.mark.slow
def test_two_nodes_of_one_process_train_bit_for_bit_as_one_node_of_two(data_dir, uninterrupted, tmp_path):
    """Each node has a local rank 0: a writer chosen by local rank would log every step twice."""
    out = tmp_path / "shared_out"
    results = finish(two_nodes([flags(data_dir, out)] * 2))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert sum("done:" in output for _, output in results) == 1  # one master, on one of the nodes
    assert_same_run(out, uninterrupted)


def worker_pids(agent):
    """{global rank: pid} of the agent's workers (its children, with torchrun's RANK)."""
    listed = subprocess.run(["ps", "--ppid", str(agent.pid), "-o", "pid="], capture_output=True, text=True).stdout
    workers = {}
    for pid in map(int, listed.split()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env:
            workers[int(env[b"RANK"])] = pid
    return workers


def logged_step(out):
    try:
        return max((r["iter"] for r in read_metrics(out) if not r.get("eval")), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def kill_at_step(agent, out, step, rank, timeout=120):
    """SIGKILL the agent's worker of `rank` once the job has logged `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert agent.poll() is None, "the job ended before the kill: " + agent.stdout.read()[-3000:]
        if logged_step(out) >= step:
            os.kill(worker_pids(agent)[rank], signal.SIGKILL)
            return
        time.sleep(0.002)
    raise AssertionError(f"step {step} not logged within {timeout} s")


@pytest.mark.slow
def test_elastic_restart_resumes_by_itself_to_the_uninterrupted_weights(data_dir, uninterrupted, tmp_path):
    """torchrun --max_restarts=2 runs the same command again after a worker dies (here rank 0, the
    writer, SIGKILLed at a random logged step; torchrun then stops rank 1); --auto_resume picks up
    last.pt, and the job ends as if never stopped."""
    out, step = tmp_path / "elastic", random.Random(32).randint(5, 14)
    print(f"\nSIGKILL rank 0 at logged step {step}")
    agent = one_node(2, flags(data_dir, out), "--max_restarts=2", "--monitor_interval=0.1")
    try:
        kill_at_step(agent, out, step, rank=0)
    finally:
        [(code, output)] = finish([agent])
    assert code == 0, output[-3000:]
    assert output.count("auto_resume: continuing the run") == 1, output[-3000:]
    print(next(line for line in output.splitlines() if "auto_resume: continuing" in line))
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in output  # set: no note
    assert_same_run(out, uninterrupted)
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("apart", ["out_dir", "data", "settings"])
def test_a_node_that_does_not_share_out_dir_data_or_settings_is_refused_in_one_line(data_dir, tmp_path, apart):
    """On loopback every node sees the same disk; here the second node's out_dir (or data) is
    another folder at the path, as on a machine whose disk is not shared (or it was started with
    another learning rate). Every process stops with the same line, and nothing is left behind."""
    other_data = tmp_path / "other_data"
    shutil.copytree(data_dir, other_data)
    with open(other_data / "tok64" / "data01.bin", "r+b") as f:  # the same size, other tokens
        f.write(b"\x05\x00" * 8)
    second = {"out_dir": flags(data_dir, tmp_path / "out_elsewhere"), "data": flags(other_data, tmp_path / "out"),
              "settings": flags(data_dir, tmp_path / "out", learning_rate=0.01)}[apart]
    results = finish(two_nodes([flags(data_dir, tmp_path / "out"), second]))
    expected = {"out_dir": "does not see the folder rank 0 writes", "data": "reads other files than rank 0",
                "settings": "runs other settings than rank 0: learning_rate="}[apart]
    for code, output in results:
        # the worker's one line, then torchrun's own report of a failed worker (its traceback is torchrun's)
        worker_lines = [line for line in output.splitlines() if line.startswith("error: ")]
        assert code != 0 and len(worker_lines) == 1 and expected in worker_lines[0], output[-3000:]
        assert not any(f'{name}.py", line' in output for name in ("train", "run_folder", "distributed")), output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_elsewhere").exists()


def test_max_restarts_without_a_store_per_restart_is_noted(monkeypatch, capsys):
    """torchrun's shared rendezvous store makes restarts fail by chance: rank 0 says how to avoid it."""
    import distributed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    distributed.warn_of_shared_store()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes torchrun pass
    distributed.warn_of_shared_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    distributed.warn_of_shared_store()
    assert capsys.readouterr().err == ""
