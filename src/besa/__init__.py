"""besa: post-training pruning of Hugging Face causal LMs (BESA, with magnitude, Wanda and SparseGPT baselines)."""

__version__ = "0.1.0"

import besa.methods  # noqa: E402, F401  (registers the built-in methods)
from besa.api import PruneResult, evaluate, prune, prune_with  # noqa: E402
from besa.config import EvalConfig, NMPattern, PruneConfig  # noqa: E402
from besa.errors import BesaError  # noqa: E402
from besa.options import RunOptions  # noqa: E402
from besa.registry import available_methods, get_method, register_method  # noqa: E402
from besa.saving import save_pruned  # noqa: E402

__all__ = [
    "BesaError",
    "EvalConfig",
    "NMPattern",
    "PruneConfig",
    "PruneResult",
    "available_methods",
    "evaluate",
    "get_method",
    "prune",
    "prune_with",
    "RunOptions",
    "register_method",
    "save_pruned",
]
