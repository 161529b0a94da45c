"""Magnitude pruning: drop the smallest |W| of each output row (or of each N:M group); needs no data."""

from __future__ import annotations

from dataclasses import dataclass

from besa.config import MethodConfig
from besa.methods.base import ScoredPruner

__all__ = ["MagnitudeConfig", "MagnitudePruner"]


@dataclass
class MagnitudeConfig(MethodConfig):
    """Magnitude pruning has no settings of its own."""


class MagnitudePruner(ScoredPruner):
    """Prune the smallest-magnitude weights of every output row."""

    score = "magnitude"
    uses_data = False
