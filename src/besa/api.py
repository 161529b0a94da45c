"""The Python API for pruning: ``prune`` (keywords) around ``prune_with`` (dataclasses), which runs a
``besa.run.PruneRun``; ``besa.evaluate`` lives in ``besa.evaluation.perplexity``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from besa.engine.fingerprint import ids_digest
from besa.errors import BesaError
from besa.run import PruneRun
from besa.settings.build import build_settings
from besa.settings.config import MethodConfig, PruneConfig
from besa.settings.options import RunOptions
from besa.settings.recipe import Recipe, load_recipe

__all__ = ["PruneResult", "prune", "prune_with"]


@dataclass
class PruneResult:
    """The pruned model (on the CPU), its tokenizer, the report, and the output folder if one was written.

    ``model`` is ``None`` after a streamed run (``stream=True``): the pruned model is the one written to ``out``.
    In a data-parallel run (``torchrun``) only rank 0 gets the report; the other ranks get an empty one.
    """

    model: nn.Module | None
    tokenizer: Any
    report: dict[str, Any]
    out: Path | None


def prune(
    model: str | nn.Module,
    *,
    method: str | None = None,
    tokenizer: Any = None,
    calib_ids: torch.Tensor | None = None,
    method_options: dict[str, Any] | None = None,
    recipe: str | Path | Recipe | None = None,
    **settings: Any,
) -> PruneResult:
    """Prune a causal LM block by block and optionally save it.

    Args:
        model: a model spec (local folder, hub id, ``.gguf`` file, ``smollm2-135m``) or a loaded model (then pass
            ``tokenizer``).
        method: a registered method name (default: the recipe's, else ``wanda``).
        calib_ids: pre-tokenized calibration windows (N, T) instead of sampling from ``calib``.
        method_options: the method's own settings (e.g. SparseGPT ``blocksize``); they may also be given as
            keywords.
        settings: the fields of ``PruneConfig`` (``sparsity``, ``pattern``, ``calib``, ``nsamples``, ``seqlen``,
            ``wbits``, ...), of ``RunOptions`` (``out``, ``overwrite``, ``run_dir``, ``resume``, ``checkpoint``,
            ``max_memory``, ``save_quantized``, ``progress``, ...) and of the method's config, each with its
            dataclass's default.
        recipe: a recipe file (or a loaded ``Recipe``): its settings replace the defaults; the keywords given
            here replace the recipe's. Every saved run writes its resolved recipe (``besa_recipe.yaml``).

    Returns a ``PruneResult``; see ``prune_with`` for the same call with the dataclasses built.

    Example:
        >>> result = besa.prune("smollm2-135m", method="wanda", sparsity=0.5, nsamples=16, seqlen=256, out="pruned")
    """
    base = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    if base is not None and base.calibration_ids is not None:
        if calib_ids is None or ids_digest(calib_ids) != base.calibration_ids:
            raise BesaError(
                "the recipe's run was calibrated on token ids given to the Python API (calibration_ids "
                f"{base.calibration_ids[:19]}...): pass the same calib_ids"
            )
    config, method_config, options = build_settings(method, settings, method_options, base)
    return prune_with(model, config, method_config, options, tokenizer=tokenizer, calib_ids=calib_ids)


def prune_with(
    model: str | nn.Module,
    config: PruneConfig,
    method_config: MethodConfig,
    run_options: RunOptions | None = None,
    *,
    tokenizer: Any = None,
    calib_ids: torch.Tensor | None = None,
) -> PruneResult:
    """The core of ``prune``: every setting already in its dataclass. Checks everything it will write first."""
    run = PruneRun(model, config, method_config, run_options or RunOptions(), tokenizer, calib_ids)
    return PruneResult(*run.execute())
