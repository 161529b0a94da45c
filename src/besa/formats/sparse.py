"""``--save-format sparse``: each pruned linear's weight stored as a bitmask of its nonzeros plus the nonzero values.

There is no current serving format for sparsity alone (compressed-tensors dropped its bitmask and 2:4 compressors
after 0.14), so this one is ours, kept simple enough to load with ten lines of safetensors and numpy
(``LOADER`` below, also written into every saved folder as ``SPARSE_FORMAT.md``). Layout of ``model.safetensors``:

- ``<name>.bitmask``: uint8 (rows, ceil(cols / 8)), row-major bits of "the weight's bits are not all 0" (a -0.0 is
  a value), most significant bit first
  (``numpy.packbits`` on the last axis);
- ``<name>.values``: the nonzero weights in row-major order, in the weight's own dtype;
- every other tensor of the model as it is. Tied tensors are stored once (``sparse_format.json``: ``tied``).

``sparse_format.json`` names the sparse tensors with their shapes. Round trip: bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from besa.errors import BesaError

__all__ = ["FORMAT_FILE", "LOADER", "pack_weight", "unpack_weight", "save_sparse", "load_sparse_state_dict",
           "is_sparse_folder", "read_sparse_folder", "stored_tensors"]  # fmt: skip

FORMAT_FILE = "sparse_format.json"
WEIGHTS_FILE = "model.safetensors"
LOADER = """# A pruned model saved by `besa prune ... --save-format sparse`: bitmask + nonzero values per pruned weight.
# Layout: model.safetensors holds, for every name listed in sparse_format.json["sparse"],
#   NAME.bitmask  uint8 (rows, ceil(cols/8)): numpy.packbits(bits of weight != 0, axis=-1), most significant first
#   NAME.values   the nonzero weights in row-major order (the weight's dtype)
# and every other tensor as is; sparse_format.json["tied"] maps a tied tensor to the one stored.
# `besa eval` and `besa.load_model` read this folder directly. Without besa:
import json, numpy as np, torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

def load_sparse(folder):
    meta = json.load(open(f"{folder}/sparse_format.json"))
    flat = load_file(f"{folder}/model.safetensors")
    state = {k: v for k, v in flat.items() if not k.endswith((".bitmask", ".values"))}
    for name, (rows, cols) in meta["sparse"].items():
        keep = np.unpackbits(flat[f"{name}.bitmask"].numpy(), axis=-1, count=cols).astype(bool)
        w = torch.zeros(rows, cols, dtype=flat[f"{name}.values"].dtype)
        w[torch.from_numpy(keep)] = flat[f"{name}.values"]
        state[name] = w
    for alias, stored in meta["tied"].items():
        state[alias] = state[stored]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.load_state_dict(state)
    return model.to(state[next(iter(meta["sparse"]))].dtype)  # the dtype the weights were saved in
"""


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bitmask, values)`` of a 2-D weight: packed bits of its nonzeros per row, and the nonzeros row-major.

    "Nonzero" is judged on the bits, so a ``-0.0`` is kept as a value and the round trip is exact."""
    bits = w.detach().cpu().contiguous().view(_SAME_SIZE_INT[w.element_size()])
    keep = bits != 0
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1))
    return bitmask, w.detach().cpu()[keep].contiguous()


def unpack_weight(bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The dense (rows, cols) weight back from ``pack_weight``'s output, bit for bit."""
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=cols).astype(bool))
    if keep.shape != (rows, cols) or int(keep.sum()) != values.numel():
        raise BesaError(f"corrupt sparse weight: bitmask {tuple(keep.shape)} with {values.numel()} values")
    w = torch.zeros(rows, cols, dtype=values.dtype)
    w[keep] = values
    return w


def stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict with every tied tensor once: (name -> tensor, alias -> the name stored)."""
    first: dict[tuple[int, int], str] = {}
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in first and tensor.numel() > 0:
            tied[name] = first[key]
            continue
        first[key] = name
        stored[name] = tensor.detach().cpu().contiguous()
    return stored, tied


def save_sparse(model: nn.Module, pruned: list[str], folder: Path) -> None:
    """Write ``model`` into ``folder`` in the sparse layout: the weights of the linears named in ``pruned`` as
    bitmask + values, the rest as is, the config, ``sparse_format.json`` and ``SPARSE_FORMAT.md``."""
    stored, tied = stored_tensors(model)
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, list[int]] = {}
    wanted = {f"{name}.weight" for name in pruned}
    for name, tensor in stored.items():
        if name in wanted and tensor.dim() == 2:
            tensors[f"{name}.bitmask"], tensors[f"{name}.values"] = pack_weight(tensor)
            sparse[name] = list(tensor.shape)
        else:
            tensors[name] = tensor
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "besa": "sparse bitmask v1"})
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    meta = {
        "format": "besa-sparse-bitmask",
        "version": 1,
        "weights": WEIGHTS_FILE,
        "sparse": sparse,
        "tied": tied,
    }
    (folder / FORMAT_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (folder / "SPARSE_FORMAT.md").write_text(f"```python\n{LOADER}```\n", encoding="utf-8")


def is_sparse_folder(folder: str | Path) -> bool:
    return (Path(folder) / FORMAT_FILE).is_file()


def read_sparse_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A folder written by ``save_sparse``, checked: its ``sparse_format.json`` and every stored tensor by name
    (``<name>.bitmask`` / ``<name>.values`` for the sparse weights)."""
    folder = Path(folder)
    where = folder / FORMAT_FILE
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BesaError(f"{where}: not valid JSON ({exc}); save the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != "besa-sparse-bitmask" or meta.get("version") != 1:
        raise BesaError(f"{where}: not a besa sparse folder this version reads")
    weights = meta.get("weights")
    if not isinstance(weights, str) or Path(weights).name != weights or weights in ("", ".", ".."):
        raise BesaError(
            f"{where} names {weights!r}, not a file of its own folder: besa reads only from the folder"
        )
    flat = load_file(str(folder / weights))
    if not isinstance(meta.get("sparse"), dict) or not isinstance(meta.get("tied"), dict):
        raise BesaError(
            f"{where} lists no sparse and tied tensors; the folder is damaged: save the model again"
        )
    return meta, flat


def load_sparse_state_dict(folder: str | Path) -> dict[str, Any]:
    """The full (dense) state dict of a folder written by ``save_sparse``, tied tensors included."""
    meta, flat = read_sparse_folder(folder)
    try:
        state = {k: v for k, v in flat.items() if not k.endswith((".bitmask", ".values"))}
        for name, (rows, cols) in meta["sparse"].items():
            state[name] = unpack_weight(flat[f"{name}.bitmask"], flat[f"{name}.values"], rows, cols)
        for alias, stored in meta["tied"].items():
            state[alias] = state[stored]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # the listing and the weights disagree
        detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise BesaError(
            f"{Path(folder) / FORMAT_FILE} does not match its weights file ({detail}); the folder is damaged: save "
            "the model again"
        ) from None
    return state
