"""Magnitude pruning: drop the smallest |W| of each output row (or of each N:M group); needs no data."""

from __future__ import annotations

from besa.methods.configs import MagnitudeConfig
from besa.methods.layerwise import ScoredPruner

__all__ = ["MagnitudeConfig", "MagnitudePruner"]


class MagnitudePruner(ScoredPruner):
    """Prune the smallest-magnitude weights of every output row."""

    score = "magnitude"
    uses_data = False
