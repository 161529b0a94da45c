"""Keep several scripts' sections in one BENCHMARKS.md: each script owns the text between its two markers."""

from __future__ import annotations

from pathlib import Path

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
