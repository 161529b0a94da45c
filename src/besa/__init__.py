"""besa: post-training pruning of Hugging Face causal LMs (BESA, with magnitude, Wanda and SparseGPT baselines).

Importing ``besa`` registers the built-in methods and imports no torch; ``prune``, ``evaluate`` and the other
names that need it are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

import besa.methods  # noqa: F401  (registers the built-in methods)
from besa.errors import BesaError
from besa.registry import available_methods, get_method, register_method
from besa.settings.commands import EvalConfig
from besa.settings.config import PruneConfig
from besa.settings.options import RunOptions
from besa.settings.values import NMPattern

__version__ = "0.1.0"

_LAZY = {
    "PruneResult": "besa.api",
    "prune": "besa.api",
    "prune_with": "besa.api",
    "evaluate": "besa.evaluation.perplexity",
    "load_sparse": "besa.runtime.load",
    "save_pruned": "besa.output.saving",
}

__all__ = [
    "BesaError",
    "EvalConfig",
    "NMPattern",
    "PruneConfig",
    "PruneResult",
    "RunOptions",
    "available_methods",
    "evaluate",
    "get_method",
    "load_sparse",
    "prune",
    "prune_with",
    "register_method",
    "save_pruned",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'besa' has no attribute {name!r}")
