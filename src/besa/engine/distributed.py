"""Data parallel pruning over ``torchrun``: the calibration windows are split across processes, everything the
methods learn from them is reduced, rank 0 writes.

``torchrun --nproc-per-node K -m besa prune ...`` (or ``besa prune`` started by any launcher that sets
``WORLD_SIZE``/``RANK``) initialises a process group (gloo on CPU, NCCL on CUDA). Each rank keeps whole forward
batches of the windows (batch ``b`` goes to rank ``b mod K``), so every batch is computed exactly as one process
computes it; the statistics (input norms, Hessians) are sums of per-batch float32 products kept in float64, which
makes their sum, and so Wanda's and SparseGPT's masks and weights, the same bit for bit however the batches are
split. Gradients (BESA's logits, the refit's weights) are averaged, held-out losses too, so every rank keeps the same
parameters. Rank 0 writes the checkpoints' block files, the run state and the output; every rank keeps its own
activations in the run folder.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from besa.errors import BesaError

__all__ = ["World", "world", "start", "shard_windows", "sum_", "mean_grads", "mean_value", "barrier", "stop"]


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes shared files (rank 0)."""
        return self.rank == 0


_WORLD = World()
_OWNED = False  # whether ``start`` created the process group (and ``stop`` may destroy it)


def world() -> World:
    """The current run's world (one process unless ``start`` joined a process group)."""
    return _WORLD


def launched_size() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``; 1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def start(device: torch.device) -> World:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA); one process: nothing to do."""
    global _WORLD
    size = launched_size()
    if size <= 1:
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist

    global _OWNED
    if not dist.is_initialized():  # a process group the caller made is used as it is, and left to them
        _OWNED = True
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("BESA_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend, timeout=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    return _WORLD


def stop() -> None:
    """Leave the process group at the end of a run, if ``start`` made it."""
    global _WORLD, _OWNED
    if _WORLD.active and _OWNED:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD, _OWNED = World(), False


def shard_windows(ids: torch.Tensor, batch: int, w: World | None = None) -> torch.Tensor:
    """This rank's calibration windows: whole forward batches, batch ``b`` to rank ``b mod size``.

    Every rank must get the same number of batches of the same size (the collectives of each step pair up), so the
    windows must split into ``size`` x whole batches."""
    w = w or world()
    if not w.active:
        return ids
    n = ids.shape[0]
    if n % (batch * w.size):
        raise BesaError(
            f"--nsamples {n} does not split into {w.size} processes x whole forward batches of {batch}: "
            f"use a multiple of {batch * w.size} (or set --forward-batch)"
        )
    batches = ids.split(batch)
    return torch.cat([b for i, b in enumerate(batches) if i % w.size == w.rank])


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (float64 sums of float64 stay exact for float32 products)."""
    if world().active:
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            moved = tensor.cuda()
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_grads(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks (each rank's loss is a mean over its own windows)."""
    if not world().active:
        return

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    sum_(flat)
    flat /= world().size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_value(value: float) -> float:
    """The mean of a Python number over the ranks (a held-out loss every rank must decide on alike)."""
    if not world().active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    sum_(t)
    return float(t[0]) / world().size


def barrier() -> None:
    if world().active:
        import torch.distributed as dist

        dist.barrier()
