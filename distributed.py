"""This process's place in a torchrun job (DDP): joining and leaving it, its rank and device, the
model wrapped so that gradients are averaged between processes, and the sums the training loop
shares, and the checks that every process of a job, on any number of machines, starts alike. A
plain `python train.py` is rank 0 of 1, and none of this talks to another process."""
import glob
import os
import socket
import sys
import zlib
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import UsageError


@dataclass
class Processes:
    """This process's place in a torchrun job (a plain run is rank 0 of 1)."""
    ddp: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        """The one process that writes checkpoints, metrics and the console."""
        return self.rank == 0


def launched_rank() -> int:
    """The rank torchrun gave this process (0 without torchrun), readable before joining the job."""
    return int(os.environ.get("RANK", 0))


def start_processes(cfg) -> Processes:
    """Join the torchrun job, if there is one (RANK is set), and take this process's device."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Processes(device=training_device(cfg["device"]))
    warn_of_shared_store()
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    procs = Processes(True, dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(cfg["device"])
    else:  # share the cores out: oversubscribed gloo processes crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", procs.world))))
    procs.device = training_device(cfg["device"])
    return procs


def warn_of_shared_store():
    """torchrun (2.13 included) keeps one rendezvous store for every restart of a job and the
    workers' keys in it carry no restart number: a restarted worker can read the address a dead
    one left there and fail to connect (gloo: connectFullMesh ... Connection refused; NCCL alike,
    pytorch issue 167288). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on torchrun gives each restart a
    store of its own; without it, restarts are a matter of luck, so say so once, on rank 0."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and launched_rank() == 0:
        print(f"note: torchrun --max_restarts={restarts} without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a restarted "
              f"worker group may fail to connect (a stale address in torchrun's shared store); set it in "
              f"torchrun's environment (docs/usage.md, \"More than one machine\")", file=sys.stderr)


def end_processes(procs: Processes):
    if procs.ddp:
        dist.destroy_process_group()


def training_device(name) -> torch.device:
    """The device with its index, as the tensors made on it report it ("cuda" -> "cuda:0")."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def wrap_for_ddp(model, procs: Processes, device_type: str):
    """The model as the training steps call it: under torchrun, DDP averages its gradients."""
    if not procs.ddp:
        return model
    return DDP(model, device_ids=[procs.local_rank] if device_type == "cuda" else None)


def gradient_sync(train_model, procs: Processes, last_micro_batch: bool):
    """DDP averages gradients once per iteration, on its last micro-batch: the others skip it."""
    return train_model.no_sync() if procs.ddp and not last_micro_batch else nullcontext()


def all_reduce(tensor, procs: Processes, op=dist.ReduceOp.SUM):
    """dist.all_reduce for a tensor on this process's training device: NCCL takes nothing else,
    so the check runs under gloo too and CPU tests catch a misplaced tensor."""
    if tensor.device != procs.device:
        raise RuntimeError(f"all_reduce of a tensor on {tensor.device}; the training device is {procs.device}")
    dist.all_reduce(tensor, op=op)
    return tensor


def sum_over_processes(tensor, procs: Processes):
    """tensor summed over every process, in place (SUM, not AVG: gloo's AVG is missing from older
    PyTorch); a plain run's tensor as it is."""
    if procs.ddp:
        all_reduce(tensor, procs)
    return tensor


# ---- every process starts alike ------------------------------------------------------------------
# A refusal in one process alone would leave the others waiting in their next collective until
# torchrun kills them (and restarts them, under --max_restarts): these checks end every process
# with the same one line instead.

def whereabouts(procs: Processes) -> str:
    """This process as a message names it: on loopback every node's local rank 0 looks alike."""
    return f"rank {procs.rank} on {socket.gethostname()}"


def from_master(value, procs: Processes):
    """value as the master process has it, in every process (pickled over the process group)."""
    if not procs.ddp:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refuse_unless_all_agree(problem, procs: Processes):
    """problem: this process's one-line complaint, or None. If any process has one, every process
    raises the lowest rank's (UsageError), so that the whole job stops with it."""
    problems = [problem]
    if procs.ddp:
        problems = [None] * procs.world
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise UsageError(first)


def files_fingerprint(folder, patterns) -> list:
    """(name, size, CRC-32 of the first and last 64 KiB) of each file matching patterns in folder:
    enough to tell two copies of a data set apart without reading gigabytes at every start."""
    found = []
    for path in sorted({p for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))}):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(max(0, size - (1 << 16)))
            tail = f.read()
        found.append((os.path.basename(path), size, zlib.crc32(head), zlib.crc32(tail)))
    return found


def check_same_files(procs: Processes, folder, patterns, name):
    """Every process must read the same files (each process draws its rows from all of them):
    a node with another copy, an older one or none is refused, naming it."""
    if not procs.ddp:
        return
    mine = files_fingerprint(folder, patterns)
    masters = from_master(mine, procs)
    problem = None
    if mine != masters:
        differ = sorted({f[0] for f in set(mine) ^ set(masters)})
        problem = (f"{name}: {whereabouts(procs)} reads other files than rank 0 in {folder} "
                   f"({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} differ); every node needs the "
                   f"same data (a copy, or a shared filesystem)")
    refuse_unless_all_agree(problem, procs)
