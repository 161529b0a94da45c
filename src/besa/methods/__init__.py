"""The built-in pruning methods, registered here, in one place (``besa`` imports this package once)."""

from besa.methods.besa import BesaConfig, BesaPruner
from besa.methods.magnitude import MagnitudeConfig, MagnitudePruner
from besa.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
from besa.methods.wanda import WandaConfig, WandaPruner
from besa.registry import register_method

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

BUILTIN = [
    ("magnitude", MagnitudeConfig, MagnitudePruner, "smallest |W| per output row; needs no calibration data"),
    ("wanda", WandaConfig, WandaPruner, "|W|*||X|| per output row (Sun et al., 2023)"),
    (
        "sparsegpt",
        SparseGPTConfig,
        SparseGPTPruner,
        "OBS with the inverse Hessian, surviving weights updated",
    ),
    (
        "besa",
        BesaConfig,
        BesaPruner,
        "learned per-row sparsity allocation by block reconstruction (Xu et al., 2024)",
    ),
]

for _name, _config, _pruner, _summary in BUILTIN:
    register_method(_name, _config, _summary)(_pruner)
