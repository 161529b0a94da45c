"""Magnitude pruning: drop the smallest |W| of each output row (or of each N:M group)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from besa.config import MethodConfig
from besa.methods.base import LayerStats, LayerwisePruner, apply_prune_mask
from besa.methods.masks import select_prune_mask
from besa.modeling import weight_matrix
from besa.registry import register_method

__all__ = ["MagnitudeConfig", "MagnitudePruner", "magnitude_scores"]


@dataclass
class MagnitudeConfig(MethodConfig):
    """Magnitude pruning has no settings of its own."""


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """Importance |W| (out, in), in float32."""
    return w.float().abs()


@register_method("magnitude", MagnitudeConfig, "smallest |W| per output row; needs no calibration data")
class MagnitudePruner(LayerwisePruner):
    """Prune the smallest-magnitude weights of every output row."""

    needs_calibration = False

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None) -> None:
        scores = magnitude_scores(weight_matrix(layer))
        apply_prune_mask(layer, select_prune_mask(scores, self.sparsity, self.pattern))
