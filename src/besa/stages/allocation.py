"""Allocation: where the sparsity budget goes across the model's blocks.

An ``Allocation`` gives every block its target rate; inside the block a method may spread that rate further
(BESA learns it per row). ``uniform`` gives every block the target. ``owl`` (Outlier-Weighted Layerwise sparsity,
Yin et al., 2023) gives blocks with more outlier features less sparsity: from one pass of the calibration windows
through the dense model, block l's outlier ratio D_l is the share of its Wanda scores |W|*||X|| above M times
their mean; the ratios are scaled to [0, 2*lambda] and block l gets target - (D_l - mean(D)), so the rates span
exactly 2*lambda and average to the target (every decoder block has the same parameter count, so the model holds
the target overall); with evenly spread ratios each block stays within target +- lambda, and always within
target +- 2*lambda.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from besa.registry import allocation_class

log = logging.getLogger(__name__)

__all__ = ["Allocation", "UniformAllocation", "OwlAllocation", "make_allocation", "outlier_ratio",
           "owl_rates"]  # fmt: skip


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (one block's Wanda scores, any shapes) above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def owl_rates(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's block rates: outlier ratios min-max scaled to [0, 2*lam], centred, subtracted from ``sparsity``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0:
        return [sparsity] * len(ratios)
    r = (r - r.min()) / spread * (2 * lam)
    return [float(sparsity - x) for x in (r - r.mean())]


class Allocation:
    """Uniform: every block gets the run's sparsity. Subclasses may look at the model first (``prepare``)."""

    name = "uniform"
    needs_data = False

    def __init__(self, sparsity: float, **_options: Any) -> None:
        self.sparsity = sparsity
        self.rates: dict[str, float] = {}

    def prepare(self, model: nn.Module, calib_ids: torch.Tensor, device: torch.device, forward_batch: int,
                progress: bool) -> None:  # fmt: skip
        """Look at the dense model before any block is pruned (OWL's statistics pass); nothing by default."""

    def block_rate(self, block: str) -> float:
        """The sparsity rate of block ``block`` (its qualified name)."""
        return self.rates.get(block, self.sparsity)

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "block_rates": self.rates or None}


UniformAllocation = Allocation


class OwlAllocation(Allocation):
    """OWL's block rates, from one pass of the calibration windows through the dense model."""

    name = "owl"
    needs_data = True

    def __init__(
        self, sparsity: float, owl_m: float = 5.0, owl_lambda: float = 0.08, **_options: Any
    ) -> None:
        super().__init__(sparsity)
        self.m, self.lam = owl_m, owl_lambda
        self.ratios: dict[str, float] = {}

    def prepare(self, model: nn.Module, calib_ids: torch.Tensor, device: torch.device, forward_batch: int,
                progress: bool) -> None:  # fmt: skip
        from besa.engine.pipeline import run_sequential
        from besa.model.blocks import weight_matrix
        from besa.stages.selection import SCORERS

        wanda = SCORERS["wanda"]

        def measure(
            work: Any,
        ) -> None:  # statistics only: the block stays dense, so the stream is the dense one
            stats = {name: wanda.stats_for(layer) for name, layer in work.linears.items()}
            work.calibrate(stats, desc="OWL statistics")
            scores = [
                wanda.scores(weight_matrix(layer).detach(), stats[n]) for n, layer in work.linears.items()
            ]
            self.ratios[work.name] = outlier_ratio(scores, self.m)

        run_sequential(model, calib_ids, measure, device, forward_batch, progress)
        log.info("OWL: block rates from outlier ratios (M %g, lambda %g)", self.m, self.lam)
        names = list(self.ratios)
        self.rates = dict(
            zip(names, owl_rates([self.ratios[n] for n in names], self.sparsity, self.lam), strict=True)
        )

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m, "lambda": self.lam, "outlier_ratios": self.ratios,
                "block_rates": self.rates}  # fmt: skip


def make_allocation(name: str, sparsity: float, **options: Any) -> Allocation:
    """The allocation registered as ``name`` (``besa.registry.ALLOCATIONS``) for this sparsity."""
    return allocation_class(name)(sparsity, **options)
