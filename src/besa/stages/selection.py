"""Selection: which weights of a row go. Importance scores (higher = more important) from statistics of a
linear's inputs, gathered batch by batch on the calibration pass; masks are then built by rank (``masks.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from besa.errors import BesaError
from besa.model.blocks import weight_matrix

__all__ = [
    "LayerStats",
    "InputNormStats",
    "HessianStats",
    "CrossStats",
    "Scorer",
    "SCORERS",
    "get_scorer",
    "magnitude_scores",
    "wanda_scores",
    "obs_saliency",
]


class LayerStats:
    """Running statistics of one linear's inputs, fed batch by batch during the calibration pass.

    The sums are float32 per batch, kept in float64 across batches: a float64 sum of float32 terms does not depend on
    their order in practice, so the statistics are the same bit for bit however the batches are split over
    processes (``reduce``, ``besa.engine.distributed``) and more accurate over many tokens."""

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of inputs ``x`` of shape (..., in_features)."""
        raise NotImplementedError

    def reduce(self) -> None:
        """Sum the statistics of every process of a data-parallel run (nothing to do in one process)."""


def _sum_over_ranks(total: torch.Tensor, tokens: int) -> int:
    """Sum ``total`` in place over the processes of a data-parallel run; return the summed token count."""
    from besa.engine import distributed

    distributed.sum_(total)
    return int(distributed.sum_(torch.tensor([tokens], dtype=torch.float64))[0])


class InputNormStats(LayerStats):
    """Running sum over tokens of the squared input of every input feature."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sq_sum += x.square().sum(dim=0)
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        self.tokens = _sum_over_ranks(self.sq_sum, self.tokens)

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, per input feature (in,), float32."""
        return self.sq_sum.sqrt().float()


class HessianStats(LayerStats):
    """Running H = 2/N * sum_t x_t x_t^T over the N calibration tokens."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.xtx += x.t() @ x
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        self.tokens = _sum_over_ranks(self.xtx, self.tokens)

    @property
    def hessian(self) -> torch.Tensor:
        """H in float32."""
        return (self.xtx * (2.0 / max(self.tokens, 1))).float()


class CrossStats:
    """Running C = 2/N * sum_t d_t x_t^T over N calibration tokens, with ``d_t`` a linear's input on the dense
    model's stream and ``x_t`` its input on the pruned model's stream at the same token (the cross term of the
    asymmetric objective ||W D - W' X||^2; ``HessianStats`` is the ``X`` side). Float32 per batch, float64 sums."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.dtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        d = dense.reshape(-1, dense.shape[-1]).float()
        x = pruned.reshape(-1, pruned.shape[-1]).float()
        self.dtx += d.t() @ x
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        self.tokens = _sum_over_ranks(self.dtx, self.tokens)

    @property
    def cross(self) -> torch.Tensor:
        """C in float32, on the scale of ``HessianStats.hessian``."""
        return (self.dtx * (2.0 / max(self.tokens, 1))).float()


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """Importance |W| (out, in), in float32."""
    return w.float().abs()


def wanda_scores(w: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Importance |W_ij| * ||X_j|| for weight (out, in) and input norms (in,), in float32."""
    return w.float().abs() * input_norms.to(w.device).float().unsqueeze(0)


def obs_saliency(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """SparseGPT's w^2 / [H^-1]_jj^2 (out, in), with ``factor`` the upper Cholesky factor of H^-1."""
    return w.float().square() / factor.diagonal().square().unsqueeze(0)


@dataclass(frozen=True)
class Scorer:
    """A named importance: the statistics it needs of a layer's inputs and the scores it makes of them."""

    name: str
    make_stats: Callable[[int, torch.device], LayerStats] | None
    scores: Callable[[torch.Tensor, LayerStats | None], torch.Tensor]

    def stats_for(self, layer: nn.Module) -> LayerStats | None:
        """Fresh statistics for ``layer``'s inputs, or ``None`` if this score needs no data."""
        if self.make_stats is None:
            return None
        w = weight_matrix(layer)
        return self.make_stats(w.shape[1], w.device)


def _hessian_saliency(w: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    from besa.stages.update import inverse_hessian_factor

    assert isinstance(stats, HessianStats)
    return obs_saliency(w, inverse_hessian_factor(stats.hessian, 0.01))


def _wanda(w: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    assert isinstance(stats, InputNormStats)
    return wanda_scores(w, stats.norms)


SCORERS: dict[str, Scorer] = {
    "magnitude": Scorer("magnitude", None, lambda w, _stats: magnitude_scores(w)),
    "wanda": Scorer("wanda", InputNormStats, _wanda),
    "sparsegpt": Scorer("sparsegpt", HessianStats, _hessian_saliency),
}
"""The importances a method can rank weights by (``sparsegpt``: the OBS saliency at damping 0.01)."""


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise BesaError(f"unknown importance {name!r}: choose one of {', '.join(SCORERS)}") from None
