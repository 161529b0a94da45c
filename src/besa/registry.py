"""The registries: pruning methods, keyed by name and by config type, and the block-rate allocations (no
``if method == ...`` chains). Each is the one list of its choices.

The built-in methods are registered in ``besa.methods``, which ``besa`` imports; this module imports no method and
no torch (classes are named ``"module:Class"`` and imported on first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from besa.errors import BesaError

if TYPE_CHECKING:
    from besa.methods.base import Pruner
    from besa.settings.config import MethodConfig

__all__ = [
    "ALLOCATIONS",
    "MethodSpec",
    "allocation_class",
    "available_methods",
    "get_method",
    "register_lazy",
    "register_method",
]

_P = TypeVar("_P", bound="type[Pruner]")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its CLI name, its config dataclass and the pruner class that runs it.

    ``pruner`` may be the class or ``"module:Class"``, imported on first use, so that listing the methods and their
    flags (``besa --help``) imports no torch.
    """

    name: str
    config_cls: type[MethodConfig]
    pruner: type[Pruner] | str
    summary: str

    @property
    def pruner_cls(self) -> type[Pruner]:
        if isinstance(self.pruner, str):
            module, _, attr = self.pruner.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.pruner


_REGISTRY: dict[str, MethodSpec] = {}


def _add(spec: MethodSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"pruning method {spec.name!r} is already registered")
    if any(other.config_cls is spec.config_cls for other in _REGISTRY.values()):
        raise ValueError(f"config type {spec.config_cls.__name__} is already registered")
    _REGISTRY[spec.name] = spec


def register_method(name: str, config_cls: type[MethodConfig], summary: str = "") -> Callable[[_P], _P]:
    """Class decorator that registers a ``Pruner`` subclass under ``name`` with its config type."""

    def deco(cls: _P) -> _P:
        _add(MethodSpec(name, config_cls, cls, summary or (cls.__doc__ or "").strip().split("\n")[0]))
        return cls

    return deco


def register_lazy(name: str, config_cls: type[MethodConfig], pruner: str, summary: str) -> None:
    """Register a method whose pruner class (``"module:Class"``) is imported only when a run needs it."""
    _add(MethodSpec(name, config_cls, pruner, summary))


def get_method(name: str) -> MethodSpec:
    """Look up a method by name, or raise a ``BesaError`` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BesaError(f"unknown method {name!r}: choose one of {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


# The block-rate allocations (``--allocation``): name -> ``"module:Class"`` of a ``besa.stages.allocation.Allocation``.
ALLOCATIONS: dict[str, str] = {
    "uniform": "besa.stages.allocation:Allocation",
    "owl": "besa.stages.allocation:OwlAllocation",
}


def allocation_class(name: str) -> type:
    """The allocation registered as ``name``, or a ``BesaError`` listing the known ones."""
    if name not in ALLOCATIONS:
        raise BesaError(f"unknown --allocation {name!r}: choose one of {', '.join(ALLOCATIONS)}")
    module, _, attr = ALLOCATIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
