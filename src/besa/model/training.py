"""Running a whole model for training within memory: the hidden states its output head is given, without the
logits (``final_hidden``; ``head_splits`` checks the logits are that head's output), and its decoder blocks
recomputed in backward instead of keeping their activations (``checkpointed_blocks``). Found generically: the head
is ``get_output_embeddings()``, the blocks ``find_blocks``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from besa.model.blocks import find_blocks

__all__ = ["model_logits", "final_hidden", "head_splits", "checkpointed_blocks"]


def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s whole logits for ``ids`` (no cache)."""
    return model(input_ids=ids, use_cache=False).logits


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, T, H) ``model``'s output head is given for ``ids``: the model runs to its head, which
    is then given no position, so no logits are made."""
    seen: list[torch.Tensor] = []

    def take(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(take)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def head_splits(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``model``'s logits are its output head applied to ``final_hidden`` (checked on the first 16
    positions of ``ids``' first window): false where the model does more after its head (a soft cap, a scale)."""
    sample = ids[:1, :16]
    head = model.get_output_embeddings()
    if head is None:
        return False
    return torch.allclose(
        head(final_hidden(model, sample)).float(), model_logits(model, sample).float(), 1e-4, 1e-5
    )


@contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, every decoder block of ``model`` keeps only its inputs for backward and recomputes the
    rest there (``torch.utils.checkpoint``): one block's activations at a time instead of every block's."""
    blocks = [block for _, block in find_blocks(model)]
    before = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, before, strict=True):
            del block.forward
            if forward is not None:
                block.forward = forward
