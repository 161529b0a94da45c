"""Built-in pruning methods; importing this package registers them."""

from besa.methods.besa import BesaConfig, BesaPruner
from besa.methods.magnitude import MagnitudeConfig, MagnitudePruner
from besa.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
from besa.methods.wanda import WandaConfig, WandaPruner

__all__ = [
    "BesaConfig",
    "BesaPruner",
    "MagnitudeConfig",
    "MagnitudePruner",
    "SparseGPTConfig",
    "SparseGPTPruner",
    "WandaConfig",
    "WandaPruner",
]
