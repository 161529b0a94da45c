"""Wanda (Sun et al., 2023): importance |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from besa.config import MethodConfig
from besa.methods.base import LayerStats, LayerwisePruner, apply_prune_mask
from besa.methods.masks import select_prune_mask
from besa.modeling import weight_matrix
from besa.registry import register_method

__all__ = ["WandaConfig", "WandaPruner", "InputNormStats", "wanda_scores"]


@dataclass
class WandaConfig(MethodConfig):
    """Wanda has no settings of its own (the comparison group is the output row)."""


class InputNormStats(LayerStats):
    """Running sum over tokens of the squared input of every input feature (float32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sq_sum += x.square().sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, per input feature (in,)."""
        return self.sq_sum.sqrt()


def wanda_scores(w: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Importance |W_ij| * ||X_j|| for weight (out, in) and input norms (in,), in float32."""
    return w.float().abs() * input_norms.to(w.device).float().unsqueeze(0)


@register_method("wanda", WandaConfig, "|W|*||X|| per output row (Sun et al., 2023)")
class WandaPruner(LayerwisePruner):
    """Prune the weights with the smallest |W|*||X|| in every output row."""

    def make_stats(self, layer: nn.Module) -> LayerStats:
        w = weight_matrix(layer)
        return InputNormStats(w.shape[1], w.device)

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None) -> None:
        assert isinstance(stats, InputNormStats)
        scores = wanda_scores(weight_matrix(layer), stats.norms)
        apply_prune_mask(layer, select_prune_mask(scores, self.sparsity, self.pattern))
