"""What the calibration windows reach in a block, for ``Pruner.run_block``: the linears whose forward never runs on
them, how many tokens each linear (each routed expert of a Mixture-of-Experts block) receives, and the switch that
runs every expert on every token while a method gathers its statistics (``--expert-stats pooled``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from besa.engine import distributed
from besa.engine.work import BlockWork
from besa.model.experts import pooled_statistics
from besa.stages.selection import LayerStats

__all__ = ["pooled_calibration", "routed_tokens", "unreached_linears"]


class _TokenCount(LayerStats):
    """How many tokens reach a linear (a routed expert sees only its own)."""

    def __init__(self) -> None:
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.tokens += x.numel() // max(x.shape[-1], 1)

    def reduce(self) -> None:
        self.tokens = int(distributed.sum_(torch.tensor([self.tokens], dtype=torch.float64))[0])


def routed_tokens(work: BlockWork, names: list[str]) -> dict[str, int]:
    """One pass of the dense block over every calibration window, counting the tokens each linear of ``names``
    receives (for the experts of a Mixture-of-Experts block: the tokens routed to it)."""
    counts = {name: _TokenCount() for name in names}
    work.calibrate(counts, desc="Routed tokens")
    return {name: c.tokens for name, c in counts.items()}


def unreached_linears(work: BlockWork) -> list[str]:
    """The block's linears whose forward runs on no process's first calibration window (agreed over the ranks of a
    data-parallel run, so every rank then makes the same collective calls)."""
    names = list(work.linears)
    seen = work.layer_inputs(work.module, next(iter(work.inputs))[:1], names)
    reached = distributed.sum_(torch.tensor([float(n in seen) for n in names], dtype=torch.float64))
    return [n for n, r in zip(names, reached.tolist(), strict=True) if r == 0]


@contextmanager
def pooled_calibration(work: BlockWork, on: bool) -> Iterator[None]:
    """While active (and ``on``), every statistics pass of ``work`` (``BlockWork.calibrate``) runs each expert on
    every token (``besa.model.experts.pooled_statistics``); the method's other forwards stay routed."""
    if not on:
        yield
        return
    calibrate = work.calibrate

    def pooled(*args: Any, **kwargs: Any) -> Any:
        with pooled_statistics(work.module):
            return calibrate(*args, **kwargs)

    work.calibrate = pooled  # type: ignore[method-assign]
    try:
        yield
    finally:
        del work.calibrate
