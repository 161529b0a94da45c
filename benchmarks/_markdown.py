"""Keep several scripts' sections in one BENCHMARKS.md: each script owns the text between its two markers."""

from __future__ import annotations

import argparse
from pathlib import Path


def excess_ratio(ppl: float, dense: float | None, reference: float | None) -> str:
    """``(ppl - dense) / (reference - dense)`` to two places, the share of a reference's perplexity excess over the
    dense model that ``ppl`` keeps (below 1: closer to dense); ``-`` where either is missing."""
    return f"{(ppl - dense) / (reference - dense):.2f}" if dense and reference else "-"


HEADER = "# Benchmarks\n\nEvery table below is written by a script in `benchmarks/`; its command is given with it.\n"


def replace_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``, appending if absent."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    if start not in text:  # a file from before the sections: keep only the header
        text = text if "<!--" in text else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def protocol_parser(doc: str | None, seed: bool = True) -> argparse.ArgumentParser:
    """A benchmark's parser with the shared protocol flags: the model, its calibration (64 x 512 tokens of
    ``enwiki-articles``, seed 0 unless ``seed`` is False) and the evaluation windows (512 tokens, all of them)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="enwiki-articles")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None, help="for quick trials only")
    return p
