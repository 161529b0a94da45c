"""BESA: learned, blockwise sparsity allocation."""

from besa.methods.besa.config import BesaConfig
from besa.methods.besa.pruner import BesaPruner

__all__ = ["BesaConfig", "BesaPruner"]
