"""Nested settings seen flat: a config is a dataclass of small sections (``PruneConfig.refit`` ...), while flags,
recipes, keywords, the report and the run folder's fingerprint name each setting by one flat name
(``--refit-epochs``, ``refit_epochs``).

A field whose metadata holds ``section`` (the section's class) is a section; ``only`` limits which of its settings a
config exposes. A setting's flat name is its metadata's ``name``, else the section's ``prefix`` + the field name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, ClassVar

__all__ = ["Section", "allows_none", "flat_fields", "from_flat", "section", "to_flat", "type_name"]


class Section:
    """Base of a settings section; ``prefix`` makes its fields' flat names (``RefitSettings``: ``refit_``)."""

    prefix: ClassVar[str] = ""


def _flat_name(cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("name", getattr(cls, "prefix", "") + f.name)


def flat_fields(cls: type) -> list[tuple[str, dataclasses.Field]]:
    """Every setting of ``cls`` in order, as (flat name, field), sections opened."""
    out: list[tuple[str, dataclasses.Field]] = []
    for f in dataclasses.fields(cls):
        section = f.metadata.get("section")
        if section is None:
            out.append((_flat_name(cls, f), f))
            continue
        only = f.metadata.get("only")
        out += [(name, g) for name, g in flat_fields(section) if only is None or name in only]
    return out


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` built from flat names (unknown names are the caller's to refuse); what is left out is a default."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        section = f.metadata.get("section")
        if section is not None:
            kw[f.name] = from_flat(section, values)
        elif _flat_name(cls, f) in values:
            kw[f.name] = values[_flat_name(cls, f)]
    return cls(**kw)


def to_flat(obj: Any) -> dict[str, Any]:
    """Every setting of ``obj`` by its flat name (tuples and values as they are)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("section") is not None:
            only = f.metadata.get("only")
            out.update({k: v for k, v in to_flat(value).items() if only is None or k in only})
        else:
            out[_flat_name(type(obj), f)] = value
    return out


def section(cls: type, **metadata: Any) -> Any:
    """A config field holding the section ``cls`` (``metadata``: e.g. ``only``, the settings it exposes)."""
    return field(default_factory=cls, metadata={"section": cls, **metadata})


def type_name(f: dataclasses.Field) -> str:
    """The first member of a field's annotation by name (``"float"`` for ``float | None``), whether the annotation
    is a string (``from __future__ import annotations``) or the type itself (a config written without it)."""
    if isinstance(f.type, str):
        return f.type.split("|")[0].strip()
    members = typing.get_args(f.type) if typing.get_origin(f.type) in (typing.Union, types.UnionType) else ()
    first = members[0] if members else f.type
    return getattr(first, "__name__", str(first))


def allows_none(f: dataclasses.Field) -> bool:
    """Whether a field's annotation admits ``None``."""
    if isinstance(f.type, str):
        return "None" in f.type
    return f.type is None or type(None) in typing.get_args(f.type)
