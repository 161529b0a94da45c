"""The sequential (blockwise) engine: embeddings -> block 0 -> ... -> block L-1, one block on the device at a time.

Calibration activations live on the CPU between blocks. For every block the method's ``prune_block`` runs (it may
run the block over the calibration inputs as often as it likes through ``BlockWork``), then the pruned block is
re-run to produce the next block's inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine.activations import ActivationStore, MemoryBudget, trim_heap
from besa.engine.streaming import streamer_of
from besa.engine.work import BlockCall, BlockWork
from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears
from besa.model.experts import unfused_experts, uses_besa_experts

__all__ = [
    "BlockCall",
    "BlockWork",
    "Checkpointer",
    "capture_block_calls",
    "capture_first_inputs",
    "rebatch",
    "run_sequential",
]

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's input is stored, to skip the rest of the model."""


def rebatch(chunks: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut stored batches (each (B_i, ...)) into consecutive batches of ``size`` samples (the last may be smaller).

    Slices are views where a batch lies inside one stored chunk; only batches that straddle chunks are copied.
    """
    pending: list[torch.Tensor] = []
    have = 0
    for chunk in chunks:
        start = 0
        while start < chunk.shape[0]:
            take = min(size - have, chunk.shape[0] - start)
            pending.append(chunk[start : start + take])
            have += take
            start += take
            if have == size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, have = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def _move_outside_blocks(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a block (embeddings, rotary, norms, head) to ``device``."""
    inside = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    for module in model.modules():
        for _name, param in module.named_parameters(recurse=False):
            if id(param) not in inside:
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and id(buf) not in inside:
                module._buffers[name] = buf.to(device)


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


@dataclass
class SequentialResult:
    """What the engine measured: seconds per stage and per block."""

    capture_seconds: float
    block_seconds: list[float]
    resumed_blocks: int = 0
    """Blocks taken from a run folder's checkpoints instead of being pruned by this call."""


class Checkpointer(Protocol):
    """Where the engine saves each finished block and, on a rerun, picks the work up again (``RunFolder``)."""

    def resume(
        self, named_blocks: list[tuple[str, nn.Module]], budget: MemoryBudget, load_blocks: bool = True
    ) -> tuple[int, list[float], ActivationStore | None, ActivationStore | None]: ...

    def commit(
        self,
        index: int,
        name: str,
        block: nn.Module,
        num_blocks: int,
        seconds: float,
        inputs: ActivationStore | None,
        dense_inputs: ActivationStore | None,
    ) -> None: ...
    def replays(self, index: int) -> bool: ...
    def replay(self, index: int, name: str, block: nn.Module) -> None: ...


def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    prune_block: Callable[[BlockWork], None],
    device: torch.device,
    forward_batch: int = 8,
    progress: bool = True,
    block_class: str | None = None,
    dense_stream: bool = False,
    budget: MemoryBudget | None = None,
    checkpoint: Checkpointer | None = None,
    routers: bool = False,
) -> SequentialResult:
    """Prune ``model`` in place block by block with ``prune_block``, calibrating on ``input_ids`` (N, T).

    Only one block is on ``device`` at a time; everything else of the model is moved there only for the
    embedding pass and returned to the CPU at the end. With ``dense_stream`` the engine also carries the dense
    model's own activations and hands each step the dense block's outputs on them (``BlockWork.dense_outputs``).
    Activations are kept within ``budget`` (spilled to disk beyond it). With ``checkpoint`` every finished block is
    saved, and blocks finished by an earlier, interrupted run are loaded instead of pruned again. ``routers`` hands
    a Mixture-of-Experts block's routers to ``prune_block`` among its linears (``find_linears``). Without
    ``input_ids`` (a data-free method) every block is still handed to ``prune_block`` in turn, with no inputs.
    """
    named_blocks = find_blocks(model, block_class)
    blocks = [b for _, b in named_blocks]
    budget = budget if budget is not None else MemoryBudget()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    start, block_seconds, inputs, dense_inputs = 0, [], None, None
    scope = ExitStack()
    if checkpoint is not None:  # a streamed model's finished blocks stay in the checkpoints
        start, block_seconds, inputs, dense_inputs = checkpoint.resume(
            named_blocks, budget, load_blocks=streamer_of(model) is None
        )
    data_free = input_ids is None
    if not data_free:
        _move_outside_blocks(model, blocks, device)
    try:
        scope.enter_context(
            uses_besa_experts(model)
        )  # one experts implementation for every forward of the engine
        if data_free:  # each block is handed over on its own; nothing runs through it
            calls, inputs = [BlockCall() for _ in blocks], []
        else:
            assert input_ids is not None
            calls, inputs, dense_inputs = _capture(model, blocks, input_ids, forward_batch, device, budget,
                                                   inputs, dense_inputs, dense_stream, start)  # fmt: skip
        capture_seconds = time.perf_counter() - t0
        inputs, dense_inputs = _prune_blocks(
            model, named_blocks, start, calls, inputs, dense_inputs, prune_block, device, progress, budget,
            checkpoint, block_seconds, data_free, routers,
        )  # fmt: skip
    finally:
        scope.close()
        _move_outside_blocks(model, blocks, torch.device("cpu"))
        model.train(was_training)
        _release(inputs, dense_inputs)
        budget.cleanup()
    return SequentialResult(
        capture_seconds=capture_seconds, block_seconds=block_seconds, resumed_blocks=start
    )


def _prune_blocks(
    model: nn.Module, named_blocks: list[tuple[str, nn.Module]], start: int, calls: list[BlockCall],
    inputs: Sequence[torch.Tensor] | None, dense_inputs: Sequence[torch.Tensor] | None,
    prune_block: Callable[[BlockWork], None], device: torch.device, progress: bool, budget: MemoryBudget,
    checkpoint: Checkpointer | None, block_seconds: list[float], data_free: bool, routers: bool = False,
) -> tuple[Sequence[torch.Tensor] | None, Sequence[torch.Tensor] | None]:  # fmt: skip
    """Blocks ``start`` onwards, one on the device at a time: prune, propagate, checkpoint; return what is left."""
    bar = tqdm(
        named_blocks, desc="Pruning blocks", disable=None if progress else True, initial=start,
        total=len(named_blocks),
    )  # fmt: skip
    stream = streamer_of(model)
    for i, (name, block) in enumerate(named_blocks[start:], start=start):
        tb = time.perf_counter()
        if stream is not None:
            stream.load(name, block)
        replaying = checkpoint is not None and checkpoint.replays(i)
        step = _replay_step(checkpoint) if replaying else prune_block
        with nullcontext() if replaying else unfused_experts(block):  # experts as linears for the step
            work = BlockWork(
                index=i, name=name, module=block.to(device), linears=find_linears(block, model, routers),
                inputs=inputs, call=calls[i], device=device, num_blocks=len(named_blocks), progress=progress,
                budget=budget,
            )  # fmt: skip
            next_inputs, next_dense = _prune_and_propagate(work, step, dense_inputs, data_free)
        block.to("cpu")
        block_seconds.append(time.perf_counter() - tb)
        _release(inputs, dense_inputs, keep=(next_inputs, next_dense))
        inputs, dense_inputs = next_inputs, next_dense
        del work
        if checkpoint is not None and not replaying:  # a replayed block's checkpoint is the one it came from
            checkpoint.commit(i, name, block, len(named_blocks), block_seconds[-1], inputs, dense_inputs)
        if stream is not None:  # the pruned weights are in the checkpoint (a streamed run always has one)
            stream.unload(block)
        trim_heap()  # what the block's step freed goes back to the system, not only to the heap
        bar.update()
        log.info("block %d/%d (%s) done in %.1f s", i + 1, len(named_blocks), name, block_seconds[-1])
    bar.close()
    return inputs, dense_inputs


def _replay_step(checkpoint: Checkpointer) -> Callable[[BlockWork], None]:
    """A block step that takes the block's pruned state from its checkpoint instead of pruning it."""

    def step(work: BlockWork) -> None:
        checkpoint.replay(work.index, work.name, work.module)

    return step


@torch.no_grad()
def _capture(
    model: nn.Module, blocks: list[nn.Module], input_ids: torch.Tensor, forward_batch: int, device: torch.device,
    budget: MemoryBudget, inputs: ActivationStore | None, dense_inputs: ActivationStore | None, dense_stream: bool,
    start: int,
) -> tuple[list[BlockCall], ActivationStore | None, ActivationStore | None]:  # fmt: skip
    """Every block's call arguments, and block 0's inputs unless a resumed run brought the inputs it needs."""
    calls = capture_block_calls(model, blocks, input_ids[:1].to(device))
    if inputs is None and start < len(blocks):
        inputs = capture_first_inputs(model, blocks[0], input_ids, forward_batch, device, budget)
        dense_inputs = inputs if dense_stream else None
    return calls, inputs, dense_inputs


def _prune_and_propagate(
    work: BlockWork,
    prune_block: Callable[[BlockWork], None],
    dense_inputs: Sequence[torch.Tensor] | None,
    data_free: bool,
) -> tuple[Sequence[torch.Tensor] | None, ActivationStore | None]:
    """Prune one block, then run the pruned block to make the next block's inputs (and carry the dense stream)."""
    if dense_inputs is not None:
        work.dense_inputs = dense_inputs
        work.dense_outputs = work.forward_all("Dense stream", keep_outputs=True, inputs=dense_inputs)
    prune_block(work)
    next_dense = work.dense_outputs if isinstance(work.dense_outputs, ActivationStore) else None
    if data_free:
        return [], None
    last = work.index + 1 == work.num_blocks
    return (None if last else work.forward_all("Propagating", keep_outputs=True)), next_dense


def _release(*stores: Sequence[torch.Tensor] | None, keep: tuple = ()) -> None:
    """Free the activation stores that are no longer needed (not the ones in ``keep``)."""
    kept = {id(k) for k in keep if k is not None}
    for store in stores:
        if isinstance(store, ActivationStore) and id(store) not in kept:
            store.release()
