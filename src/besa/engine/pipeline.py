"""The sequential (blockwise) engine: embeddings -> block 0 -> ... -> block L-1, one block on the device at a time.

Calibration activations live on the CPU between blocks. For every block the method's ``prune_block`` runs (it may
run the block over the calibration inputs as often as it likes through ``BlockWork``), then the pruned block is
re-run to produce the next block's inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine.activations import ActivationStore, MemoryBudget, trim_heap
from besa.engine.block_call import BlockCall
from besa.engine.capture import capture_block_calls, capture_first_inputs
from besa.engine.streaming import streamer_of
from besa.engine.work import BlockWork
from besa.model.blocks import find_blocks, find_linears
from besa.model.decorated_experts import uses_besa_experts
from besa.model.experts import unfused_experts

__all__ = ["Checkpointer", "EngineSetup", "SequentialResult", "run_sequential"]

log = logging.getLogger(__name__)


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


@dataclass
class EngineSetup:
    """What the engine does besides pruning (every field optional).

    Args:
        block_class: the blocks' class name, when ``find_blocks`` should not guess.
        dense_stream: also carry the dense model's own activations and hand each step the dense block's outputs on
            them (``BlockWork.dense_outputs``).
        budget: the activations' memory (spilled to disk beyond it).
        checkpoint: save every finished block; blocks finished by an earlier, interrupted run are loaded instead
            of pruned again.
        routers: hand a Mixture-of-Experts block's routers to the step among its linears (``find_linears``).
    """

    block_class: str | None = None
    dense_stream: bool = False
    budget: MemoryBudget | None = None
    checkpoint: Checkpointer | None = None
    routers: bool = False


def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    prune_block: Callable[[BlockWork], None],
    device: torch.device,
    forward_batch: int = 8,
    progress: bool = True,
    setup: EngineSetup | None = None,
) -> SequentialResult:
    """Prune ``model`` in place block by block with ``prune_block``, calibrating on ``input_ids`` (N, T).

    Only one block is on ``device`` at a time; everything else of the model is moved there only for the
    embedding pass and returned to the CPU at the end. ``forward_batch`` windows go through a block at once.
    Without ``input_ids`` (a data-free method) every block is still handed to ``prune_block`` in turn, with no
    inputs. ``setup``: the dense stream, memory budget, checkpoints and routers (``EngineSetup``).
    """
    setup = setup or EngineSetup()
    run = _Run(model, find_blocks(model, setup.block_class), device, forward_batch, progress, setup)
    budget = setup.budget = setup.budget if setup.budget is not None else MemoryBudget()
    blocks = [b for _, b in run.named_blocks]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    inputs, dense_inputs = None, None
    scope = ExitStack()
    if setup.checkpoint is not None:  # a streamed model's finished blocks stay in the checkpoints
        run.start, run.block_seconds, inputs, dense_inputs = setup.checkpoint.resume(
            run.named_blocks, budget, load_blocks=streamer_of(model) is None
        )
    run.data_free = input_ids is None
    if not run.data_free:
        _move_outside_blocks(model, blocks, device)
    try:
        scope.enter_context(
            uses_besa_experts(model)
        )  # one experts implementation for every forward of the engine
        if run.data_free:  # each block is handed over on its own; nothing runs through it
            run.calls, inputs = [BlockCall() for _ in blocks], []
        else:
            assert input_ids is not None
            run.calls = capture_block_calls(model, blocks, input_ids[:1].to(device))
            if inputs is None and run.start < len(blocks):  # unless a resumed run brought the inputs it needs
                inputs = capture_first_inputs(model, blocks[0], input_ids, forward_batch, device, budget)
                dense_inputs = inputs if setup.dense_stream else None
        capture_seconds = time.perf_counter() - t0
        inputs, dense_inputs = _prune_blocks(run, inputs, dense_inputs, prune_block)
    finally:
        scope.close()
        _move_outside_blocks(model, blocks, torch.device("cpu"))
        model.train(was_training)
        _release(inputs, dense_inputs)
        budget.cleanup()
    return SequentialResult(
        capture_seconds=capture_seconds, block_seconds=run.block_seconds, resumed_blocks=run.start
    )


@dataclass
class _Run:
    """One engine run's fixed facts and its progress (the first block to prune, each block's seconds)."""

    model: nn.Module
    named_blocks: list[tuple[str, nn.Module]]
    device: torch.device
    forward_batch: int
    progress: bool
    setup: EngineSetup
    start: int = 0
    block_seconds: list[float] = field(default_factory=list)
    calls: list[BlockCall] = field(default_factory=list)
    data_free: bool = False


def _prune_blocks(
    run: _Run,
    inputs: Sequence[torch.Tensor] | None,
    dense_inputs: Sequence[torch.Tensor] | None,
    prune_block: Callable[[BlockWork], None],
) -> tuple[Sequence[torch.Tensor] | None, Sequence[torch.Tensor] | None]:
    """Blocks ``run.start`` onwards, one on the device at a time: prune, propagate, checkpoint; return what is
    left."""
    named_blocks, checkpoint, device = run.named_blocks, run.setup.checkpoint, run.device
    bar = tqdm(
        named_blocks, desc="Pruning blocks", disable=None if run.progress else True, initial=run.start,
        total=len(named_blocks),
    )  # fmt: skip
    stream = streamer_of(run.model)
    for i, (name, block) in enumerate(named_blocks[run.start :], start=run.start):
        tb = time.perf_counter()
        if stream is not None:
            stream.load(name, block)
        replaying = checkpoint is not None and checkpoint.replays(i)
        step = _replay_step(checkpoint) if replaying else prune_block
        with nullcontext() if replaying else unfused_experts(block):  # experts as linears for the step
            work = BlockWork(
                index=i, name=name, module=block.to(device),
                linears=find_linears(block, run.model, run.setup.routers), inputs=inputs, call=run.calls[i],
                device=device, num_blocks=len(named_blocks), progress=run.progress, budget=run.setup.budget,
            )  # fmt: skip
            next_inputs, next_dense = _prune_and_propagate(work, step, dense_inputs, run.data_free)
        block.to("cpu")
        run.block_seconds.append(time.perf_counter() - tb)
        _release(inputs, dense_inputs, keep=(next_inputs, next_dense))
        inputs, dense_inputs = next_inputs, next_dense
        del work
        if checkpoint is not None and not replaying:  # a replayed block's checkpoint is the one it came from
            checkpoint.commit(i, name, block, len(named_blocks), run.block_seconds[-1], inputs, dense_inputs)
        if stream is not None:  # the pruned weights are in the checkpoint (a streamed run always has one)
            stream.unload(block)
        trim_heap()  # what the block's step freed goes back to the system, not only to the heap
        bar.update()
        log.info("block %d/%d (%s) done in %.1f s", i + 1, len(named_blocks), name, run.block_seconds[-1])
    bar.close()
    return inputs, dense_inputs


def _replay_step(checkpoint: Checkpointer) -> Callable[[BlockWork], None]:
    """A block step that takes the block's pruned state from its checkpoint instead of pruning it."""

    def step(work: BlockWork) -> None:
        checkpoint.replay(work.index, work.name, work.module)

    return step


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
