"""How a pretraining run is controlled: the signals that stop it, and the processes that share it
under ``torchrun`` (DistributedDataParallel)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves and
    leaves), instead of dying mid-write."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, _frame: Any) -> None:
            self.signal = signum

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller stops us another way
            pass
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@dataclass
class Distributed:
    """This process's place among those of a run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Read torchrun's environment; a plain ``python -m pclseg`` is one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def gather(t: torch.Tensor, ddp: Distributed) -> torch.Tensor:
    """All ranks' rows of ``t``, keeping the gradient of this rank's rows."""
    if ddp.world == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t), dim=0)


def any_rank(flag: bool, ddp: Distributed, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if ddp.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def finish(ddp: Distributed) -> None:
    """Wait for every rank, then leave the process group (a no-op for one process)."""
    if ddp.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
