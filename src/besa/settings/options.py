"""How a pruning run is carried out, as opposed to what it computes: where it writes, checkpoints and memory.

``RunOptions`` holds these settings once (the Python API's keywords and the CLI's flags are made from its fields)
and checks every place the run will write before any work is done.
"""

from __future__ import annotations

import errno
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from besa.errors import BesaError

SAVE_FORMATS = ("dense", "sparse", "compressed-tensors")

__all__ = [
    "SAVE_FORMATS", "REPORT_NAME", "RUN_FILE", "RUN_MARKER", "RunOptions", "ResolvedRun", "check_apart", "check_output_dir", "check_writable", "written_by_besa",
    "overlapping", "parse_size", "require_checkpoint",
]  # fmt: skip

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int | None) -> int | None:
    """``"512MiB"``, ``"2G"``, ``"1.5gb"``, ``1048576`` -> bytes (binary units); ``None``/``"none"`` -> ``None``."""
    if text is None or isinstance(text, int):
        return text
    if text.strip().lower() in ("none", "unlimited"):
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise BesaError(f"invalid memory size {text!r}: use a number with a unit, for example 512MiB or 4GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def require_checkpoint(path: Path) -> None:
    """Refuse to resume from a run folder that holds no checkpoint (checked up front and again on opening)."""
    if not (path / RUN_FILE).is_file():
        raise BesaError(f"nothing to resume: {str(path)!r} holds no checkpoint")


def check_writable(path: Path, what: str) -> None:
    """Fail unless ``path`` (a folder that may not exist yet) can be created and written: its nearest existing
    ancestor must be a folder we can create files in. ``what`` names the setting in the message."""
    existing = path
    while not existing.exists():  # nothing is created before the first write
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{str(existing)!r} is a file, not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise BesaError(f"cannot write {what} {str(path)!r}: {exc.strerror}") from None


REPORT_NAME = "besa_report.json"
"""The report every pruned model folder holds."""
RUN_FILE = "run.json"
"""A run folder's commit point (``besa.engine.checkpoint``)."""
RUN_MARKER = ".besa-run"
"""The empty file a run folder gets when ``besa`` takes it (``besa.engine.checkpoint``): what it may clean up is its own."""


def written_by_besa(folder: Path) -> bool:
    """Whether ``folder`` holds a pruned model's report (a JSON object with ``config`` and ``sparsity``) or a run
    folder's marker: the only kind of non-empty folder ``--overwrite`` replaces."""
    if (folder / RUN_MARKER).is_file():
        return True
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and {"config", "sparsity"} <= report.keys()


def overlapping(a: Path, b: Path) -> bool:
    """Whether two resolved paths are the same, or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def check_apart(path: Path, what: str, inputs: dict[str, Path]) -> None:
    """Refuse ``path`` (``what``: the flag) when it is, lies inside, or holds one of ``inputs`` (name -> path);
    symlinks are resolved, so another name for the same place is caught too."""
    here = path.expanduser().resolve()
    for name, there in inputs.items():
        there = there.expanduser().resolve()
        if overlapping(here, there):
            relation = "is" if here == there else "lies inside" if there in here.parents else "holds"
            raise BesaError(
                f"{what} {str(path)!r} {relation} {name} {str(there)!r}: besa never writes over or beside its "
                f"input; choose a {what} outside it"
            )


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` and ``besa`` wrote it, a file in its place, or a
    place we cannot write."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise BesaError(f"--out {str(out)!r} exists and is not a folder")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries and not overwrite:
        raise BesaError(f"--out {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    if entries and not written_by_besa(path):
        shown = ", ".join(repr(n) for n in entries[:3]) + (
            f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        )
        raise BesaError(
            f"--out {str(out)!r} was not written by besa (no besa report in it): --overwrite would delete "
            f"{shown}; choose another --out or empty it yourself"
        )
    check_writable(path, "--out")
    return path


@dataclass(frozen=True)
class ResolvedRun:
    """``RunOptions`` checked against the file system: the folders to write (or ``None``) and the memory limit."""

    out: Path | None
    run_dir: Path | None
    memory_limit: int | None


@dataclass
class RunOptions:
    """Where and how a pruning run writes; none of these change the pruned weights.

    Args:
        out: folder to write the pruned model, tokenizer and ``besa_report.json`` to (atomically).
        overwrite: replace ``out`` if it exists and is not empty.
        run_dir: folder for the per-block checkpoints (default: ``<out>.run`` beside ``out``). A run killed midway
            continues from its first unfinished block when called again with the same settings; a run folder of
            another run is refused. It is deleted once ``out`` is written unless ``keep_run_dir``.
        resume: insist on continuing: fail if ``run_dir`` holds no checkpoint.
        redo_from: continue ``run_dir`` from this block, pruning it and those after it again; the blocks before it
            are replayed from their checkpoints (verified). Implies ``resume``.
        checkpoint: write checkpoints (default ``None``: whenever there is a run folder, i.e. ``out`` or
            ``run_dir`` given); ``False`` writes none.
        keep_run_dir: keep the run folder after a successful run.
        max_memory: RAM budget for calibration activations (``"2GiB"``, bytes, ``None`` for no limit); batches
            beyond it are spilled to disk (into the run folder when there is one).
        stream: build the model without weights and read each block from its safetensors only while the engine
            works on it; the pruned blocks wait in the run folder's checkpoints and are written as one shard each
            (``besa.engine.streaming``). Needs ``out`` and checkpoints; dense output only.
        save_quantized: with ``wbits < 16``, also write the integer codes, scales and zero points
            (``quantized.safetensors``, layout in ``quantization.json``) beside the dequantized model.
        save_format: ``dense`` (``save_pretrained``: every weight stored, zeros included), ``sparse`` (each pruned
            linear as a bitmask plus its nonzero values, ``besa.formats.sparse``; ``besa`` and a short loader
            written into the folder read it back bit for bit) or ``compressed-tensors`` (with ``--wbits``: packed
            integer codes, scales and zero points that vLLM and ``from_pretrained`` load, ``besa.formats.compressed``).
        progress: show progress bars.
        trust_remote_code: allow model code from the hub.
    """

    out: str | Path | None = field(
        default=None, metadata={"help": "output folder (written atomically)", "required": True}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace --out if it exists and is not empty"})
    run_dir: str | Path | None = field(
        default=None,
        metadata={
            "help": "checkpoint folder (default: OUT.run beside --out)",
            "group": "checkpoints and memory",
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "require a checkpoint in the run folder to continue",
            "group": "checkpoints and memory",
        },
    )
    checkpoint: bool | None = field(
        default=None,
        metadata={
            "help": "write no checkpoints",
            "flag": "--no-checkpoint",
            "group": "checkpoints and memory",
        },
    )
    redo_from: int | None = field(
        default=None,
        metadata={
            "help": "continue a run folder from this block, pruning it and the rest again (the blocks before it are "
            "taken from their checkpoints): the way on after a checkpoint file was found changed",
            "group": "checkpoints and memory",
            "type": int,
        },
    )
    keep_run_dir: bool = field(
        default=False,
        metadata={"help": "keep the run folder after a successful run", "group": "checkpoints and memory"},
    )
    max_memory: str | int | None = field(
        default=None,
        metadata={
            "help": "RAM for calibration activations, e.g. 4GiB; the rest is spilled to disk (default: no limit)",
            "group": "checkpoints and memory",
        },
    )
    stream: bool = field(
        default=False,
        metadata={
            "help": "read each block's weights from the model's safetensors only while it is pruned and write the "
            "pruned model as shards (one block per shard): peak RAM about one block, whatever the depth; the "
            "pruned blocks wait in the run folder, so a killed run resumes",
            "group": "checkpoints and memory",
        },
    )
    save_quantized: bool = field(
        default=False,
        metadata={
            "help": "with --wbits: also write integer codes, scales and zero points (quantized.safetensors)"
        },
    )
    save_format: str = field(
        default="dense",
        metadata={
            "help": "dense (save_pretrained, zeros stored), sparse (pruned weights as bitmask + nonzero values; "
            "read back by besa or the loader in SPARSE_FORMAT.md) or compressed-tensors (with --wbits: packed "
            "integer weights that vLLM and from_pretrained load)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "hide progress bars", "flag": "--no-progress"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})

    def resolve(self, needs_calibration: bool = True, inputs: dict[str, Path] | None = None) -> ResolvedRun:
        """Check every place this run will write, and the memory size, before any work; raise ``BesaError``.

        ``inputs`` (a name such as ``"the input model"`` -> its path) are what the run reads: ``--out`` and the run
        folder may neither be, lie inside nor hold any of them, nor each other.
        """
        if self.save_format not in SAVE_FORMATS:
            raise BesaError(f"unknown --save-format {self.save_format!r}: choose {', '.join(SAVE_FORMATS)}")
        if self.stream:
            self._check_stream()
        inputs = inputs or {}
        if self.out is not None:
            check_apart(Path(self.out), "--out", inputs)
        out = check_output_dir(self.out, self.overwrite) if self.out is not None else None
        run_dir = self._run_dir(out) if needs_calibration or self.stream else None
        if run_dir is not None:
            check_apart(run_dir, "--run-dir", {**inputs, **({"--out": out} if out is not None else {})})
        return ResolvedRun(out=out, run_dir=run_dir, memory_limit=parse_size(self.max_memory))

    def _check_stream(self) -> None:
        """A streamed run writes its pruned blocks to the run folder and its result to ``out``, densely."""
        if self.out is None:
            raise BesaError("--stream writes the pruned model block by block: give --out")
        if self.checkpoint is False:
            raise BesaError("--stream keeps the pruned blocks in the run folder: drop --no-checkpoint")
        if self.save_format != "dense":
            raise BesaError(
                f"--stream saves dense shards; --save-format {self.save_format} needs the whole model"
            )
        if self.save_quantized:
            raise BesaError("--stream cannot --save-quantized yet: run without --stream")

    def _run_dir(self, out: Path | None) -> Path | None:
        if self.checkpoint is False:
            if self.resume or self.redo_from is not None:
                raise BesaError("resume needs checkpoints: drop --no-checkpoint")
            return None
        if self.run_dir is not None:
            path = Path(self.run_dir).expanduser()
        elif out is not None:
            path = out.parent / f"{out.name}.run"
        elif self.checkpoint or self.resume:
            raise BesaError("checkpoints need a run folder: pass run_dir= (or out=)")
        else:
            return None
        if path.exists() and not path.is_dir():
            raise BesaError(f"run folder {str(path)!r} exists and is not a folder")
        if self.redo_from is not None and self.redo_from < 0:
            raise BesaError(f"--redo-from must be a block index from 0, got {self.redo_from}")
        if self.resume or self.redo_from is not None:
            require_checkpoint(path)
        check_writable(path, "the run folder")
        return path
