"""The GPU check, for a session lent a CUDA device (bench/gpu_check.sh runs it): every path the
CPU test suite cannot reach, each compared bitwise where it should be exact. Exit 1 on any mismatch.

    python bench/gpu_check.py            # CUDA: about 3-5 minutes on one H100
    python bench/gpu_check.py --cpu      # the same steps on the CPU (gloo), to test this script

1. torchrun --standalone on NCCL (two processes where the machine has two GPUs, one otherwise):
   float32, dropout, evaluation and save every 10 iterations, 40 iterations, started with
   --auto_resume; then the same run stopped at 20 and continued with --init_from=resume: last.pt
   must be bitwise identical (deterministic=True) and every logged loss equal; the first command
   run again continues its finished run (the object collectives of auto_resume on NCCL) and
   changes no checkpoint;
2. the same comparison in bfloat16 with torch.compile;
3. generate.py and evaluate.py on the GPU; export.py to llama2.c's .bin, whose greedy story on the
   GPU must equal the .pt's.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from checkpoints import load_checkpoint  # noqa: E402
from helpers import step_losses, tiny_config, write_pretrain_shards, write_tiny_tokenizer  # noqa: E402

FAILURES = []


def run(argv, what):
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", OMP_NUM_THREADS="4")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        print(f"FAIL {what}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        sys.exit(1)
    return proc.stdout


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def processes(device):
    return min(2, torch.cuda.device_count()) if device == "cuda" else 1


def torchrun(config, what):
    flags = [f"--{k}={v}" for k, v in config.items()]
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes(config['device'])}", "train.py", *flags], what)
    print("     " + next((line for line in out.splitlines() if "MFU against" in line), "").strip())
    return out


def same_checkpoints(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    weights = all(torch.equal(ca.state_dict[k], cb.state_dict[k]) for k in ca.state_dict)
    optimizer = torch.equal(torch.cat([s["exp_avg"].flatten() for s in ca.extra["optimizer"]["state"].values()]),
                            torch.cat([s["exp_avg"].flatten() for s in cb.extra["optimizer"]["state"].values()]))
    return weights and optimizer and ca.extra["iter_num"] == cb.extra["iter_num"]


def resume_matches(work, data_dir, device, name, **overrides):
    settings = dict(device=device, max_iters=40, lr_decay_iters=40, eval_interval=10, eval_iters=4, dropout=0.1,
                    batch_size=16, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, deterministic=True,
                    peak_flops=0.0 if device == "cuda" else 1e12, **overrides)  # cuda: the datasheet lookup
    one, two = os.path.join(work, name, "one"), os.path.join(work, name, "two")
    torchrun(tiny_config(data_dir, one, **dict(settings, auto_resume=True)), f"{name}: uninterrupted run")
    with open(os.path.join(one, "last.pt"), "rb") as f:
        finished = f.read()
    again = torchrun(tiny_config(data_dir, one, **dict(settings, auto_resume=True)), f"{name}: the same command again")
    with open(os.path.join(one, "last.pt"), "rb") as f:
        check("auto_resume: continuing the run" in again and f.read() == finished,
              f"{name}: --auto_resume on the finished run continues it, last.pt unchanged")
    torchrun(tiny_config(data_dir, two, **dict(settings, max_iters=20)), f"{name}: first half")
    torchrun(tiny_config(data_dir, two, **dict(settings, init_from="resume")), f"{name}: --init_from=resume")
    check(step_losses(one) == step_losses(two), f"{name}: resumed run logs the uninterrupted run's losses at every step")
    check(same_checkpoints(os.path.join(one, "last.pt"), os.path.join(two, "last.pt")),
          f"{name}: resumed last.pt is bitwise the uninterrupted one (weights, AdamW state, iter_num)")
    losses = step_losses(one)
    check(losses[40] < losses[1] - 0.5, f"{name}: loss falls ({losses[1]:.3f} -> {losses[40]:.3f})")
    return one


def main():
    device = "cpu" if "--cpu" in sys.argv else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    work = tempfile.mkdtemp(prefix="gpu_check_")
    data_dir = write_pretrain_shards(os.path.join(work, "data"), n_shards=3)
    tok = write_tiny_tokenizer(work, vocab_size=64)  # the size of the test data's vocabulary
    one = resume_matches(work, data_dir, device, "float32 eager", dtype="float32", compile=False)
    bf16 = "bfloat16" if device == "cuda" or torch.backends.mkldnn.is_available() else "float32"
    resume_matches(work, data_dir, device, f"{bf16} compiled", dtype=bf16, compile=True)

    ckpt = os.path.join(one, "ckpt.pt")
    story = run([sys.executable, "generate.py", f"--model_path={ckpt}", f"--tokenizer={tok}", f"--device={device}",
                 "--temperature=0", "--max_new_tokens=40", "--prompt=the"], "generate.py on the GPU")
    check(len(story.strip()) > 0, "generate.py samples on the device")
    report = os.path.join(work, "eval.json")
    run([sys.executable, "evaluate.py", f"--model_path={ckpt}", f"--tokenizer={tok}", f"--device={device}",
         f"--data={os.path.join(data_dir, 'tok64')}", "--max_tokens=20000", f"--report={report}"], "evaluate.py on the GPU")
    with open(report) as f:
        val = json.load(f)["val_loss"]
    best = load_checkpoint(ckpt).extra["best_val_loss"]
    check(abs(val - best) < 0.5, f"evaluate.py's loss on the device ({val:.3f}) is near training's ({best:.3f})")
    exported = os.path.join(work, "model.bin")
    run([sys.executable, "export.py", f"--checkpoint={ckpt}", "--format=llama2c-v1", f"--out={exported}",
         f"--tokenizer={tok}"], "export.py")
    again = run([sys.executable, "generate.py", f"--model_path={exported}", f"--tokenizer={tok}", f"--device={device}",
                 "--temperature=0", "--max_new_tokens=40", "--prompt=the"], "generate.py on the exported .bin")
    check(again.splitlines()[-8:] == story.splitlines()[-8:], "the exported .bin's greedy story equals the .pt's")
    print(f"{'FAILED: ' + '; '.join(FAILURES) if FAILURES else 'all GPU checks passed'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
