"""Run folders: a checkpoint after every pruned block, so a killed run continues where it stopped.

Layout of a run folder::

    run.json                 what the run is (fingerprint) and how far it got (the commit point)
    blocks/00003.safetensors the state of pruned block 3
    acts-00004/              the activations block 4 needs (inputs, and the dense stream if used) and the RNG state
                             (in a data-parallel run each rank's own, named r<rank>-...; rank 0 writes the rest)

After block ``i`` is pruned its state and the next block's activations are written to new files (temporary name,
fsync, rename); only then is ``run.json`` replaced, naming the new activation folder; the old one is deleted
last. A kill at any moment leaves a ``run.json`` that names complete files. Everything is safetensors or JSON;
nothing is unpickled from a run folder.

A run folder is data, never a source of paths: every name in ``run.json`` is checked to be the plain name this
module would have written (``acts-00004``), and nothing outside the folder is read or deleted. Every file carries
its sha256 (a block's in ``run.json``, the activations' in ``acts-*/sha256.json``), checked when it is read back:
a file changed after it was written stops the resume, naming the block and the last good one. The files
themselves are written and read back checked by ``besa.engine.checkpoint_files``; ``run.json`` is checked by
``besa.engine.run_state``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from besa.engine import distributed
from besa.engine.activations import ActivationStore, MemoryBudget
from besa.engine.checkpoint_files import (
    DAMAGE,
    TamperedCheckpoint,
    block_file,
    load_activations,
    one_line,
    own_prefix,
    read_block_file,
    remove_entry,
    write_activations,
    write_failure,
    write_tensors,
)
from besa.engine.run_state import (
    ACTS,
    check_blocks,
    claim_folder,
    committed_state,
    is_run_artifact,
    new_state,
    read_state,
)
from besa.errors import BesaError
from besa.fileio import fsync_dir, write_json_atomic
from besa.settings.options import RUN_FILE, require_checkpoint

__all__ = ["RunFolder", "model_digest", "tensor_digest", "RUN_FILE"]

log = logging.getLogger(__name__)

_EXTRA = "method::"
_RNG = "run::rng"
"""The CPU RNG state after a block, kept in its file: a redo from the next block starts from it."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module, sample: int = 4096) -> str:
    """A cheap fingerprint of a model: every parameter's name, shape, dtype and first ``sample`` values.

    Tells a different checkpoint of the same architecture apart without hashing billions of weights.
    """
    h = hashlib.sha256()
    for name, param in model.state_dict().items():
        flat = param.detach().reshape(-1)[:sample].cpu().contiguous()
        h.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RunFolder:
    """The checkpoints of one pruning run.

    Args:
        path: the run folder.
        fingerprint: flat JSON-able description of the run (configuration, model, calibration); a folder made
            with another fingerprint is refused.
        record: ``record(block_name)`` gives the method's JSON-able facts about a finished block.
        restore: ``restore(block_name, facts)`` gives them back to the method on resume.
        tensors, restore_tensors: the same for the method's tensors about a block (quantization grids), kept in
            the block's safetensors file under keys starting with ``method::``.
        redo_from: prune again from this block: the blocks before it are replayed from their checkpoints (the way
            on after a checkpoint file was found changed).
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        record: Callable[[str], dict[str, Any]] | None = None,
        restore: Callable[[str, dict[str, Any]], None] | None = None,
        tensors: Callable[[str], dict[str, torch.Tensor]] | None = None,
        restore_tensors: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
        redo_from: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.redo_from = redo_from
        self.fingerprint = fingerprint
        self.record = record or (lambda _name: {})
        self.restore_record = restore or (lambda _name, _facts: None)
        self.tensors = tensors or (lambda _name: {})
        self.restore_tensors = restore_tensors or (lambda _name, _tensors: None)
        self.state: dict[str, Any] | None = None
        self.checked = (
            False  # ``check`` ran: a second look would clean the folder under the other ranks' feet
        )

    # -- opening ----------------------------------------------------------------------------------------------
    def check(self, require: bool = False) -> int:
        """Validate an existing run folder (or note that there is none); return how many blocks are done.

        Raises ``BesaError`` for a folder made by another run, an unreadable one, or (``require``) none at all.
        """
        run_file = self.path / RUN_FILE
        if self.path.exists() and not self.path.is_dir():
            raise BesaError(f"run folder {str(self.path)!r} exists and is not a folder")
        if not run_file.exists():
            if require:
                require_checkpoint(self.path)
            claim_folder(self.path)
            self.state, self.checked = None, True
            return 0
        state = read_state(self.path, self.fingerprint)
        self.state, self.checked = state, True
        return int(state["completed"])

    # -- resuming ---------------------------------------------------------------------------------------------
    def resume(
        self, named_blocks: list[tuple[str, nn.Module]], budget: MemoryBudget, load_blocks: bool = True
    ) -> tuple[int, list[float], ActivationStore | None, ActivationStore | None]:
        """Load the finished blocks into the model; return (first block to do, their seconds, inputs, dense inputs).

        With no checkpoint the inputs are ``None`` and the engine starts from the embeddings. Without
        ``load_blocks`` (a streamed run) the blocks' weights stay in their files; the method's facts are restored.
        With ``redo_from`` the engine starts from the embeddings instead and replays the blocks before it.
        Every file read is checked against its digest; one changed after it was written stops the run with one
        line naming the block and what to rerun.
        """
        if not self.checked:
            self.check()
        if self.state is None or self.state["completed"] == 0:
            if self.redo_from:
                raise BesaError(f"--redo-from {self.redo_from}: no block of {str(self.path)!r} is done yet")
            return 0, [], None, None
        state = self.state
        done = int(state["completed"])
        check_blocks(state, self.path, [name for name, _block in named_blocks], self.redo_from)
        if self.redo_from is not None:
            log.info("redoing %s from block %d (blocks before it are replayed)", self.path, self.redo_from)
            return 0, [], None, None
        seconds = []
        try:
            for i, (name, block) in enumerate(named_blocks[:done]):
                self._restore_block(i, name, block if load_blocks else None)
                seconds.append(float(state["blocks"][i]["seconds"]))
            inputs = dense = None
            if done < len(named_blocks):
                acts = self.path / state["activations"]
                inputs, dense = load_activations(
                    acts, done, state["batches"], state.get("dense_batches"), budget
                )
        except DAMAGE as exc:
            raise one_line(self.path, exc) from None
        log.info("resuming %s after %d of %d blocks", self.path, done, len(named_blocks))
        return done, seconds, inputs, dense

    def replays(self, index: int) -> bool:
        """Whether the engine takes block ``index`` from its checkpoint instead of pruning it (``redo_from``)."""
        return self.redo_from is not None and index < self.redo_from

    def replay(self, index: int, name: str, block: nn.Module) -> None:
        """Load block ``index``'s pruned state and the method's facts into ``block``; after the last replayed block
        the RNG is where the original run had it, so the redone blocks are pruned as they were the first time."""
        try:
            extra = self._restore_block(index, name, block)
        except DAMAGE as exc:
            raise one_line(self.path, exc) from None
        if index + 1 == self.redo_from:
            torch.set_rng_state(extra[_RNG])

    def _restore_block(self, index: int, name: str, block: nn.Module | None) -> dict[str, torch.Tensor]:
        """Block ``index``'s verified file: its weights into ``block`` (unless ``None``), the method's tensors and
        facts back to the method; returns the run's own extra tensors (the RNG state)."""
        assert self.state is not None
        entry = self.state["blocks"][index]
        tensors = read_block_file(self.path, index, entry["sha256"])
        own = {k: tensors.pop(k) for k in list(tensors) if k.startswith("run::")}
        extra = {k[len(_EXTRA) :]: tensors.pop(k) for k in list(tensors) if k.startswith(_EXTRA)}
        if block is not None:
            block.load_state_dict(tensors, strict=True)
        del tensors
        self.restore_tensors(name, extra)
        self.restore_record(name, entry["record"])
        return own

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        """Pruned block ``index``'s own tensors from its checkpoint, checked against its digest (a streamed run's
        report and output are made from these)."""
        assert self.state is not None
        try:
            tensors = read_block_file(self.path, index, self.state["blocks"][index]["sha256"])
        except (TamperedCheckpoint, OSError) as exc:
            raise one_line(self.path, exc) from None
        return {k: v for k, v in tensors.items() if "::" not in k}

    # -- saving -----------------------------------------------------------------------------------------------
    def commit(
        self,
        index: int,
        name: str,
        block: nn.Module,
        num_blocks: int,
        seconds: float,
        inputs: ActivationStore | None,
        dense_inputs: ActivationStore | None,
    ) -> None:
        """Checkpoint pruned block ``index`` and the activations the next block needs (``None`` after the last)."""
        try:
            self._write(index, name, block, num_blocks, seconds, inputs, dense_inputs)
        except (OSError, SafetensorError) as exc:
            raise write_failure(exc, self.path, index, block, (inputs, dense_inputs)) from None

    def _write(self, index, name, block, num_blocks, seconds, inputs, dense_inputs) -> None:
        """The body of ``commit`` (same arguments), raising ``OSError`` as it comes."""
        state = self.state or new_state(self.fingerprint, num_blocks)
        writer, own = distributed.world().writer, own_prefix()
        digest = None
        if writer:
            (self.path / "blocks").mkdir(parents=True, exist_ok=True)
            extra = {f"{_EXTRA}{k}": v for k, v in self.tensors(name).items()}
            extra[_RNG] = torch.get_rng_state()
            digest = write_tensors(block_file(self.path, index), {**block.state_dict(), **extra})
        old = state["activations"]
        new = None
        if inputs is not None:
            new = f"acts-{index + 1:05d}"
            write_activations(self.path / new, inputs, dense_inputs, writer, own)
        distributed.barrier()  # all files of every rank are durable before the commit point
        if writer:
            fsync_dir(self.path / "blocks")
        entry = {"name": name, "seconds": seconds, "record": self.record(name), "sha256": digest}
        state = committed_state(state, index, new, inputs, dense_inputs, entry)
        if writer:
            write_json_atomic(self.path / RUN_FILE, state, durable=True)  # the commit point
        self.state = state
        distributed.barrier()  # no rank goes on before the commit point is written
        if writer and old and old != new and ACTS.fullmatch(old):
            remove_entry(self.path / old)

    def remove(self) -> None:
        """Delete what this module wrote into the run folder (after the result was saved), then the folder if
        nothing else is left in it; anything else found there stays."""
        if not distributed.world().writer or not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name == RUN_FILE or is_run_artifact(p.name):
                remove_entry(p)
        try:
            self.path.rmdir()
        except OSError:
            log.warning("kept the run folder %s: it holds files besa did not write", self.path)
