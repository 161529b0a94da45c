"""benchmarks/summary.py: its figures are those the beyond and unseen sections render from the same stored results,
its section stays first in BENCHMARKS.md, and every benchmark section has one home (BENCHMARKS.md or
benchmarks/NOTES.md) that its script writes to."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def bench():
    before = set(sys.modules)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield {name: importlib.import_module(name) for name in ("summary", "beyond", "unseen", "_markdown")}
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        for name in ("summary", "beyond", "unseen", "baselines", "_markdown"):  # the scripts, not packages
            if name not in before:
                sys.modules.pop(name, None)


def _load(name: str) -> dict:
    path = RESULTS / name
    if not path.exists():
        pytest.skip(f"no stored {name}")
    return json.loads(path.read_text())


def _cells(table_line: str) -> list[str]:
    return [c.strip() for c in table_line.strip().strip("|").split("|")]


def test_summary_figures_are_the_beyond_and_unseen_sections(bench, tmp_path):
    beyond, baselines, unseen = _load("beyond.json"), _load("baselines.json"), _load("unseen.json")
    md = tmp_path / "B.md"
    args = bench["beyond"].build_parser().parse_args(["--markdown", str(md)])
    bench["beyond"].write_table(args, beyond)
    args = bench["unseen"].build_parser().parse_args(["--markdown", str(md)])
    bench["unseen"].write_markdown(args, unseen)
    text = md.read_text()
    body = bench["summary"].render(beyond, baselines, unseen)

    # the beyond section's rows of each method's defaults: setting -> (ppl, excess, time ratio) and PTB (ppl, excess)
    labels = {label: name for name, (_, flags, label) in bench["beyond"].CONFIGS.items() if not flags}
    wt2, ptb = {}, {}
    for line in text.splitlines():
        cells = _cells(line) if line.startswith("| ") else []
        if len(cells) == 10 and cells[1] in labels:
            wt2[(cells[0], labels[cells[1]])] = (cells[3], cells[4], cells[8])
        elif len(cells) == 5 and cells[1] in labels:
            ptb[(cells[0], labels[cells[1]])] = (cells[2], cells[3])
    assert wt2 and ptb
    names = {label: method for method, label in bench["summary"].LABELS.items()}
    noted = {
        (r["setting"], r["method"])
        for r in bench["summary"].default_rows(beyond, baselines)
        if r["source"] == "beyond" and r.get("note")
    }
    assert noted  # the stored results have rows with notes, so the mark below is exercised both ways
    seen = 0
    for line in body.splitlines():
        cells = _cells(line) if line.startswith("| ") else []
        if len(cells) == 9 and cells[1] in names:  # the unmarked rows: beyond.json's
            key = (cells[0], names[cells[1]])
            # a time ratio is marked ‡ exactly where its row has a note in the beyond section
            assert cells[7].endswith(" \u2021") == (key in noted), key
            assert (cells[2], cells[3], cells[7].removesuffix(" \u2021")) == wt2[key], key
            assert (cells[4], cells[5]) == ptb[key], key
            seen += 1
    assert seen == len(wt2)

    # the held-out rows are the unseen section's, cell for cell
    unseen_rows = [
        line for line in text.split("<!-- unseen:start -->")[1].splitlines() if line.startswith("| gemma")
    ]
    assert unseen_rows and all(line in body for line in unseen_rows)


def test_summary_reads_no_figure_it_was_not_given(bench):
    body = bench["summary"].render({}, {}, {})
    assert "| - | dense | - | - | - | - | - | - | - |" in body
    assert not re.search(r"\| 0\.5 \|", body)


def test_summary_goes_first_and_stays_there(bench, tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nintro\n\n<!-- beyond:start -->\nold\n<!-- beyond:end -->\n")
    for _ in range(2):
        bench["summary"].put_first(md)
        bench["_markdown"].replace_section(md, "summary", "## Summary\n\nbody")
    text = md.read_text()
    assert text.startswith(
        "# Benchmarks\n\n<!-- summary:start -->\n## Summary\n\nbody\n<!-- summary:end -->\n"
    )
    assert text.count("<!-- summary:start -->") == 1
    assert "intro\n\n<!-- beyond:start -->\nold\n<!-- beyond:end -->" in text


def test_every_section_has_one_home_its_script_writes():
    files = {"BENCHMARKS.md": ROOT / "BENCHMARKS.md", "NOTES.md": ROOT / "benchmarks" / "NOTES.md"}
    if not all(p.exists() for p in files.values()):
        pytest.skip("no BENCHMARKS.md / benchmarks/NOTES.md")
    homes: dict[str, list[str]] = {}
    for name, path in files.items():
        text = path.read_text()
        for section in re.findall(r"<!-- ([\w-]+):start -->", text):
            assert text.count(f"<!-- {section}:end -->") == 1, section
            homes.setdefault(section, []).append(name)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert homes["summary"] == ["BENCHMARKS.md"]
    assert (ROOT / "BENCHMARKS.md").read_text().split("\n", 3)[2] == "<!-- summary:start -->"
    # a script whose sections live in NOTES.md writes there by default
    notes_scripts = {"baselines": "baselines.py", "owl": "baselines.py", "besa-tuning": "tune_besa.py",
                     "sparsegpt_parity": "sparsegpt_parity.py", "sparsegpt_parity_ptb": "sparsegpt_parity.py",
                     "expert-min-tokens": "expert_min_tokens.py"}  # fmt: skip
    for section, script in notes_scripts.items():
        assert homes.get(section) == ["NOTES.md"], section
        source = (ROOT / "benchmarks" / script).read_text()
        assert 'p.add_argument("--markdown", default=str(ROOT / "benchmarks" / "NOTES.md"))' in source, script
