"""Calibration and evaluation text: the documents of a named source (``besa.model.text_sources``) or of a text
file, the evaluation text joined as the protocol does, the calibration windows cut from the documents, and the
BOS token put in front of each window.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from besa.errors import BesaError
from besa.model.text_sources import CALIB_SOURCES, EVAL_SOURCES, read_jsonl_texts, read_utf8_text
from besa.settings.config import PruneConfig
from besa.settings.sections import CalibrationSettings
from besa.settings.values import check_choice

__all__ = [
    "eval_name",
    "is_text_file",
    "load_calibration_documents",
    "load_eval_text",
    "read_text_file",
    "resolve_bos",
    "sample_calibration",
    "sample_windows",
    "with_bos",
    "work_ahead",
]


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


def sample_calibration(
    documents: list[str], tokenizer: Any, settings: CalibrationSettings, bos: int | None
) -> torch.Tensor:
    """The run's calibration windows (N, T), drawn from ``documents`` as ``settings`` says; with ``bos`` each is
    that token then ``T - 1`` tokens of a document."""

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if bos is None:
        return sample_windows(documents, tokenize, settings.nsamples, settings.seqlen, settings.seed)
    if settings.seqlen < 2:
        raise BesaError("--seqlen must be at least 2 when windows start with BOS (--bos)")
    return with_bos(
        sample_windows(documents, tokenize, settings.nsamples, settings.seqlen - 1, settings.seed), bos
    )


def resolve_bos(mode: str, tokenizer: Any) -> int | None:
    """The token id every window starts with, or ``None`` for bare windows.

    ``auto``: the tokenizer's BOS if the tokenizer adds one to a text by itself (Gemma, LLaMA-3: the first position
    is the attention sink these models expect), else none; ``always``: the tokenizer's BOS; ``never``: none.
    """
    check_choice("bos", mode)
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


def work_ahead(config: PruneConfig, shape: tuple[int, int] | None, needs_data: bool, uses_data: bool) -> str:
    """The line a run says before its work about how much of it there is: windows x tokens through every block
    (``shape``: given token ids, else the config's), and how many passes (``uses_data``: the method's own, else
    only the allocation's statistics pass)."""
    if not needs_data:
        return f"besa prune: {config.method} needs no calibration data"
    n, length = shape if shape is not None else (config.calibration.nsamples, config.calibration.seqlen)
    passes = (
        "statistics, pruning and propagation passes" if uses_data else "one statistics pass (the allocation)"
    )
    return (
        f"besa prune: {n} calibration windows x {length} tokens = {n * length:,} tokens through every block "
        f"({passes}); --nsamples/--seqlen set how many"
    )
