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
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from besa import distributed
from besa.activations import ActivationStore, MemoryBudget
from besa.errors import BesaError
from besa.fileio import fsync_dir, write_json_atomic

__all__ = ["RunFolder", "model_digest", "tensor_digest", "require_checkpoint", "RUN_FILE"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
_EXTRA = "method::"
FORMAT_VERSION = 1


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


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` as safetensors through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def require_checkpoint(path: Path) -> None:
    """Refuse to resume from a run folder that holds no checkpoint (checked up front and again on opening)."""
    if not (path / RUN_FILE).is_file():
        raise BesaError(f"nothing to resume: {str(path)!r} holds no checkpoint")


def _is_run_artifact(name: str) -> bool:
    """Whether a file or folder name is one this module writes into a run folder."""
    return (
        name in ("blocks", "spill")
        or name.startswith("acts-")
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _differences(here: dict[str, Any], there: dict[str, Any]) -> list[str]:
    keys = sorted(set(here) | set(there))
    return [
        f"{k}: {here.get(k)!r} now, {there.get(k)!r} in the run folder"
        for k in keys
        if here.get(k) != there.get(k)
    ]


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
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        record: Callable[[str], dict[str, Any]] | None = None,
        restore: Callable[[str, dict[str, Any]], None] | None = None,
        tensors: Callable[[str], dict[str, torch.Tensor]] | None = None,
        restore_tensors: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.fingerprint = fingerprint
        self.record = record or (lambda _name: {})
        self.restore_record = restore or (lambda _name, _facts: None)
        self.tensors = tensors or (lambda _name: {})
        self.restore_tensors = restore_tensors or (lambda _name, _tensors: None)
        self.state: dict[str, Any] | None = None

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
            if self.path.is_dir():
                foreign = [p.name for p in self.path.iterdir() if not _is_run_artifact(p.name)]
                if foreign:
                    raise BesaError(
                        f"run folder {str(self.path)!r} holds {foreign[0]!r} and no {RUN_FILE}: pass another --run-dir"
                    )
                if distributed.world().writer:
                    for p in self.path.iterdir():  # left by a run killed before its first checkpoint
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            distributed.barrier()
            self.state = None
            return 0
        try:
            state = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BesaError(f"cannot read {str(run_file)!r}: {exc}") from None
        if state.get("format") != FORMAT_VERSION:
            raise BesaError(f"{str(run_file)!r} has an unknown format {state.get('format')!r}")
        diffs = _differences(self.fingerprint, state.get("fingerprint", {}))
        if diffs:
            raise BesaError(
                f"run folder {str(self.path)!r} belongs to another run ({'; '.join(diffs[:3])}); "
                "pass another --run-dir or delete that folder"
            )
        self.state = state
        return int(state["completed"])

    # -- resuming ---------------------------------------------------------------------------------------------
    def resume(
        self, named_blocks: list[tuple[str, nn.Module]], budget: MemoryBudget, load_blocks: bool = True
    ) -> tuple[int, list[float], ActivationStore | None, ActivationStore | None]:
        """Load the finished blocks into the model; return (first block to do, their seconds, inputs, dense inputs).

        With no checkpoint the inputs are ``None`` and the engine starts from the embeddings. Without
        ``load_blocks`` (a streamed run) the blocks' weights stay in their files; the method's facts are restored.
        """
        if self.state is None:
            self.check()
        if self.state is None or self.state["completed"] == 0:
            return 0, [], None, None
        state = self.state
        done = int(state["completed"])
        if done > len(named_blocks) or state.get("num_blocks") != len(named_blocks):
            raise BesaError(
                f"run folder {str(self.path)!r} was made for a model with another number of blocks"
            )
        seconds = []
        try:
            for i, (name, block) in enumerate(named_blocks[:done]):
                entry = state["blocks"][i]
                if entry["name"] != name:
                    raise BesaError(
                        f"run folder {str(self.path)!r}: block {i} is {entry['name']!r}, not {name!r}"
                    )
                tensors = load_file(str(self.path / "blocks" / f"{i:05d}.safetensors"))
                extra = {k[len(_EXTRA) :]: tensors.pop(k) for k in list(tensors) if k.startswith(_EXTRA)}
                if load_blocks:
                    block.load_state_dict(tensors, strict=True)
                del tensors
                self.restore_tensors(name, extra)
                self.restore_record(name, entry["record"])
                seconds.append(float(entry["seconds"]))
            inputs = dense = None
            if done < len(named_blocks):
                acts, own = self.path / state["activations"], _own_prefix()
                inputs = self._load_store(acts, f"{own}inputs", state["batches"], budget)
                if state.get("dense_batches") is not None:
                    dense = self._load_store(acts, f"{own}dense", state["dense_batches"], budget)
                torch.set_rng_state(load_file(str(acts / f"{own}rng.safetensors"))["cpu"])
        except (OSError, KeyError, RuntimeError) as exc:
            raise BesaError(
                f"run folder {str(self.path)!r} is damaged ({exc}); delete it to start over"
            ) from None
        log.info("resuming %s after %d of %d blocks", self.path, done, len(named_blocks))
        return done, seconds, inputs, dense

    @staticmethod
    def _load_store(folder: Path, prefix: str, count: int, budget: MemoryBudget) -> ActivationStore:
        store = ActivationStore(budget)
        for j in range(count):
            store.append(load_file(str(folder / f"{prefix}-{j:05d}.safetensors"))["x"])
        return store

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
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            last = f"block {index - 1} is the last good checkpoint" if index else "no block was checkpointed"
            raise BesaError(
                f"cannot write the checkpoint of block {index} to {str(self.path)!r}: {reason}; {last}"
            ) from None

    def _write(self, index, name, block, num_blocks, seconds, inputs, dense_inputs) -> None:
        """The body of ``commit`` (same arguments), raising ``OSError`` as it comes."""
        state = self.state or {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_blocks": num_blocks,
            "completed": 0,
            "blocks": [],
            "activations": None,
        }
        writer, own = distributed.world().writer, _own_prefix()
        if writer:
            (self.path / "blocks").mkdir(parents=True, exist_ok=True)
            extra = {f"{_EXTRA}{k}": v for k, v in self.tensors(name).items()}
            _write_tensors(self.path / "blocks" / f"{index:05d}.safetensors", {**block.state_dict(), **extra})
        old = state["activations"]
        new = None
        if inputs is not None:
            new = f"acts-{index + 1:05d}"
            folder = self.path / new
            if writer:
                shutil.rmtree(folder, ignore_errors=True)  # a leftover of a run killed while writing it
                folder.mkdir(parents=True)
            distributed.barrier()  # every rank writes its own activations into the new folder
            for prefix, store in (("inputs", inputs), ("dense", dense_inputs)):
                for j, batch in enumerate(store or ()):
                    _write_tensors(folder / f"{own}{prefix}-{j:05d}.safetensors", {"x": batch})
            _write_tensors(folder / f"{own}rng.safetensors", {"cpu": torch.get_rng_state()})
            fsync_dir(folder)
        distributed.barrier()  # all files of every rank are durable before the commit point
        if writer:
            fsync_dir(self.path / "blocks")
        state = {
            **state,
            "completed": index + 1,
            "activations": new,
            "batches": len(inputs) if inputs is not None else 0,
            "dense_batches": len(dense_inputs) if dense_inputs is not None else None,
            "blocks": [
                *state["blocks"][:index],
                {"name": name, "seconds": seconds, "record": self.record(name)},
            ],
        }
        if writer:
            write_json_atomic(self.path / RUN_FILE, state, durable=True)  # the commit point
        self.state = state
        distributed.barrier()  # no rank goes on before the commit point is written
        if writer and old and old != new:
            shutil.rmtree(self.path / old, ignore_errors=True)

    def remove(self) -> None:
        """Delete the run folder (after the result was saved)."""
        if distributed.world().writer:
            shutil.rmtree(self.path, ignore_errors=True)


def _own_prefix() -> str:
    """The prefix of this rank's activation files (none in a one-process run)."""
    w = distributed.world()
    return f"r{w.rank}-" if w.active else ""
