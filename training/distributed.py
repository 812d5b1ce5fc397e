"""Process-group setup for single-process and ``torchrun`` runs (DDP; gloo on CPU, nccl on CUDA).

A script calls ``setup()`` once: under ``torchrun --nproc_per_node=N`` the environment carries RANK,
WORLD_SIZE and LOCAL_RANK and a process group is created; without them everything still works with
world size 1 and no process group. No sampler is needed: every data stream is seeded per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size, the device it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` takes CUDA (one GPU per local rank) when present, else CPU; anything else is explicit."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device={name!r}; expected 'auto', 'cpu' or 'cuda'")
    return torch.device("cpu")


def setup(device: str = "auto", threads: int | None = None) -> Dist:
    """Initialise the process group when launched by torchrun; return this process's placement.

    ``threads`` caps intra-op CPU threads (per process); torchrun runs default to their share of the cores.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if threads is None and world > 1 and dev.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if threads:
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_scalars(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (for logging; identity when single-process)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: wall-clock decisions (checkpoint now?) must be taken together."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` on every rank (rank order); ``[obj]`` when single-process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (after an in-place change on one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


@torch.no_grad()
def checksum(module: torch.nn.Module) -> float:
    """Sum of every parameter (float64): equal on every rank while DDP keeps the replicas in step."""
    return float(sum(p.detach().double().sum().item() for p in module.parameters()))
