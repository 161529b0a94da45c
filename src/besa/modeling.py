"""Finding decoder blocks and prunable linears generically, and reading/writing their weights as (out, in)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from besa.errors import BesaError

__all__ = ["find_blocks", "find_linears", "weight_matrix", "set_weight_matrix", "is_prunable_linear"]


def is_prunable_linear(module: nn.Module) -> bool:
    """``nn.Linear`` and GPT-2 style ``transformers.Conv1D`` layers."""
    return isinstance(module, (nn.Linear, Conv1D))


def _block_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def find_blocks(model: nn.Module, block_class: str | None = None) -> list[tuple[str, nn.Module]]:
    """Return the decoder blocks of ``model`` in execution order, as ``(qualified name, module)``.

    Blocks are the members of the longest ``nn.ModuleList`` whose entries are of a class named in the model's
    ``_no_split_modules`` (or ``block_class`` when given). No attribute path such as ``model.layers`` is assumed.
    """
    wanted = {block_class} if block_class else _block_class_names(model)
    best: list[tuple[str, nn.Module]] = []
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        members = [(f"{list_name}.{i}", m) for i, m in enumerate(module) if type(m).__name__ in wanted]
        if len(members) == len(module) and len(members) > len(best):
            best = members
    if not best:
        raise BesaError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{sorted(wanted) or 'any _no_split_modules class'}"
        )
    return best


def find_linears(block: nn.Module, model: nn.Module | None = None) -> dict[str, nn.Module]:
    """All prunable linears inside ``block`` by name relative to the block, excluding the model's output head."""
    head = (
        model.get_output_embeddings()
        if model is not None and hasattr(model, "get_output_embeddings")
        else None
    )
    return {
        name: module
        for name, module in block.named_modules()
        if name and is_prunable_linear(module) and module is not head
    }


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view (``Conv1D`` stores it transposed)."""
    return layer.weight.data.t() if isinstance(layer, Conv1D) else layer.weight.data


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix into the layer's weight, in the weight's own dtype and layout."""
    weight_matrix(layer).copy_(w.to(layer.weight.dtype))
