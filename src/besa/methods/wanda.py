"""Wanda (Sun et al., 2023): importance |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from besa.methods.configs import WandaConfig
from besa.methods.layerwise import ScoredPruner

__all__ = ["WandaConfig", "WandaPruner"]


class WandaPruner(ScoredPruner):
    """Prune the weights with the smallest |W|*||X|| in every output row."""

    score = "wanda"
