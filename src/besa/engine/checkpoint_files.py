"""The files of a run folder's checkpoints (``besa.engine.checkpoint``): safetensors written through a temporary
file with their sha256, and read back checked against it.

A file whose bytes are not those its digest was taken of raises ``TamperedCheckpoint`` (naming the block), which
``RunFolder`` turns into one line saying what is intact and how to go on. The activations a block needs live in a
folder of their own (``acts-00004/``: each rank's inputs, its dense stream if kept, the RNG state, and the
``sha256.json`` of them all); this module writes and reads those folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from besa.engine import distributed
from besa.engine.activations import ActivationStore, MemoryBudget
from besa.errors import BesaError
from besa.fileio import fsync_dir, replace_with, sha256_of, write_error, write_json_atomic

__all__ = [
    "TamperedCheckpoint", "DAMAGE", "write_tensors", "read_tensors", "remove_entry", "block_file",
    "read_block_file", "own_prefix",
    "write_activations", "load_activations", "one_line", "tampered", "write_failure",
]  # fmt: skip

DIGESTS = "sha256.json"


class TamperedCheckpoint(BesaError):
    """A checkpoint file whose bytes are not those its digest was taken of."""

    def __init__(self, message: str, block: int | None = None) -> None:
        super().__init__(message)
        self.block = block


DAMAGE = (TamperedCheckpoint, OSError, KeyError, RuntimeError, TypeError, ValueError, AttributeError)
"""What reading a run folder's files raises when one is changed after it was written, or damaged."""


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` to ``path`` as safetensors through a temporary file, fsync and rename; return the sha256
    of the bytes written."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest: list[str] = []

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        digest.append(sha256_of(tmp))

    replace_with(path, write)
    return digest[0]


def read_tensors(path: Path, sha256: str, what: str, block: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (a regular file, never a link) whose bytes must hash to ``sha256``
    (``what`` names it in the error); read memory-mapped, not held twice."""
    if sha256_of(path) != sha256:
        raise TamperedCheckpoint(f"{what} ({path.name}) was changed after it was written", block)
    try:
        return load_file(str(path))
    except SafetensorError as exc:  # the digest matched, so the writer itself wrote this: report it as damage
        raise OSError(f"{path.name} is not a safetensors file ({exc})") from None


def remove_entry(path: Path) -> None:
    """Delete one entry of a run folder: a link as a link (never what it points to), a folder with its content."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def block_file(folder: Path, index: int) -> Path:
    """Where run folder ``folder`` keeps pruned block ``index``'s state."""
    return folder / "blocks" / f"{index:05d}.safetensors"


def read_block_file(folder: Path, index: int, sha256: str) -> dict[str, torch.Tensor]:
    """All tensors of pruned block ``index``'s file in run folder ``folder``, checked against ``sha256``."""
    return read_tensors(block_file(folder, index), sha256, f"the checkpoint of block {index}", index)


def own_prefix() -> str:
    """The prefix of this rank's activation files (none in a one-process run)."""
    w = distributed.world()
    return f"r{w.rank}-" if w.active else ""


# -- activation folders ---------------------------------------------------------------------------------------
def write_activations(
    folder: Path, inputs: ActivationStore, dense_inputs: ActivationStore | None, writer: bool, own: str
) -> None:
    """Write this rank's activations (file names prefixed ``own``) and the CPU RNG state into ``folder``, with
    their ``sha256.json``; the ``writer`` makes the folder afresh first, and every rank waits for it."""
    if writer:
        if folder.exists() or folder.is_symlink():
            remove_entry(folder)  # a leftover of a run killed while writing it
        folder.mkdir(parents=True)
    distributed.barrier()  # every rank writes its own activations into the new folder
    digests = {}
    for prefix, store in (("inputs", inputs), ("dense", dense_inputs)):
        for j, batch in enumerate(store or ()):
            name_j = f"{own}{prefix}-{j:05d}.safetensors"
            digests[name_j] = write_tensors(folder / name_j, {"x": batch})
    digests[f"{own}rng.safetensors"] = write_tensors(
        folder / f"{own}rng.safetensors", {"cpu": torch.get_rng_state()}
    )
    write_json_atomic(folder / f"{own}{DIGESTS}", digests, durable=True)
    fsync_dir(folder)


def load_activations(
    folder: Path, block: int, batches: int, dense_batches: int | None, budget: MemoryBudget
) -> tuple[ActivationStore, ActivationStore | None]:
    """The activations block ``block`` needs, from ``folder``: this rank's ``batches`` inputs and (unless
    ``dense_batches`` is ``None``) its dense stream, each file checked against its digest; the CPU RNG is set to
    the state kept with them."""
    own = own_prefix()
    digests = _activation_digests(folder, block)
    inputs = _load_store(folder, f"{own}inputs", batches, budget, digests, block)
    dense = None
    if dense_batches is not None:
        dense = _load_store(folder, f"{own}dense", dense_batches, budget, digests, block)
    name = f"{own}rng.safetensors"
    rng = read_tensors(folder / name, digests.get(name, ""), f"the activations of block {block}", block)
    torch.set_rng_state(rng["cpu"])
    return inputs, dense


def _activation_digests(folder: Path, block: int) -> dict[str, str]:
    name = f"{own_prefix()}{DIGESTS}"
    try:
        digests = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TamperedCheckpoint(f"the activations of block {block} have no readable {name}", block) from None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise TamperedCheckpoint(f"the activations of block {block} have a damaged {name}", block)
    return digests


def _load_store(
    folder: Path, prefix: str, count: int, budget: MemoryBudget, digests: dict[str, str], block: int
) -> ActivationStore:
    store = ActivationStore(budget)
    for j in range(count):
        name = f"{prefix}-{j:05d}.safetensors"
        what = f"the activations of block {block}"
        store.append(read_tensors(folder / name, digests.get(name, ""), what, block)["x"])
    return store


# -- what to tell the user --------------------------------------------------------------------------------------
def one_line(path: Path, exc: BaseException) -> BesaError:
    """A file of the run folder ``path`` that could not be used: changed after it was written, or damaged."""
    if isinstance(exc, TamperedCheckpoint):
        return tampered(path, exc)
    return BesaError(f"run folder {str(path)!r} is damaged ({exc}); delete it to start over")


def tampered(path: Path, exc: TamperedCheckpoint) -> BesaError:
    """The one-line answer to a changed checkpoint file: which, what is intact, and how to go on."""
    block = exc.block or 0
    intact = {0: "no block before it", 1: "block 0 is intact"}.get(block, f"blocks 0-{block - 1} are intact")
    return BesaError(
        f"run folder {str(path)!r}: {exc}; {intact}: rerun with --redo-from {block} to prune again from "
        "there, or delete the run folder to start over"
    )


def write_failure(
    exc: BaseException, path: Path, index: int, block: nn.Module, stores: tuple[ActivationStore | None, ...]
) -> BesaError:
    """The one-line answer to a checkpoint of block ``index`` (with the activations ``stores``) that could not be
    written into run folder ``path`` (a full disk, say): about the room it needs, and the last good checkpoint."""
    last = f"block {index - 1} is the last good checkpoint" if index else "no block was checkpointed"
    needed = sum(t.numel() * t.element_size() for t in block.state_dict().values())
    needed += sum(b.numel() * b.element_size() for store in stores for b in store or ())
    error = write_error(exc, f"the checkpoint of block {index}", path, needed)
    return BesaError(f"{error}; {last}")
