"""BESA: learned, blockwise sparsity allocation."""

from besa.methods.besa.pruner import BesaConfig, BesaPruner

__all__ = ["BesaConfig", "BesaPruner"]
