"""The built-in pruning methods, registered here, in one place (``besa`` imports this package once).

Their configs are imported now (the CLI makes flags of them); their pruners, and torch with them, only when a run
needs one.
"""

from besa.methods.besa.config import BesaConfig
from besa.methods.configs import AdmmConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig
from besa.registry import register_lazy

__all__ = ["BUILTIN", "AdmmConfig", "BesaConfig", "MagnitudeConfig", "SparseGPTConfig", "WandaConfig"]

BUILTIN = [
    ("magnitude", MagnitudeConfig, "besa.methods.magnitude:MagnitudePruner",
     "smallest |W| per output row; needs no calibration data"),
    ("wanda", WandaConfig, "besa.methods.wanda:WandaPruner", "|W|*||X|| per output row (Sun et al., 2023)"),
    ("sparsegpt", SparseGPTConfig, "besa.methods.sparsegpt:SparseGPTPruner",
     "OBS with the inverse Hessian, surviving weights updated"),
    ("admm", AdmmConfig, "besa.methods.admm:AdmmPruner",
     "mask and surviving weights solved together by ADMM with gradual pruning (Boza, 2024)"),
    ("besa", BesaConfig, "besa.methods.besa.pruner:BesaPruner",
     "learned per-row sparsity allocation by block reconstruction (Xu et al., 2024)"),
]  # fmt: skip

for _name, _config, _pruner, _summary in BUILTIN:
    register_lazy(_name, _config, _pruner, _summary)
