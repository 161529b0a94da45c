"""The built-in layerwise methods' settings, apart from their pruners so that listing flags imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from besa.config import MethodConfig
from besa.errors import BesaError

__all__ = ["MagnitudeConfig", "WandaConfig", "SparseGPTConfig"]


@dataclass
class MagnitudeConfig(MethodConfig):
    """Magnitude pruning has no settings of its own."""


@dataclass
class WandaConfig(MethodConfig):
    """Wanda has no settings of its own (the comparison group is the output row)."""


@dataclass
class SparseGPTConfig(MethodConfig):
    """SparseGPT settings.

    Args:
        blocksize: columns per lazy-update block (must be a multiple of M for N:M patterns).
        percdamp: dampening added to the Hessian diagonal, as a fraction of its mean.
    """

    blocksize: int = field(default=128, metadata={"help": "SparseGPT: columns per lazy-update block"})
    percdamp: float = field(
        default=0.01, metadata={"help": "SparseGPT: Hessian dampening, fraction of mean diag"}
    )

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise BesaError(f"--blocksize must be positive, got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise BesaError(f"--percdamp must be in (0, 1), got {self.percdamp}")
