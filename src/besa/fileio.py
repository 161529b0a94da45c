"""Writing files and folders so that an interrupted run never leaves a half-written result behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from besa.errors import BesaError

__all__ = [
    "atomic_folder", "format_bytes", "fresh_temporary", "fsync_dir", "replace_with", "sha256_of", "write_error",
    "write_json_atomic",
]  # fmt: skip


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
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))  # no one's name
            try:
                os.replace(target, old)  # a folder renamed onto our own empty one
            except BaseException:
                old.rmdir()
                raise
            try:
                os.replace(tmp, target)
            except BaseException:  # the earlier output goes back where it was
                os.replace(old, target)
                raise
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


def fresh_temporary(path: Path) -> Path:
    """A new, empty regular file ``.<name>.tmp`` beside ``path``: a leftover of that name (a link someone put there
    included) is removed first, as a name, never what it points to, and the file is created exclusively without
    following links, so writing it can touch nothing else."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(tmp, flags, 0o666))
    return tmp


def replace_with(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write(tmp)`` into a ``fresh_temporary`` of ``path``, fsync it, rename it over ``path`` (a link there is
    replaced, not followed); a failed write leaves no temporary file. ``durable`` also fsyncs the folder."""
    tmp = fresh_temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: dict[str, Any], durable: bool = False) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename (``replace_with``).

    ``durable`` also fsyncs the folder after the rename, so a power cut cannot leave an empty or stale file in its
    place (checkpoints' commit point). A failed write leaves no temporary file behind.
    """
    text = json.dumps(payload, indent=2, default=str) + "\n"
    replace_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a regular file's bytes, read in chunks; ``OSError`` for anything else (a link, a pipe)."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError(f"{path.name} is not a regular file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


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
