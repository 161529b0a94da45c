"""How a block is called besides its hidden states (``BlockCall``: masks, position embeddings, ...), and how each
captured argument grows with the batch (``BatchAxis``), so that a block can be run on a batch of any size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BatchAxis", "BlockCall", "batch_axis"]


def _map_tensors(obj: Any, fn: Callable[[tuple, torch.Tensor], torch.Tensor], path: tuple = ()) -> Any:
    """``obj`` with every tensor ``t`` inside its tuples, lists and dicts replaced by ``fn(path, t)``; ``path`` is
    the keys and indices that lead to ``t``."""
    if isinstance(obj, torch.Tensor):
        return fn(path, obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn, (*path, i)) for i, o in enumerate(obj))
    if isinstance(obj, list):
        return [_map_tensors(o, fn, (*path, i)) for i, o in enumerate(obj)]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, (*path, k)) for k, v in obj.items()}
    return obj


def _item_at(obj: Any, path: tuple) -> Any:
    """What ``path`` (as ``_map_tensors`` gives it) leads to inside ``obj``; ``None`` where it leads nowhere."""
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, (tuple, list)) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


@dataclass(frozen=True)
class BatchAxis:
    """Where a block argument captured at batch 1 grows with the batch: along ``dim``, whose batch-1 entries
    (``size`` of them) stand for one sequence. For a batch of ``b`` they appear ``b`` times: one copy after
    another (``repeat``: a batch-major ``(B * H, ...)`` layout) or each entry ``b`` times in place
    (``interleave``: ``(H * B, ...)``). A leading batch dimension is ``BatchAxis(0, 1)``."""

    dim: int
    size: int
    interleave: bool = False


def _tiled(t: torch.Tensor, axis: BatchAxis, batch: int) -> torch.Tensor:
    """``t`` (batch 1) laid out for ``batch`` sequences along ``axis`` (a broadcast view when ``axis.size`` is 1)."""
    if batch == 1:
        return t
    if axis.size == 1:
        return t.expand(*t.shape[: axis.dim], batch, *t.shape[axis.dim + 1 :])
    if axis.interleave:
        return t.repeat_interleave(batch, dim=axis.dim)
    return t.repeat(*(batch if d == axis.dim else 1 for d in range(t.dim())))


def batch_axis(one: torch.Tensor, two: torch.Tensor) -> BatchAxis | None:
    """How an argument the block received at batch 1 (``one``) is laid out at batch 2 (``two``, the same
    sequence twice): the one dimension that doubled, and whether ``two`` repeats ``one`` along it or interleaves
    it; ``None`` when no single dimension doubled (the argument does not grow with the batch).

    Raises ``ValueError`` when a dimension doubled but ``two`` is neither arrangement of ``one``'s entries."""
    if one.dim() != two.dim():
        return None
    grown = [d for d in range(one.dim()) if one.shape[d] != two.shape[d]]
    if len(grown) != 1 or two.shape[grown[0]] != 2 * one.shape[grown[0]]:
        return None
    dim, size = grown[0], one.shape[grown[0]]
    for interleave in (False, True):
        axis = BatchAxis(dim, size, interleave)
        if _same_values(_tiled(one, axis, 2), two):
            return axis
    raise ValueError(
        f"an argument of shape {tuple(one.shape)} at batch 1 has shape {tuple(two.shape)} at batch 2, "
        "but is not one copy per sequence along the grown dimension"
    )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.bool or not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def _expand_batch(t: torch.Tensor, batch: int, axis: BatchAxis | None) -> torch.Tensor:
    """A tensor captured with the batch-1 calibration call, for ``batch`` sequences: along its ``axis`` where the
    capture found one; otherwise a leading dimension of 1 (a mask, positions the model broadcasts) is still
    broadcast to ``batch`` rows, as it always was."""
    if axis is not None:
        return _tiled(t, axis, batch)
    if t.dim() >= 2 and t.shape[0] == 1 and batch != 1:
        return t.expand(batch, *t.shape[1:])
    return t


@dataclass
class BlockCall:
    """Everything a block is called with besides its hidden states (captured from a batch-1 model forward), and
    for each tensor in them the axis along which it grows with the batch (``axes``, keyed by its ``args`` or
    ``kwargs`` path as ``_map_tensors`` gives it; see ``BatchAxis``)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    axes: dict[tuple, BatchAxis] = field(default_factory=dict)

    def find_axes(self, wider: BlockCall) -> None:
        """Set ``axes`` from ``wider``: the same block's call captured with the same sequence twice (batch 2)."""
        both = {"args": (self.args, wider.args), "kwargs": (self.kwargs, wider.kwargs)}
        axes: dict[tuple, BatchAxis] = {}

        def find(path: tuple, one: torch.Tensor) -> torch.Tensor:
            two = _item_at(both[path[0]][1], path[1:])
            if isinstance(two, torch.Tensor):
                try:
                    axis = batch_axis(one, two)
                except ValueError as exc:
                    raise RuntimeError(f"block argument {_path_name(path)}: {exc}") from None
                if axis is not None:
                    axes[path] = axis
            return one

        _map_tensors(self.args, find, ("args",))
        _map_tensors(self.kwargs, find, ("kwargs",))
        self.axes = axes

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0]

        def widen(path: tuple, t: torch.Tensor) -> torch.Tensor:
            return _expand_batch(t, batch, self.axes.get(path))

        args = _map_tensors(self.args, widen, ("args",))
        kwargs = _map_tensors(self.kwargs, widen, ("kwargs",))
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _path_name(path: tuple) -> str:
    """``("kwargs", "alibi")`` -> ``alibi``, ``("args", 1, 0)`` -> ``args[1][0]``."""
    head = path[1] if path[0] == "kwargs" and len(path) > 1 else path[0]
    rest = path[2:] if path[0] == "kwargs" and len(path) > 1 else path[1:]
    return str(head) + "".join(f"[{k!r}]" for k in rest)
