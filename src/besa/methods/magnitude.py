"""Magnitude pruning: drop the smallest |W| of each output row (or of each N:M group)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from besa.config import MethodConfig
from besa.methods.base import LayerwisePruner, apply_prune_mask
from besa.modeling import weight_matrix
from besa.stages.masks import select_prune_mask
from besa.stages.selection import LayerStats, magnitude_scores

__all__ = ["MagnitudeConfig", "MagnitudePruner"]


@dataclass
class MagnitudeConfig(MethodConfig):
    """Magnitude pruning has no settings of its own."""


class MagnitudePruner(LayerwisePruner):
    """Prune the smallest-magnitude weights of every output row."""

    uses_data = False

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> None:
        scores = magnitude_scores(weight_matrix(layer))
        apply_prune_mask(layer, select_prune_mask(scores, rate, self.pattern))
