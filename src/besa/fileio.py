"""Writing files and folders so that an interrupted run never leaves a half-written result behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from besa.errors import BesaError

__all__ = [
    "atomic_folder",
    "fsync_dir",
    "write_bytes_durable",
    "write_error",
    "write_json_atomic",
    "format_bytes",
]


@contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target``; on success rename it to ``target``, on any error delete it.

    An existing ``target`` is swapped out only with ``replace``; otherwise (another process made it meanwhile) the
    new copy is dropped and the existing one kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise BesaError(f"cannot write into {str(target.parent)!r}: {exc.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        elif replace:
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)
            )  # a name no one has
            os.replace(target, old)  # a folder renamed onto our own empty one
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any], durable: bool = False) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename.

    ``durable`` also fsyncs the file before the rename and the folder after it, so a power cut cannot leave an
    empty or stale file in its place (checkpoints' commit point). A failed write leaves no temporary file behind.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=2, default=str) + "\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, fsync and rename; a failed write leaves nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def write_error(exc: BaseException, what: str, where: Path, needed: int | None = None) -> BesaError:
    """The one-line error for a failed write of ``what`` into ``where``: a full disk (or a file-size or quota
    limit) says how much space the write needs, when ``needed`` (bytes) is known."""
    code = getattr(exc, "errno", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if code == errno.EFBIG or "File too large" in text:
        reason = "a file-size limit was reached"
    elif code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text.lower():
        reason = "the disk is full"
    else:
        return BesaError(f"cannot write {what} to {str(where)!r}: {getattr(exc, 'strerror', None) or text}")
    need = f" (it needs about {format_bytes(needed)} free)" if needed else ""
    return BesaError(f"cannot write {what} to {str(where)!r}: {reason}{need}")
