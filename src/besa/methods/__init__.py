"""Built-in pruning methods; importing this package registers them."""

from besa.methods.magnitude import MagnitudeConfig, MagnitudePruner
from besa.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
from besa.methods.wanda import WandaConfig, WandaPruner

__all__ = [
    "MagnitudeConfig",
    "MagnitudePruner",
    "SparseGPTConfig",
    "SparseGPTPruner",
    "WandaConfig",
    "WandaPruner",
]
