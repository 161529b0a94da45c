"""Where text comes from: each named source (WikiText-2, PTB, C4, enwiki articles) read from a local data
directory or else the hub, and the UTF-8 and JSON-lines readers behind it.

A data directory (``$BESA_DATA_DIR``, else ``../shared/data`` when present) is laid out like this; any file present is used before the hub::

    wikitext-2-raw-v1/{train,validation,test}.jsonl   one {"text": row} per line, rows byte for byte
    ptb/{train,valid,test}.txt                        one sentence per line
    c4/c4-{train.00000-of-01024,validation.00000-of-00008}.json[.gz]   {"text": ...} per line
    calibration/enwiki-articles.jsonl                 {"title", "text"} per line
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from besa.errors import BesaError

__all__ = [
    "CALIB_SOURCES",
    "EVAL_SOURCES",
    "TextSource",
    "data_dir",
    "read_jsonl_texts",
    "read_utf8_text",
]


def data_dir() -> Path | None:
    """The local data directory: ``$BESA_DATA_DIR`` if set, else ``../shared/data`` if that folder exists (the
    workspace layout this project is developed in), else none."""
    value = os.environ.get("BESA_DATA_DIR")
    if value:
        return Path(value).expanduser()
    fallback = Path("..", "shared", "data")
    return fallback if fallback.is_dir() else None


def _not_utf8(path: Path, exc: UnicodeDecodeError, offset: int, lineno: int) -> BesaError:
    """The one-line error for a text file with a byte that is not UTF-8 at byte ``offset`` (line ``lineno``)."""
    of = " of the decompressed text" if path.suffix == ".gz" else ""
    return BesaError(
        f"{path}: not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {offset}{of} (line {lineno}: "
        f"{exc.reason}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def read_utf8_text(path: Path) -> str:
    """The whole of a UTF-8 text file, its line ends translated as text mode does (CRLF and CR become LF); a byte
    that is not UTF-8 is a ``BesaError`` naming the file and the byte's offset."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BesaError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc, exc.start, data.count(b"\n", 0, exc.start) + 1) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    """The ``field`` of every JSON line of ``path`` (``.jsonl``, ``.json`` or gzipped). Errors name the line (and
    for a byte that is not UTF-8, its offset)."""
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    offset = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:  # line by line: a UTF-8 character never holds a newline byte, so the offset is exact
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, exc, offset + exc.start, lineno) from None
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BesaError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise BesaError(f"{path}: line {lineno} nests JSON too deeply to read") from None
                if not isinstance(record, dict) or field not in record or not isinstance(record[field], str):
                    raise BesaError(f"{path}: line {lineno} has no string field {field!r}")
                texts.append(record[field])
    except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz, an unreadable file
        raise BesaError(f"cannot read {path}: {exc}; copy or download it again") from None
    return texts


def _local(*parts: str) -> Path | None:
    root = data_dir()
    if root is None:
        return None
    for candidate in (root.joinpath(*parts), root.joinpath(*parts[:-1], parts[-1] + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _hub(path: str, name: str | None, split: str, column: str, data_files: str | None = None) -> list[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise BesaError("loading from the hub needs the 'datasets' package") from exc
    try:
        kwargs = {"data_files": {split: data_files}} if data_files else {}
        ds = datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BesaError(
            f"{path} ({split}) is not in the data directory (set BESA_DATA_DIR) and the hub failed: {first}"
        ) from None
    return list(ds[column])


def _wikitext(split: str) -> list[str]:
    local = _local("wikitext-2-raw-v1", f"{split}.jsonl")
    if local:
        return read_jsonl_texts(local)
    return _hub("Salesforce/wikitext", "wikitext-2-raw-v1", split, "text")


def _ptb(split: str) -> list[str]:
    local = _local("ptb", f"{'valid' if split == 'validation' else split}.txt")
    if local:
        return [line.strip() for line in read_utf8_text(local).splitlines() if line.strip()]
    return [s.strip() for s in _hub("ptb_text_only", "penn_treebank", split, "sentence")]


_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def _c4(split: str) -> list[str]:
    local = _local("c4", Path(_C4_FILES[split]).name.removesuffix(".gz"))
    if local:
        return read_jsonl_texts(local)
    return _hub("allenai/c4", None, split, "text", data_files=_C4_FILES[split])


def _enwiki(split: str) -> list[str]:
    local = _local("calibration", "enwiki-articles.jsonl")
    if local is None:
        raise BesaError(
            "calibration source 'enwiki-articles' needs BESA_DATA_DIR (calibration/enwiki-articles.jsonl)"
        )
    return read_jsonl_texts(local)


@dataclass(frozen=True)
class TextSource:
    """A named text set: how to load its documents, and how the evaluation protocol joins them."""

    load: Callable[[str], list[str]]
    joiner: str
    calib_split: str = "train"


CALIB_SOURCES: dict[str, TextSource] = {
    "wikitext2": TextSource(_wikitext, "\n\n"),
    "ptb": TextSource(_ptb, " "),
    "c4": TextSource(_c4, " "),
    "enwiki-articles": TextSource(_enwiki, "\n\n"),
}
EVAL_SOURCES: dict[str, TextSource] = {k: CALIB_SOURCES[k] for k in ("wikitext2", "ptb", "c4")}
