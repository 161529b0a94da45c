"""From keywords (or flags) and an optional recipe to the three dataclasses of a run, without importing torch, so
that a bad setting is refused at once."""

from __future__ import annotations

import dataclasses
from typing import Any

from besa.errors import BesaError
from besa.registry import get_method
from besa.settings.config import MethodConfig, PruneConfig
from besa.settings.options import RunOptions
from besa.settings.recipe import Recipe

__all__ = ["split_keywords", "build_settings"]


def split_keywords(method: str, keywords: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Sort keywords into ``PruneConfig``, ``RunOptions`` and the method's own config fields.

    A keyword that belongs to none of them (or to another method only) is a ``BesaError`` naming it.
    """
    spec = get_method(method)
    own = {name for name, _ in PruneConfig.settings()}
    run = {f.name for f in dataclasses.fields(RunOptions)}
    mine = {f.name for f in dataclasses.fields(spec.config_cls)}
    sorted_kw: tuple[dict, dict, dict] = ({}, {}, {})
    for key, value in keywords.items():
        slot = 0 if key in own else 1 if key in run else 2 if key in mine else None
        if slot is None:
            raise BesaError(f"unknown setting {key!r} for method {method!r}")
        sorted_kw[slot][key] = value
    return sorted_kw


def build_settings(
    method: str | None,
    settings: dict[str, Any],
    method_options: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
) -> tuple[PruneConfig, MethodConfig, RunOptions]:
    """The run's ``PruneConfig``, method config and ``RunOptions``: defaults, then the recipe's settings, then
    ``settings`` and ``method_options``. Every value is validated here (``BesaError`` naming the setting)."""
    method = method or (recipe.method if recipe else PruneConfig.method)
    config_kw, run_kw, option_kw = split_keywords(method, settings)
    option_kw = {**(method_options or {}), **option_kw}
    if recipe is not None:
        config_kw = {**recipe.prune, **config_kw}
        if method == recipe.method:
            option_kw = {**recipe.options, **option_kw}
    config = PruneConfig.from_flat(method=method, **config_kw)
    try:
        method_config = get_method(method).config_cls(**option_kw)
    except TypeError as exc:
        raise BesaError(f"bad option for method {method!r}: {exc}") from None
    return config, method_config, RunOptions(**run_kw)
