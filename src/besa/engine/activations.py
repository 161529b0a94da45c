"""Calibration activations held in RAM up to a budget, spilled to disk beyond it.

The sequential engine keeps a few lists of activation batches alive at once (a block's inputs, its outputs, the
dense stream, BESA's reconstruction targets). ``ActivationStore`` is such a list; every store of one run draws
on one ``MemoryBudget``. A batch that does not fit in what is left of the budget is written to a safetensors
file in the spill folder and read back each time it is used.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from besa.errors import BesaError
from besa.fileio import write_error

__all__ = ["ActivationStore", "MemoryBudget", "rebatch"]


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A block's tensors of a few MB come from the heap once glibc has raised its mmap threshold, and freeing them
    does not shrink the process: without this, a streamed run's RSS grows by about a block per block."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def return_large_frees() -> None:
    """Serve allocations of 1 MiB and more from their own mappings, so freeing them gives the memory back at once
    (glibc ``mallopt(M_MMAP_THRESHOLD)``; nothing elsewhere). By default glibc raises that threshold as large
    blocks are freed, after which a block step's tensors of a few MB fragment the heap: measured on a streamed BESA
    run, the peak RSS drops by about 180 MB with this. Called by ``besa prune --stream`` (the process is ours)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class MemoryBudget:
    """Bytes of activations allowed in RAM (``limit=None``: no limit), and where the rest goes.

    Also records what happened: the peak bytes held in RAM, and how many batches and bytes were spilled.
    """

    limit: int | None = None
    spill_root: Path | None = None
    used: int = 0
    peak: int = 0
    spilled_batches: int = 0
    spilled_bytes: int = 0
    _spill_dir: Path | None = field(default=None, repr=False)
    _counter: int = field(default=0, repr=False)

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of RAM if the budget allows it; ``False`` means: spill this batch."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes

    def spill_path(self) -> Path:
        """A fresh file name in this run's spill folder (made on first use)."""
        if self._spill_dir is None:
            root = self.spill_root or Path(tempfile.gettempdir())
            try:
                root.mkdir(parents=True, exist_ok=True)
                self._spill_dir = Path(tempfile.mkdtemp(prefix="besa-spill-", dir=root))
            except OSError as exc:
                raise BesaError(f"cannot create a spill folder in {str(root)!r}: {exc.strerror}") from None
        self._counter += 1
        return self._spill_dir / f"{self._counter:08d}.safetensors"

    def cleanup(self) -> None:
        """Delete the spill folder and everything in it."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def summary(self) -> dict[str, float | int | None]:
        return {
            "budget_mib": None if self.limit is None else self.limit / 2**20,
            "peak_in_ram_mib": self.peak / 2**20,
            "spilled_batches": self.spilled_batches,
            "spilled_mib": self.spilled_bytes / 2**20,
        }


class ActivationStore(Sequence[torch.Tensor]):
    """A list of activation batches (each (B, T, H) on the CPU), each either in RAM or in a file on disk.

    Reading a spilled batch loads it from its file; the store deletes its files and returns its share of the
    budget on ``release()`` (and when garbage collected).
    """

    def __init__(self, budget: MemoryBudget | None = None, batches: Iterable[torch.Tensor] = ()) -> None:
        self.budget = budget if budget is not None else MemoryBudget()
        self._items: list[torch.Tensor | Path] = []
        self._sizes: list[int] = []
        self._held = 0
        for batch in batches:
            self.append(batch)

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to("cpu")
        nbytes = _nbytes(batch)
        if self.budget.take(nbytes):
            self._items.append(batch)
            self._held += nbytes
        else:
            path = self.budget.spill_path()
            try:
                save_file({"x": batch.contiguous()}, str(path))
            except (OSError, SafetensorError) as exc:
                path.unlink(missing_ok=True)
                raise write_error(exc, "spilled activations", path.parent, nbytes) from None
            self._items.append(path)
            self.budget.spilled_batches += 1
            self.budget.spilled_bytes += nbytes
        self._sizes.append(int(batch.shape[0]))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        item = self._items[index]
        return load_file(str(item))["x"] if isinstance(item, Path) else item

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    @property
    def num_samples(self) -> int:
        """Sequences over all batches, known without reading spilled files."""
        return sum(self._sizes)

    @property
    def spilled(self) -> int:
        """How many of the batches live on disk."""
        return sum(isinstance(item, Path) for item in self._items)

    def release(self) -> None:
        """Drop every batch: return the RAM share to the budget and delete the spill files."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.budget.give_back(self._held)
        self._held = 0
        self._items.clear()
        self._sizes.clear()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to clean
            pass


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
