"""What a method's per-block step receives: one block on the compute device, its calibration inputs (CPU batches)
and the arguments it is called with besides its hidden states."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine.activations import ActivationStore, MemoryBudget
from besa.engine.block_call import BlockCall

__all__ = ["BlockWork", "group_by_input"]


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
