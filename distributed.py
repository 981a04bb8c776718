"""This process's place in a torchrun job (DDP): joining and leaving it, its rank and device, the
model wrapped so that gradients are averaged between processes, and the sums the training loop
shares. A plain `python train.py` is rank 0 of 1, and none of this talks to another process."""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


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
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    procs = Processes(True, dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(cfg["device"])
    else:  # share the cores out: oversubscribed gloo processes crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", procs.world))))
    procs.device = training_device(cfg["device"])
    return procs


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
