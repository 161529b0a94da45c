"""Wanda (Sun et al., 2023): importance |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

from besa.config import MethodConfig
from besa.methods.base import ScoredPruner

__all__ = ["WandaConfig", "WandaPruner"]


@dataclass
class WandaConfig(MethodConfig):
    """Wanda has no settings of its own (the comparison group is the output row)."""


class WandaPruner(ScoredPruner):
    """Prune the weights with the smallest |W|*||X|| in every output row."""

    score = "wanda"
