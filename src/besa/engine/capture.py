"""Before any block is pruned: what each block is called with (``capture_block_calls``, one forward with
pass-through stand-ins that also refuses what one-block-at-a-time pruning cannot reproduce) and block 0's inputs
for every calibration batch (``capture_first_inputs``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from besa.engine.activations import ActivationStore, MemoryBudget
from besa.engine.block_call import BlockCall
from besa.errors import BesaError

__all__ = ["capture_block_calls", "capture_first_inputs"]


class _StopForward(Exception):
    """Raised by the capture hook once block 0's input is stored, to skip the rest of the model."""


@torch.no_grad()
def capture_first_inputs(
    model: nn.Module,
    first_block: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    budget: MemoryBudget | None = None,
) -> ActivationStore:
    """Run the model up to ``first_block`` for every batch of ``input_ids`` (N, T); return block 0's inputs (CPU)."""
    stored = ActivationStore(budget)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        stored.append(hidden.detach().to("cpu"))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return stored


@torch.no_grad()
def capture_block_calls(
    model: nn.Module, blocks: list[nn.Module], sample_ids: torch.Tensor
) -> list[BlockCall]:
    """Record what each block is called with besides its hidden states (masks, position embeddings, ...).

    These may differ per block (sliding-window layers, per-layer rotary settings). The blocks are replaced by
    pass-through stand-ins for one batch-1 forward of ``sample_ids`` (1, T), so this costs about one embedding
    lookup; the forward stops at the last block. A second such forward, of the same sequence twice, shows which
    dimension of each captured tensor grows with the batch and how (``BlockCall.axes``, ``BatchAxis``): a
    leading batch dimension, or one that packs the batch with the heads (an ALiBi bias laid out
    ``(B * H, 1, T)``), so that a block can then be run on a batch of any size.
    """
    sample = sample_ids[:1]
    calls: list[BlockCall] = []
    try:
        tuple_out = _each_block_call(model, blocks, sample, calls.append, None)
    except BesaError:
        raise
    except Exception as exc:
        calls.clear()  # the model's own loop may unpack what a block returns: try a (hidden, extra) pair
        try:
            tuple_out = _each_block_call(model, blocks, sample, calls.append, _HANDED_ON)
        except BesaError:
            raise
        except Exception:
            raise BesaError(
                f"{type(model).__name__}'s forward fails with besa's pass-through blocks "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): its blocks must take and "
                "give hidden states (a tuple that starts with them) for besa to prune them one at a time"
            ) from None
    hidden: list[torch.Tensor] = []
    pending = iter(calls)
    wider = torch.cat([sample, sample])
    _each_block_call(model, blocks, wider, lambda w: next(pending).find_axes(w), tuple_out, hidden.append)
    if hidden and hidden[0].shape[0] != 2:  # the second forward had batch 2: so must the hidden states
        raise BesaError(
            f"{type(model).__name__}'s blocks take hidden states of shape {list(hidden[0].shape)} for a batch of 2, "
            "the batch not first (e.g. several residual streams stacked in front); besa prunes blocks whose hidden "
            "states are (batch, tokens, width)"
        )
    return calls


class _HandedOn:
    """What a pass-through block gives besides its hidden states, where the model's loop unpacks a pair: seen again
    in a later block's call, it means the blocks hand each other state, which besa cannot reproduce one block at a
    time."""


_HANDED_ON = _HandedOn()


def _each_block_call(
    model: nn.Module, blocks: list[nn.Module], ids: torch.Tensor, record: Callable[[BlockCall], None],
    extra: _HandedOn | None, hidden_seen: Callable[[torch.Tensor], None] | None = None,
) -> _HandedOn | None:  # fmt: skip
    """One forward of ``ids`` with every block a pass-through stand-in: ``record`` is handed each block's call,
    in order; the forward stops at the last block. With ``extra`` a block gives ``(hidden, extra)``. A block called
    twice before the last one is reached (a stack run in cycles) is refused; so is a call that receives ``extra``."""
    seen: list[int] = []

    def stand_in_for(index: int) -> Callable[..., Any]:
        def stand_in(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index in seen:
                raise BesaError(
                    f"{type(model).__name__} runs its decoder block {index} more than once per forward (blocks "
                    "run in cycles); besa prunes a stack of blocks that each run once"
                )
            if extra is not None and any(a is extra for a in (*args[1:], *kwargs.values())):
                raise BesaError(
                    f"{type(model).__name__}'s blocks hand the next block something besides hidden states; besa "
                    "prunes blocks one at a time from their hidden states and cannot pass that on"
                )
            record(BlockCall(args=args[1:], kwargs=kwargs))
            if hidden_seen is not None:
                hidden_seen(hidden)
            seen.append(index)
            if len(seen) == len(blocks):
                raise _StopForward
            return hidden if extra is None else (hidden, extra)

        return stand_in

    for index, block in enumerate(blocks):
        block.forward = stand_in_for(index)
    try:
        model(ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for block in blocks:
            del block.forward
    if len(seen) != len(blocks):
        raise BesaError(
            f"{type(model).__name__}'s forward ran {len(seen)} of its {len(blocks)} decoder blocks; besa prunes a "
            "stack of blocks that each run once"
        )
    return extra
