"""Process-group setup: one process, or torchrun (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def as_local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor such as a loss-parallel loss."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def runtime_from_env() -> Runtime:
    """Rank and device from torchrun's variables (a plain process is rank 0 of 1)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def init_process_group(runtime: Runtime, timeout_s: int) -> None:
    """Join torchrun's group with a collective timeout, so a dead rank fails the others."""
    if runtime.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    kwargs = {"device_id": runtime.device} if backend == "nccl" else {}
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
    )


def set_collective_timeout(timeout_s: int, groups: list[dist.ProcessGroup]) -> None:
    """Tighten the collective timeout once training runs (the first steps may compile or load
    slowly): a rank that dies then fails its peers within ``timeout_s`` instead of hanging."""
    if not dist.is_initialized():
        return
    # NOTE: a private setter; torch offers no public way to change a group's timeout.
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = datetime.timedelta(seconds=timeout_s)
    for group in [None, *groups]:
        _set_pg_timeout(timeout, group)


def destroy_process_group() -> None:
    """Leave the group together: a gloo rank tearing down while a peer is still sending aborts
    the process ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End a distributed process once its group is destroyed and its files closed, without the
    interpreter's teardown.

    NOTE: process groups outlive ``destroy_process_group`` while anything still references them
    (device meshes do), so gloo's worker threads run into interpreter finalisation. A thread
    that then releases its last work's tensors needs the GIL, is killed by the finalising
    interpreter, and aborts the process ("terminate called without an active exception", seen
    in gdb as pthread_exit from take_gil in ProcessGroupGloo::runLoop), turning a finished run
    into exit code -6. Under load it happened in about 1 run in 15.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
