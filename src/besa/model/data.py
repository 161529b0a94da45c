"""Text sources for calibration and evaluation, resolved from a local data directory or else the hub.

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
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from besa.errors import BesaError

__all__ = [
    "CALIB_SOURCES",
    "EVAL_SOURCES",
    "data_dir",
    "load_calibration_documents",
    "load_eval_text",
    "sample_windows",
    "read_jsonl_texts",
    "read_utf8_text",
    "BOS_MODES",
    "resolve_bos",
    "with_bos",
]

BOS_MODES = ("auto", "always", "never")


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


def is_text_file(source: str) -> bool:
    """Whether ``source`` names a text file (``.jsonl`` with a ``text`` field, ``.jsonl.gz``, or ``.txt``)."""
    return Path(source).suffix in (".jsonl", ".txt") or source.endswith(".jsonl.gz")


def read_text_file(source: str, role: str) -> list[str]:
    """The non-empty documents of a ``.jsonl``/``.jsonl.gz`` (``text`` field per line) or ``.txt`` (one document)
    file; ``role`` names it in errors (``calibration file``, ``evaluation file``)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise BesaError(f"{role} {source!r} does not exist")
    docs = [read_utf8_text(path)] if path.suffix == ".txt" else read_jsonl_texts(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise BesaError(f"{role} {source!r} holds no text")
    return docs


def load_calibration_documents(source: str) -> list[str]:
    """Documents of a named source (its train split) or of a ``.jsonl`` (``text`` field) / ``.txt`` file."""
    if source in CALIB_SOURCES:
        spec = CALIB_SOURCES[source]
        docs = [d for d in spec.load(spec.calib_split) if d.strip()]
        if not docs:
            raise BesaError(f"calibration source {source!r} holds no text")
        return docs
    if not is_text_file(source):
        raise BesaError(
            f"unknown calibration source {source!r}: use {', '.join(CALIB_SOURCES)} or a .jsonl/.txt file"
        )
    return read_text_file(source, "calibration file")


def eval_name(name: str) -> str:
    """The name a dataset's results are kept under: the file name for a text file, else ``name`` itself."""
    return Path(name).name if is_text_file(name) else name


def load_eval_text(name: str, split: str = "test") -> str:
    """The evaluation text of ``name`` joined as the SparseGPT/Wanda/BESA protocol does.

    ``name`` may carry its split, ``ptb:valid`` or ``wikitext2:validation`` (for tuning without the test set), or
    be a ``.jsonl`` (``text`` field) / ``.txt`` file, whose documents are joined with ``"\n\n"`` like WikiText's.
    """
    if is_text_file(name):
        return "\n\n".join(read_text_file(name, "evaluation file"))
    name, _, given_split = name.partition(":")
    split = given_split or split
    if split == "valid":
        split = "validation"
    if name not in EVAL_SOURCES:
        raise BesaError(
            f"unknown evaluation dataset {name!r}: choose from {', '.join(EVAL_SOURCES)} or a .jsonl/.txt file"
        )
    if split not in ("train", "validation", "test"):
        raise BesaError(f"unknown split {split!r} of {name}: choose train, validation (valid) or test")
    spec = EVAL_SOURCES[name]
    if name == "c4":
        return spec.joiner.join(spec.load("validation")[:1100])
    return spec.joiner.join(spec.load(split))


def sample_windows(
    documents: list[str], tokenize: Callable[[str], list[int]], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, each from a random document longer than ``seqlen`` at a random
    offset (the C4 sampler of SparseGPT/Wanda/BESA), seeded. Documents are tokenized lazily, once each.

    If no document is long enough, windows are cut from all documents joined with blank lines.
    """
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}

    def tokens_of(i: int) -> list[int]:
        if i not in cache:
            cache[i] = tokenize(documents[i])
        return cache[i]

    long_enough = None
    if len(documents) > 1:
        # Reject short documents by drawing, as the reference samplers do, but give up after a bounded number of draws.
        long_enough = [
            i for i in range(len(documents)) if len(documents[i]) > seqlen
        ]  # chars >= tokens, cheap filter
    windows: list[list[int]] = []
    if long_enough:
        misses = 0
        while len(windows) < nsamples and misses < 50 * nsamples:
            toks = tokens_of(rng.choice(long_enough))
            if len(toks) <= seqlen:
                misses += 1
                continue
            start = rng.randint(0, len(toks) - seqlen - 1)
            windows.append(toks[start : start + seqlen])
    if len(windows) < nsamples:
        joined = tokenize("\n\n".join(documents))
        if len(joined) <= seqlen:
            raise BesaError(f"calibration text has only {len(joined)} tokens; --seqlen {seqlen} needs more")
        while len(windows) < nsamples:
            start = rng.randint(0, len(joined) - seqlen - 1)
            windows.append(joined[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def resolve_bos(mode: str, tokenizer: Any) -> int | None:
    """The token id every window starts with, or ``None`` for bare windows.

    ``auto``: the tokenizer's BOS if the tokenizer adds one to a text by itself (Gemma, LLaMA-3: the first position
    is the attention sink these models expect), else none; ``always``: the tokenizer's BOS; ``never``: none.
    """
    if mode not in BOS_MODES:
        raise BesaError(f"unknown --bos {mode!r}: choose {', '.join(BOS_MODES)}")
    if mode == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always":
        if bos is None:
            raise BesaError("--bos always: this tokenizer has no BOS token; use --bos auto or never")
        return int(bos)
    if bos is None:
        return None
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds = len(full) > len(plain) and full[0] == bos and full[1 : 1 + len(plain)] == plain
    return int(bos) if adds else None


def with_bos(windows: torch.Tensor, bos: int) -> torch.Tensor:
    """Windows (N, T) with ``bos`` put in front of each: (N, T + 1)."""
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)
