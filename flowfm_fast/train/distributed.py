"""torch.distributed plumbing for :func:`train_flowfm` under ``torchrun --nproc_per_node N``.

One process per device. Every rank builds the same global batch from the same seeded permutation
and takes its contiguous slice, so the global batch is ``batch_size`` whatever N is. Random draws
(augmentation, noise, t) come from a generator reseeded every step from (seed, step, rank): they
need no state, so a checkpoint written by rank 0 resumes every rank exactly, and a 1-process run is
rank 0 of a world of one. BatchNorm statistics stay per process, as in plain DDP.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


# Gloo's worker thread drops its reference to a finished collective after the caller's wait has
# returned; when that reference is the last one, it frees the work's tensors, and a tensor with a
# Python object needs the GIL for that. Once the main thread no longer releases the GIL (the
# process is exiting), that worker aborts the process ("terminate called without an active
# exception"; seen with torch 2.13, where DDP keeps the group and its threads alive past
# destroy_process_group). Holding the latest works here keeps the last reference on our side.
_recent_works: deque = deque(maxlen=8)


def _wait(work) -> None:
    work.wait()
    _recent_works.append(work)


@dataclass(frozen=True)
class World:
    """This process's place in the process group; ``World()`` is a single process."""
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch ``idx`` (slices differ in size by <= 1)."""
        return torch.tensor_split(idx, self.size)[self.rank] if self.active else idx

    def barrier(self) -> None:
        if self.active:
            _wait(dist.barrier(async_op=True))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks (a new tensor; ``x`` itself on one process)."""
        if not self.active:
            return x
        x = x.clone()
        _wait(dist.all_reduce(x, async_op=True))
        return x

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's, in place."""
        if self.active:
            for t in tensors:
                _wait(dist.broadcast(t, 0, async_op=True))

    def any(self, flag: bool, device) -> bool:
        """True on every rank when it is true on one: keeps decisions such as an early stop collective."""
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item() > 0) if self.active else flag

    def check_same(self, value: int, what: str, device) -> None:
        """Raise on every rank unless ``value`` agrees on all ranks (no rank may silently diverge)."""
        if not self.active:
            return
        v = torch.tensor([float(value)], device=device)
        lo, hi = v.clone(), v.clone()
        _wait(dist.all_reduce(lo, op=dist.ReduceOp.MIN, async_op=True))
        _wait(dist.all_reduce(hi, op=dist.ReduceOp.MAX, async_op=True))
        if lo.item() != hi.item():
            raise RuntimeError(f"ranks disagree on {what}: from {int(lo.item())} to {int(hi.item())} "
                               f"(rank {self.rank} has {value})")


def current_world() -> World:
    """The initialised default process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_from_env(device: torch.device) -> tuple[torch.device, bool]:
    """Join torchrun's process group when WORLD_SIZE > 1: (device this rank uses, whether it joined).

    Backend: NCCL for CUDA devices, gloo otherwise. A CUDA device without an index becomes
    ``cuda:LOCAL_RANK``, one GPU per process. Nothing happens for a single process or when a group
    is already initialised (the caller's own).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return device, False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    backend = "gloo"
    if device.type == "cuda":
        local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif local_world > 1:
            raise ValueError(f"--device {device}: with {local_world} processes per machine each takes "
                             f"cuda:LOCAL_RANK; pass --device cuda (or auto) instead of a fixed index")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                             f"use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend)
    return device, True


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the generator for ``step`` on ``rank``: a hash, so neighbouring (seed, step, rank)
    give unrelated streams (Mersenne Twister / Philox seeded with consecutive ints can correlate)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])
