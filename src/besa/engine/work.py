"""What a method's per-block step receives: one block on the compute device, its calibration inputs (CPU batches)
and the arguments it is called with besides its hidden states."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine.activations import ActivationStore, MemoryBudget

__all__ = ["BatchAxis", "BlockCall", "BlockWork", "batch_axis", "group_by_input"]


class _StopBlock(Exception):
    """Raised from an input hook to end a calibration forward once the layers it feeds have all been reached."""


def _layout(x: torch.Tensor) -> tuple:
    """Where a tensor's data starts and how it is laid out: equal for the very same input, seen through hooks."""
    return x.data_ptr(), x.shape, x.stride()


def group_by_input(
    calls: Sequence[tuple[str, torch.Tensor]], names: Sequence[str], families: dict[str, str] | None = None
) -> list[list[str]]:
    """Group layers by the input they were called with, in calling order (``calls``: ``(name, input)`` as seen
    during one forward). Consecutive layers fed the very same tensor (q/k/v, gate/up) form one group; a layer
    called again keeps its first place; layers of ``names`` never called come last, one group each.

    ``families`` (name -> key) groups layers whatever their inputs: the experts of one projection, each on its own
    routed tokens, form one group where the first of them is called, all of them in ``names`` order, so the
    groups do not depend on which experts one window happens to reach."""
    families = families or {}
    members: dict[str, list[str]] = {}
    for name in names:
        if name in families:
            members.setdefault(families[name], []).append(name)
    groups: list[list[str]] = []
    placed: set[str] = set()
    last: torch.Tensor | None = None
    for name, x in calls:
        if name in placed:
            continue
        if name in families:
            groups.append(members[families[name]])
            placed.update(groups[-1])
            last = None
            continue
        if last is not None and _layout(x) == _layout(last):
            groups[-1].append(name)
        else:
            groups.append([name])
        placed.add(name)
        last = x
    groups.extend([name] for name in names if name not in placed)
    return groups


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


@dataclass
class BlockWork:
    """One block on the compute device, with its calibration inputs (CPU batches) and call arguments.

    This is what a method's ``prune_block`` receives. ``forward_all`` runs the block over every stored batch.
    """

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Module]
    inputs: Sequence[torch.Tensor]
    call: BlockCall
    device: torch.device
    num_blocks: int
    progress: bool = True
    dense_outputs: Sequence[torch.Tensor] | None = None
    """Outputs of this (dense) block on the dense model's own stream; set when the method asks for that stream."""
    dense_inputs: Sequence[torch.Tensor] | None = None
    """This block's inputs on the dense model's own stream (the batches ``dense_outputs`` were made from)."""
    budget: MemoryBudget | None = None
    """The run's activation memory budget: stores made by ``forward_all`` draw on it."""

    @property
    def num_samples(self) -> int:
        """Calibration sequences over all input batches."""
        if isinstance(self.inputs, ActivationStore):
            return self.inputs.num_samples
        return sum(int(x.shape[0]) for x in self.inputs)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the block on one batch of hidden states (moved to the device); returns the output on the device."""
        return self.call(self.module, hidden.to(self.device, non_blocking=True))

    def batches(self, desc: str, inputs: Sequence[torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        """Iterate over the stored input batches with a progress bar labelled ``(i/L) desc``."""
        label = f"({self.index + 1}/{self.num_blocks}) {desc}"
        batches = self.inputs if inputs is None else inputs
        yield from tqdm(batches, desc=label, leave=False, disable=None if self.progress else True)

    @torch.no_grad()
    def forward_all(
        self,
        desc: str = "Calibrating",
        keep_outputs: bool = False,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> ActivationStore | None:
        """Run the block over all calibration batches (or ``inputs``); return the outputs (CPU) if ``keep_outputs``.

        The outputs are an ``ActivationStore`` on the run's memory budget (spilled to disk beyond it).
        """
        outputs = ActivationStore(self.budget) if keep_outputs else None
        for hidden in self.batches(desc, inputs):
            out = self.forward(hidden)
            if outputs is not None:
                outputs.append(out)
        return outputs

    @contextmanager
    def input_hooks(self, fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """While active, ``fn(layer_name, input)`` is called with the input of every pruned linear on each forward."""

        def make(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple) -> None:
                fn(name, args[0].detach())

            return hook

        handles = [layer.register_forward_pre_hook(make(name)) for name, layer in self.linears.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def layer_inputs(
        self, module: nn.Module, hidden: torch.Tensor, names: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Run ``module`` (this block, or a copy of it with the same layout) on one batch and return the inputs of
        its linears ``names`` (relative names, as in ``linears``); the forward ends once all of them are seen."""
        modules = dict(module.named_modules())
        seen: dict[str, torch.Tensor] = {}

        def make(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple) -> None:
                seen[name] = args[0].detach()
                if len(seen) == len(names):
                    raise _StopBlock

            return hook

        handles = [modules[name].register_forward_pre_hook(make(name)) for name in names]
        try:
            self.call(module, hidden.to(self.device, non_blocking=True))
        except _StopBlock:
            pass
        finally:
            for h in handles:
                h.remove()
        return seen

    @torch.no_grad()
    def input_groups(self) -> list[list[str]]:
        """The pruned linears in the order the block calls them, those fed the same input grouped: for a LLaMA
        block ``[[q, k, v], [o], [gate, up], [down]]``. Found from one forward of the first calibration sequence."""
        calls: list[tuple[str, torch.Tensor]] = []
        with self.input_hooks(lambda name, x: calls.append((name, x))):
            self.forward(next(iter(self.inputs))[:1])
        families = {n: n.rsplit(".", 1)[0] for n, layer in self.linears.items() if hasattr(layer, "expert")}
        return group_by_input(calls, list(self.linears), families)

    def calibrate(
        self,
        *stats: dict[str, Any],
        desc: str = "Calibrating",
        keep_outputs: bool = False,
        stop_after: Sequence[str] = (),
    ) -> ActivationStore | None:
        """One pass over all batches that feeds every linear's inputs to its entry (``LayerStats`` or ``None``) in
        each of ``stats`` (an object in several maps is fed once); the outputs if ``keep_outputs``.

        With ``stop_after`` each forward ends as soon as all those layers have received their input (the rest of
        the block is not run; no outputs then). In a data-parallel run the statistics are then summed over the
        ranks (``LayerStats.reduce``)."""
        if stop_after and keep_outputs:
            raise ValueError("calibrate: a forward cut short by stop_after has no outputs to keep")
        pending: set[str] = set()

        def feed(name: str, x: torch.Tensor) -> None:
            fed: set[int] = set()
            for table in stats:
                entry = table.get(name)
                if entry is not None and id(entry) not in fed:
                    fed.add(id(entry))
                    entry.add(x)
            if stop_after:
                pending.discard(name)
                if not pending:
                    raise _StopBlock

        outputs = ActivationStore(self.budget) if keep_outputs else None
        with self.input_hooks(feed), torch.no_grad():
            for hidden in self.batches(desc):
                pending.update(stop_after)
                try:
                    out = self.forward(hidden)
                except _StopBlock:
                    continue
                if outputs is not None:
                    outputs.append(out)
        reduced: set[int] = set()  # a data-parallel run: every rank ends with the statistics of all windows
        for table in stats:
            for entry in table.values():
                if entry is not None and id(entry) not in reduced:
                    reduced.add(id(entry))
                    entry.reduce()
        return outputs
