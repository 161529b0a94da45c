"""Recipe files: the settings of one pruning run as YAML, written beside every pruned model (``besa_recipe.yaml``)
and read back by ``besa prune MODEL --recipe FILE`` to run it again, bit for bit.

Layout (every key optional except ``besa_recipe``; what is left out takes its default)::

    besa_recipe: 1            # format version
    method: sparsegpt         # a registered method
    prune: {sparsity: 0.5, nsamples: 64, seqlen: 512, ...}   # PruneConfig fields (besides method)
    options: {blocksize: 128, percdamp: 0.01}                # the method's own config fields
    calibration_ids: sha256:...   # only when the run was given token ids through the Python API

Unknown keys, and values of the wrong type, are refused with one line naming the key.

Built-in recipes (``besa/recipes/NAME.yaml``) are named without a path: ``--recipe besa-paper`` is BESA as the
paper runs it, ``--recipe sparsegpt-paper`` SparseGPT as its paper does, whatever the defaults of this version are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from besa.errors import BesaError
from besa.registry import get_method
from besa.settings.config import MethodConfig, PruneConfig
from besa.settings.flat import allows_none, flat_fields, type_name

__all__ = ["Recipe", "RECIPE_NAME", "builtin_recipes", "load_recipe", "recipe_text"]

RECIPE_NAME = "besa_recipe.yaml"
VERSION = 1
_TOP = ("besa_recipe", "method", "prune", "options", "calibration_ids")


@dataclass
class Recipe:
    """A parsed recipe: the method, its ``PruneConfig`` and method-config fields, as plain values."""

    method: str
    prune: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    calibration_ids: str | None = None


def _check_value(where: str, f: dataclasses.Field, value: Any) -> Any:
    """Refuse a value whose type the field cannot take (YAML ints are accepted for floats)."""
    if value is None:
        if not allows_none(f):
            raise BesaError(f"{where} may not be null")
        return None
    first = type_name(f)
    wanted = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}.get(first, (object,))
    if isinstance(value, bool) and first != "bool" or not isinstance(value, wanted):
        raise BesaError(f"{where} must be of type {first}, got {value!r}")
    return float(value) if first == "float" else value


def _section(name: str, data: Any, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe section's settings, by their flat names (``PruneConfig``'s sections opened), each checked."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BesaError(f"recipe key {name!r} must be a mapping of settings")
    fields = {flat: f for flat, f in flat_fields(cls) if flat not in skip}
    out = {}
    for key, value in data.items():
        if key not in fields:
            raise BesaError(f"unknown recipe key '{name}.{key}' (known: {', '.join(fields)})")
        out[key] = _check_value(f"recipe key '{name}.{key}'", fields[key], value)
    return out


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe's parsed YAML; raise ``BesaError`` naming the first bad key."""
    if not isinstance(data, dict) or "besa_recipe" not in data:
        raise BesaError("not a besa recipe: the key 'besa_recipe: 1' is missing")
    for key in data:
        if key not in _TOP:
            raise BesaError(f"unknown recipe key {key!r} (known: {', '.join(_TOP)})")
    if data["besa_recipe"] != VERSION:
        raise BesaError(f"recipe format {data['besa_recipe']!r} is not supported (this besa reads {VERSION})")
    method = data.get("method", PruneConfig.method)
    if not isinstance(method, str):
        raise BesaError(f"recipe key 'method' must be a method name, got {method!r}")
    spec = get_method(method)
    ids = data.get("calibration_ids")
    if ids is not None and not isinstance(ids, str):
        raise BesaError("recipe key 'calibration_ids' must be a string")
    return Recipe(
        method=method,
        prune=_section("prune", data.get("prune"), PruneConfig, skip=("method",)),
        options=_section("options", data.get("options"), spec.config_cls),
        calibration_ids=ids,
    )


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped with besa, by name."""
    folder = Path(__file__).parent / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file, or a built-in recipe given by name (a name that is not an existing file)."""
    import yaml

    builtin = builtin_recipes()
    if str(path) in builtin and not Path(path).exists():
        path = builtin[str(path)]
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        names = ", ".join(builtin)
        raise BesaError(
            f"cannot read recipe {str(path)!r}: {exc.strerror} (built-in recipes: {names})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BesaError(f"recipe {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return parse_recipe(data)
    except BesaError as exc:
        raise BesaError(f"recipe {str(path)!r}: {exc}") from None


def recipe_text(config: PruneConfig, method_config: MethodConfig, calibration_ids: str | None = None) -> str:
    """The fully resolved recipe of a run, as YAML (every setting written out, defaults included)."""
    import yaml

    prune = {k: v for k, v in config.to_dict().items() if k != "method"}
    data: dict[str, Any] = {
        "besa_recipe": VERSION,
        "method": config.method,
        "prune": prune,
        "options": method_config.to_dict(),
    }
    if calibration_ids is not None:
        data["calibration_ids"] = calibration_ids
    header = "# besa recipe: run it again with  besa prune MODEL --recipe THIS_FILE --out FOLDER\n"
    return header + yaml.safe_dump(data, sort_keys=False)
