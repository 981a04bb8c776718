"""train.py's main, SIGKILLed at the Nth event of the run: the moments a crash, an OOM kill or a
pulled plug could hit, including the middle of a checkpoint write. Used by test_fault_tolerance.

    python tests/kill_harness.py N --key=value ...   # N = 0: never killed; prints the events as JSON

The events, in the order a run meets them: each iteration's start, the end of its backward
pass, the end of its optimizer step; each checkpoint write (killed half way: half the bytes are
in the temporary file) and each rename into place (killed just before or just after it).
"""
import io
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402

events = []


def instrument(kill_at):
    def reached(name):
        events.append(name)
        return len(events) == kill_at

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_save, real_replace, real_step, real_update = torch.save, os.replace, train.train_step, torch.amp.GradScaler.update

    def save(obj, f, *args, **kwargs):
        if reached("checkpoint write") and isinstance(f, str):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            die()
        real_save(obj, f, *args, **kwargs)

    def replace(src, dst):
        name = os.path.basename(dst)
        if reached(f"before rename to {name}"):
            die()
        real_replace(src, dst)
        if reached(f"after rename to {name}"):
            die()

    def train_step(*args, **kwargs):
        if reached("iteration start"):
            die()
        result = real_step(*args, **kwargs)
        if reached("after backward"):
            die()
        return result

    def update(self, *args, **kwargs):
        real_update(self, *args, **kwargs)
        if reached("after optimizer step"):
            die()

    torch.save, os.replace, train.train_step, torch.amp.GradScaler.update = save, replace, train_step, update


if __name__ == "__main__":
    instrument(int(sys.argv[1]))
    code = train.main(sys.argv[2:])
    print(json.dumps(events))
    sys.exit(code)
