"""Wanda (Sun et al., 2023): importance |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from besa.config import MethodConfig
from besa.methods.base import LayerwisePruner, apply_prune_mask
from besa.modeling import weight_matrix
from besa.stages.masks import select_prune_mask
from besa.stages.selection import InputNormStats, LayerStats, wanda_scores

__all__ = ["WandaConfig", "WandaPruner"]


@dataclass
class WandaConfig(MethodConfig):
    """Wanda has no settings of its own (the comparison group is the output row)."""


class WandaPruner(LayerwisePruner):
    """Prune the weights with the smallest |W|*||X|| in every output row."""

    def make_stats(self, layer: nn.Module) -> LayerStats:
        w = weight_matrix(layer)
        return InputNormStats(w.shape[1], w.device)

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> None:
        assert isinstance(stats, InputNormStats)
        scores = wanda_scores(weight_matrix(layer), stats.norms)
        apply_prune_mask(layer, select_prune_mask(scores, rate, self.pattern))
