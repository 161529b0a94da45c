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
a file changed after it was written stops the resume, naming the block and the last good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from besa.engine import distributed
from besa.engine.activations import ActivationStore, MemoryBudget
from besa.errors import BesaError
from besa.fileio import fsync_dir, replace_with, sha256_of, write_error, write_json_atomic
from besa.settings.options import RUN_FILE, RUN_MARKER

__all__ = [
    "RunFolder",
    "TamperedCheckpoint",
    "model_digest",
    "tensor_digest",
    "require_checkpoint",
    "RUN_FILE",
]

log = logging.getLogger(__name__)

_EXTRA = "method::"
_RNG = "run::rng"
"""The CPU RNG state after a block, kept in its file: a redo from the next block starts from it."""
FORMAT_VERSION = 2
_ACTS = re.compile(r"acts-\d{5}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGESTS = "sha256.json"


class TamperedCheckpoint(BesaError):
    """A checkpoint file whose bytes are not those its digest was taken of."""

    def __init__(self, message: str, block: int | None = None) -> None:
        super().__init__(message)
        self.block = block


_DAMAGE = (TamperedCheckpoint, OSError, KeyError, RuntimeError, TypeError, ValueError, AttributeError)
"""What reading a run folder's files raises when one is changed after it was written, or damaged."""


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


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` to ``path`` as safetensors through a temporary file, fsync and rename; return the sha256
    of the bytes written."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest: list[str] = []

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        digest.append(sha256_of(tmp))

    replace_with(path, write)
    return digest[0]


def _read_tensors(path: Path, sha256: str, what: str, block: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (a regular file, never a link) whose bytes must hash to ``sha256``
    (``what`` names it in the error); read memory-mapped, not held twice."""
    if sha256_of(path) != sha256:
        raise TamperedCheckpoint(f"{what} ({path.name}) was changed after it was written", block)
    try:
        return load_file(str(path))
    except SafetensorError as exc:  # the digest matched, so the writer itself wrote this: report it as damage
        raise OSError(f"{path.name} is not a safetensors file ({exc})") from None


def _remove(path: Path) -> None:
    """Delete one entry of a run folder: a link as a link (never what it points to), a folder with its content."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _check_state(state: Any, where: str) -> None:
    """Refuse a ``run.json`` that is not what ``RunFolder`` writes: wrong types, counts out of range, or a name
    that is not the plain one it would have written (a path to elsewhere, say). Raises ``BesaError``."""

    def bad(what: str) -> BesaError:
        return BesaError(f"{where} is damaged ({what}); delete the run folder to start over")

    if not isinstance(state, dict):
        raise bad("not a JSON object")
    if state.get("format") != FORMAT_VERSION:
        raise BesaError(
            f"{where} has format {state.get('format')!r}, not {FORMAT_VERSION} (made by another version of besa); "
            "delete the run folder to start over"
        )
    total, done, blocks = state.get("num_blocks"), state.get("completed"), state.get("blocks")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise bad(f"num_blocks is {total!r}")
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= total:
        raise bad(f"completed is {done!r}, not a count of blocks from 0 to {total}")
    if not isinstance(blocks, list) or len(blocks) != done:
        raise bad(f"it lists {len(blocks) if isinstance(blocks, list) else 'no'} blocks for {done} completed")
    for i, entry in enumerate(blocks):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("seconds"), (int, float))
            and isinstance(entry.get("record"), dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            raise bad(f"the entry of block {i} is not a name, seconds, record and sha256")
    acts = state.get("activations")
    if acts is not None and not (isinstance(acts, str) and _ACTS.fullmatch(acts)):
        raise bad(f"activations names {acts!r}, not a folder of its own")
    if acts is None and done < total or acts is not None and acts != f"acts-{done:05d}":
        raise bad(f"activations names {acts!r} after {done} of {total} blocks")
    for key in ("batches", "dense_batches"):
        value = state.get(key)
        if value is None and key == "dense_batches":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"{key} is {value!r}")


def require_checkpoint(path: Path) -> None:
    """Refuse to resume from a run folder that holds no checkpoint (checked up front and again on opening)."""
    if not (path / RUN_FILE).is_file():
        raise BesaError(f"nothing to resume: {str(path)!r} holds no checkpoint")


def _is_run_artifact(name: str) -> bool:
    """Whether a file or folder name is one this module writes into a run folder."""
    return (
        name in ("blocks", "spill", RUN_MARKER)
        or bool(_ACTS.fullmatch(name))
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
            entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
            foreign = [n for n in entries if not _is_run_artifact(n)]
            if foreign or entries and not (self.path / RUN_MARKER).is_file():
                raise BesaError(
                    f"run folder {str(self.path)!r} holds {(foreign or entries)[0]!r} and no {RUN_FILE}: pass "
                    "another --run-dir"
                )
            distributed.barrier()  # every process has looked at the folder before the first one cleans it
            if distributed.world().writer:
                for name in entries:  # left by a run killed before its first checkpoint
                    _remove(self.path / name)
                self.path.mkdir(parents=True, exist_ok=True)
                (self.path / RUN_MARKER).touch()  # the folder is ours: what it holds from now on, we wrote
            distributed.barrier()
            self.state, self.checked = None, True
            return 0
        links = [p.name for p in self.path.iterdir() if p.is_symlink()]
        if links:
            raise BesaError(
                f"run folder {str(self.path)!r} holds a link {links[0]!r}: besa writes only real files there; "
                "delete the run folder to start over"
            )
        try:
            state = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BesaError(f"cannot read {str(run_file)!r}: {exc}") from None
        _check_state(state, repr(str(run_file)))
        fingerprint = state.get("fingerprint")
        diffs = _differences(
            self.fingerprint, fingerprint if isinstance(fingerprint, dict) else {"": fingerprint}
        )
        if diffs:
            raise BesaError(
                f"run folder {str(self.path)!r} belongs to another run ({'; '.join(diffs[:3])}); "
                "pass another --run-dir or delete that folder"
            )
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
        if state["num_blocks"] != len(named_blocks):
            raise BesaError(
                f"run folder {str(self.path)!r} was made for a model of {state['num_blocks']} blocks, "
                f"this one has {len(named_blocks)}"
            )
        for i, (name, _block) in enumerate(named_blocks[:done]):
            if state["blocks"][i]["name"] != name:
                raise BesaError(
                    f"run folder {str(self.path)!r}: block {i} is {state['blocks'][i]['name']!r}, not {name!r}"
                )
        if self.redo_from is not None:
            if self.redo_from > done:
                raise BesaError(
                    f"--redo-from {self.redo_from}: only blocks 0-{done - 1} of {str(self.path)!r} are done"
                )
            log.info("redoing %s from block %d (blocks before it are replayed)", self.path, self.redo_from)
            return 0, [], None, None
        seconds = []
        try:
            for i, (name, block) in enumerate(named_blocks[:done]):
                self._restore_block(i, name, block if load_blocks else None)
                seconds.append(float(state["blocks"][i]["seconds"]))
            inputs = dense = None
            if done < len(named_blocks):
                acts, own = self.path / state["activations"], _own_prefix()
                digests = self._activation_digests(acts, done)
                inputs = self._load_store(acts, f"{own}inputs", state["batches"], budget, digests, done)
                if state.get("dense_batches") is not None:
                    dense = self._load_store(
                        acts, f"{own}dense", state["dense_batches"], budget, digests, done
                    )
                name = f"{own}rng.safetensors"
                rng = _read_tensors(
                    acts / name, digests.get(name, ""), f"the activations of block {done}", done
                )
                torch.set_rng_state(rng["cpu"])
        except _DAMAGE as exc:
            raise self._one_line(exc) from None
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
        except _DAMAGE as exc:
            raise self._one_line(exc) from None
        if index + 1 == self.redo_from:
            torch.set_rng_state(extra[_RNG])

    def _restore_block(self, index: int, name: str, block: nn.Module | None) -> dict[str, torch.Tensor]:
        """Block ``index``'s verified file: its weights into ``block`` (unless ``None``), the method's tensors and
        facts back to the method; returns the run's own extra tensors (the RNG state)."""
        assert self.state is not None
        entry = self.state["blocks"][index]
        path = self.path / "blocks" / f"{index:05d}.safetensors"
        tensors = _read_tensors(path, entry["sha256"], f"the checkpoint of block {index}", index)
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
        path = self.path / "blocks" / f"{index:05d}.safetensors"
        try:
            tensors = _read_tensors(
                path, self.state["blocks"][index]["sha256"], f"the checkpoint of block {index}", index
            )
        except TamperedCheckpoint as exc:
            raise self._tampered(exc) from None
        except OSError as exc:
            raise BesaError(
                f"run folder {str(self.path)!r} is damaged ({exc}); delete it to start over"
            ) from None
        return {k: v for k, v in tensors.items() if "::" not in k}

    def _one_line(self, exc: BaseException) -> BesaError:
        """A file of the run folder that could not be used: changed after it was written, or damaged."""
        if isinstance(exc, TamperedCheckpoint):
            return self._tampered(exc)
        return BesaError(f"run folder {str(self.path)!r} is damaged ({exc}); delete it to start over")

    def _tampered(self, exc: TamperedCheckpoint) -> BesaError:
        """The one-line answer to a changed checkpoint file: which, what is intact, and how to go on."""
        block = exc.block or 0
        intact = {0: "no block before it", 1: "block 0 is intact"}.get(
            block, f"blocks 0-{block - 1} are intact"
        )
        return BesaError(
            f"run folder {str(self.path)!r}: {exc}; {intact}: rerun with --redo-from {block} to prune again from "
            "there, or delete the run folder to start over"
        )

    def _activation_digests(self, folder: Path, block: int) -> dict[str, str]:
        name = f"{_own_prefix()}{_DIGESTS}"
        try:
            digests = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise TamperedCheckpoint(
                f"the activations of block {block} have no readable {name}", block
            ) from None
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise TamperedCheckpoint(f"the activations of block {block} have a damaged {name}", block)
        return digests

    @staticmethod
    def _load_store(
        folder: Path, prefix: str, count: int, budget: MemoryBudget, digests: dict[str, str], block: int
    ) -> ActivationStore:
        store = ActivationStore(budget)
        for j in range(count):
            name = f"{prefix}-{j:05d}.safetensors"
            what = f"the activations of block {block}"
            store.append(_read_tensors(folder / name, digests.get(name, ""), what, block)["x"])
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
        except (OSError, SafetensorError) as exc:
            last = f"block {index - 1} is the last good checkpoint" if index else "no block was checkpointed"
            needed = sum(t.numel() * t.element_size() for t in block.state_dict().values())
            needed += sum(
                b.numel() * b.element_size() for store in (inputs, dense_inputs) for b in store or ()
            )
            error = write_error(exc, f"the checkpoint of block {index}", self.path, needed)
            raise BesaError(f"{error}; {last}") from None

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
        digest = None
        if writer:
            (self.path / "blocks").mkdir(parents=True, exist_ok=True)
            extra = {f"{_EXTRA}{k}": v for k, v in self.tensors(name).items()}
            extra[_RNG] = torch.get_rng_state()
            path = self.path / "blocks" / f"{index:05d}.safetensors"
            digest = _write_tensors(path, {**block.state_dict(), **extra})
        old = state["activations"]
        new = None
        if inputs is not None:
            new = f"acts-{index + 1:05d}"
            folder = self.path / new
            if writer:
                if folder.exists() or folder.is_symlink():
                    _remove(folder)  # a leftover of a run killed while writing it
                folder.mkdir(parents=True)
            distributed.barrier()  # every rank writes its own activations into the new folder
            digests = {}
            for prefix, store in (("inputs", inputs), ("dense", dense_inputs)):
                for j, batch in enumerate(store or ()):
                    name_j = f"{own}{prefix}-{j:05d}.safetensors"
                    digests[name_j] = _write_tensors(folder / name_j, {"x": batch})
            digests[f"{own}rng.safetensors"] = _write_tensors(
                folder / f"{own}rng.safetensors", {"cpu": torch.get_rng_state()}
            )
            write_json_atomic(folder / f"{own}{_DIGESTS}", digests, durable=True)
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
                {"name": name, "seconds": seconds, "record": self.record(name), "sha256": digest},
            ],
        }
        if writer:
            write_json_atomic(self.path / RUN_FILE, state, durable=True)  # the commit point
        self.state = state
        distributed.barrier()  # no rank goes on before the commit point is written
        if writer and old and old != new and _ACTS.fullmatch(old):
            _remove(self.path / old)

    def remove(self) -> None:
        """Delete what this module wrote into the run folder (after the result was saved), then the folder if
        nothing else is left in it; anything else found there stays."""
        if not distributed.world().writer or not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name == RUN_FILE or _is_run_artifact(p.name):
                _remove(p)
        try:
            self.path.rmdir()
        except OSError:
            log.warning("kept the run folder %s: it holds files besa did not write", self.path)


def _own_prefix() -> str:
    """The prefix of this rank's activation files (none in a one-process run)."""
    w = distributed.world()
    return f"r{w.rank}-" if w.active else ""
