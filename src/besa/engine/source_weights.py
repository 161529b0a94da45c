"""The weights a streamed run reads (``besa.engine.streaming``): a safetensors checkpoint as stored.

``ShardIndex`` knows where every tensor lives (one ``model.safetensors``, or shards and their index) and the dtype
it is stored in, and reads tensors memory-mapped, shard by shard; a folder is read only from itself.
``checkpoint_sources`` gives the model's own conversion rules for the tensors a checkpoint stores in parts or under
another name (a Mixture-of-Experts block's experts, stored apart and fused on loading).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from besa.errors import BesaError

__all__ = ["INDEX_NAME", "SINGLE_NAME", "ShardIndex", "checkpoint_sources"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class ShardIndex:
    """Where every tensor of a safetensors checkpoint lives (one file or shards + index), and its stored dtype."""

    def __init__(self, folder: Path, weight_map: dict[str, str]) -> None:
        self.folder = folder
        self.weight_map = weight_map
        self.dtypes: dict[str, torch.dtype] = {}
        for file, names in self._by_file(weight_map).items():
            with safe_open(str(folder / file), framework="pt", device="cpu") as f:
                for name in names:
                    self.dtypes[name] = _DTYPES.get(f.get_slice(name).get_dtype(), torch.float32)

    @classmethod
    def open(cls, folder: str | Path) -> ShardIndex:
        """Read ``folder``'s index (or its single ``model.safetensors``); ``BesaError`` if it has neither."""
        folder = Path(folder)
        try:
            if (folder / INDEX_NAME).is_file():
                weight_map = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
            elif (folder / SINGLE_NAME).is_file():
                with safe_open(str(folder / SINGLE_NAME), framework="pt", device="cpu") as f:
                    weight_map = dict.fromkeys(f.keys(), SINGLE_NAME)
            else:
                raise BesaError(
                    f"--stream reads safetensors weights, and {str(folder)!r} holds neither {SINGLE_NAME} nor "
                    f"{INDEX_NAME}"
                )
            outside = [
                f
                for f in set(weight_map.values())
                if not isinstance(f, str) or Path(f).name != f or f == ".."
            ]
            if outside:
                raise BesaError(
                    f"{str(folder / INDEX_NAME)!r} names {outside[0]!r}, not a file of its own folder: besa reads "
                    "weights only from the model folder"
                )
            return cls(folder, weight_map)
        except (
            OSError,
            KeyError,
            ValueError,
            TypeError,
            SafetensorError,
        ) as exc:  # a truncated or corrupt file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BesaError(
                f"cannot read the weights of {str(folder)!r}: {reason} (a truncated or corrupt file: copy, download "
                "or save it again)"
            ) from None

    @staticmethod
    def _by_file(weight_map: dict[str, str], names: Iterable[str] | None = None) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for name in weight_map if names is None else names:
            grouped.setdefault(weight_map[name], []).append(name)
        return grouped

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored (memory-mapped files, read shard by shard)."""
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise BesaError(
                f"cannot stream {str(self.folder)!r}: its weights have no {missing[0]!r} (names differ from the "
                "model's; run without --stream)"
            )
        out: dict[str, torch.Tensor] = {}
        for file, group in self._by_file(self.weight_map, names).items():
            with safe_open(str(self.folder / file), framework="pt", device="cpu") as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def digest(self) -> str:
        """A fingerprint of the checkpoint: every tensor's name, shape, dtype and its first row's values."""
        import hashlib

        h = hashlib.sha256()
        for file, group in self._by_file(self.weight_map, sorted(self.weight_map)).items():
            with safe_open(str(self.folder / file), framework="pt", device="cpu") as f:
                for name in group:
                    piece = f.get_slice(name)
                    shape = piece.get_shape()
                    first = piece[0:1] if len(shape) > 1 else piece[: min(4096, shape[0]) if shape else None]
                    h.update(f"{name}{tuple(shape)}{piece.get_dtype()}".encode())
                    h.update(first.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def checkpoint_sources(
    model: nn.Module, weight_map: dict[str, str]
) -> dict[str, tuple[Any, list[tuple[str, str]]]]:
    """The model's tensors that a checkpoint stores in parts or under another name: model name -> (transformers'
    ``WeightConverter`` for them or ``None`` for a renaming, ``[(source pattern, checkpoint name), ...]`` in natural
    order). transformers 5 fuses a Mixture-of-Experts
    block's experts on loading (``mlp.experts.gate_up_proj`` from ``block_sparse_moe.experts.<e>.w1/w3.weight``)
    and writes them apart again on saving; this is that mapping, from the model's own conversion rules
    (``transformers.conversion_mapping``), so nothing is named by model class here."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError:  # an older transformers: checkpoints named as the model
        return {}
    rules = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    renamings = [r for r in rules if not isinstance(r, WeightConverter)]
    found: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    for key in sorted(weight_map, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters)
        if target == key or target in weight_map:
            continue
        converter = next((c for c in converters if pattern in c.source_patterns), None)  # None: renamed only
        found.setdefault(target, (converter, []))[1].append((pattern or "", key))
    return found
