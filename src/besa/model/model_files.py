"""A model's files before loading: where besa caches (a ``.gguf`` file's dequantized copy), and the header
checks of GGUF and safetensors files, which make a truncated or corrupt file a one-line ``BesaError`` before
any work.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from safetensors import SafetensorError

from besa.errors import BesaError

__all__ = ["cache_dir", "check_gguf", "check_safetensors", "gguf_cache_folder"]


def cache_dir() -> Path:
    """Cache root: ``$BESA_CACHE_DIR``, else ``$XDG_CACHE_HOME/besa``, else ``~/.cache/besa``."""
    if os.environ.get("BESA_CACHE_DIR"):
        return Path(os.environ["BESA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "besa"


def gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"


def check_gguf(path: Path, spec: str | None = None) -> None:
    """Read ``path``'s GGUF header and tensor table with the ``gguf`` package (tensor data stays memory-mapped,
    unread): a file that is not GGUF, or is truncated or corrupt, is a one-line ``BesaError`` here rather than a
    traceback deep inside transformers (which blames an invalid JSON config)."""
    from gguf import GGUFReader

    name = spec or str(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise BesaError(
                f"model file {name!r} is not a GGUF file: it does not start with the GGUF magic bytes (a "
                "corrupt download, or another format named .gguf); download or convert it again"
            )
        reader = GGUFReader(path)
        size = path.stat().st_size
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    except OSError as exc:
        raise BesaError(f"cannot read GGUF file {name!r}: {exc.strerror or exc}") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BesaError(
            f"GGUF file {name!r} is unreadable, truncated or corrupt (gguf: {reason}); download or convert it again"
        ) from None
    if ends and max(ends) > size:
        raise BesaError(
            f"GGUF file {name!r} is truncated: its tensors end at byte {max(ends)}, the file has {size}; "
            "download or convert it again"
        )


def check_safetensors(folder: Path) -> None:
    """Open the header of every ``*.safetensors`` file in ``folder`` (no tensor data is read; the header check
    also finds a file whose tensors do not fit in it): a truncated or corrupt file is a one-line ``BesaError``
    naming it, before any work."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BesaError(
                f"weights file {str(file)!r} ({file.stat().st_size} bytes) is not readable safetensors, it is "
                f"truncated or corrupt ({reason}); copy, download or save it again"
            ) from None
