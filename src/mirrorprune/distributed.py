"""Multi-process training under `torchrun`: joining the group, who writes, device placement, and
the few collective operations the training loop needs (all of them no-ops in one process)."""

from __future__ import annotations

import atexit
import os

import torch


def init_distributed() -> tuple[int, int]:
    """Join the process group that `torchrun` describes (env WORLD_SIZE > 1; NCCL on GPUs, gloo
    on CPU) and return (rank, world size); (0, 1) when not launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # left at exit, as PyTorch asks: without it the interpreter's teardown can abort while
        # the backend's threads still run (seen once in CI: SIGABRT, "terminate called
        # without an active exception", after the run had finished)
        atexit.register(_leave)
    return rank_world()


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank_world()[0] == 0


def default_device() -> torch.device:
    """The GPU of this process (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together)."""
    ok = torch.isfinite(loss.detach()).float()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def sum_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
