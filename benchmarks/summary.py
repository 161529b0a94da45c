"""The summary at the top of BENCHMARKS.md: every method's defaults at every setting, the held-out model and
texts, and what BESA's defaults cost against SparseGPT, read from the results the other scripts stored.

Nothing is pruned or scored here. The rows come from ``benchmarks/results/beyond.json`` (the configurations of
``beyond.py`` that pass no flag: SparseGPT, Wanda and ADMM where they ran, BESA; WikiText-2 test and PTB test),
``baselines.json`` (the methods ``beyond.json`` has no run of, magnitude and Wanda, run with no flag; WikiText-2
test only) and ``unseen.json`` (Gemma-3-270M). Excess ratios and time ratios are computed as ``beyond.py`` and
``unseen.py`` compute them, so the figures are those of their sections.

    BESA_DATA_DIR=../shared/data python benchmarks/summary.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import excess_ratio, replace_section  # noqa: E402
from beyond import CONFIGS, EVAL_ALSO, SETTINGS, _reference_s  # noqa: E402
from beyond import build_parser as beyond_parser  # noqa: E402
from unseen import TEXT_LABELS, TEXTS  # noqa: E402
from unseen import build_parser as unseen_parser  # noqa: E402
from unseen import table_rows as unseen_rows  # noqa: E402

SECTION = "summary"
TITLE = "# Benchmarks"
METHODS = ["magnitude", "wanda", "sparsegpt", "admm", "besa"]  # table order
LABELS = {
    "magnitude": "magnitude",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    "admm": "ADMM",
    "besa": "**BESA**",
}
DEFAULT_CONFIGS = {method: name for name, (method, flags, _) in CONFIGS.items() if not flags}
"""``beyond.py``'s configurations that pass no flag, by method: each method's defaults."""


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _ppl(row: dict | None) -> float | None:
    return None if row is None or "ppl" not in row else row["ppl"]["ppl"]


def _also(row: dict | None) -> float | None:
    """The row's PTB test perplexity (``beyond.py``'s second text), ``None`` where it was not scored."""
    return ((row or {}).get("also", {}).get(EVAL_ALSO) or {}).get("ppl")


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def default_rows(beyond: dict, baselines: dict) -> list[dict]:
    """One row per setting and method run with no flag: from ``beyond`` where it has the run (the machine and
    invocations of BESA's rows, both texts), else from ``baselines`` (``method@setting``, no label, no flags).
    Where a ``baselines`` row is shown, that file's SparseGPT row comes too: it is the other rows' reference
    (another machine, whose rounding moves SparseGPT's perplexity)."""
    rows = []
    for setting in SETTINGS:
        ours = {m: beyond.get(f"{name}@{setting}") for m, name in DEFAULT_CONFIGS.items()}
        theirs = {m: baselines.get(f"{m}@{setting}") for m in METHODS}
        theirs = {m: r for m, r in theirs.items() if r is not None and not r.get("flags")}
        needed = {m for m in theirs if ours.get(m) is None}
        if needed - {"sparsegpt"}:
            needed.add("sparsegpt")
        for method in METHODS:
            if ours.get(method) is not None:
                rows.append({**ours[method], "setting": setting, "method": method, "source": "beyond"})
            if method in needed and method in theirs:
                rows.append({**theirs[method], "setting": setting, "method": method, "source": "baselines"})
    return rows


def defaults_table(beyond: dict, baselines: dict, marks: dict[str, str]) -> list[str]:
    """Dense, then every setting's rows; each excess ratio against the SparseGPT row of the same results file
    (``beyond.py``'s own for its rows), each time ratio as ``beyond.py`` takes it (same invocation only)."""
    dense = baselines.get("dense", {}).get("ppl", {}).get("ppl")
    dense_also = _also(beyond.get("dense"))
    lines = [
        "| setting | method | WikiText-2 test ppl | excess ratio | PTB test ppl | excess ratio | prune s |"
        " time ratio to SparseGPT | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| - | dense | {_f(dense)} | - | {_f(dense_also)} | - | - | - | - |",
    ]
    for row in default_rows(beyond, baselines):
        setting, method = row["setting"], row["method"]
        if row["source"] == "beyond":
            reference = beyond.get(f"{DEFAULT_CONFIGS['sparsegpt']}@{setting}")
        else:
            reference = baselines.get(f"sparsegpt@{setting}")
        ppl, also = _ppl(row), _also(row)
        excess = excess_ratio(ppl, dense, _ppl(reference))
        excess_also = "-" if also is None else excess_ratio(also, dense_also, _also(reference))
        time_ratio = "-"
        if row["source"] == "beyond":
            reference_s = _reference_s(beyond, setting, row["invocation"])
            time_ratio = _f(reference_s and row["prune_s"] / reference_s) + (
                " \u2021" if row.get("note") else ""
            )
        lines.append(
            f"| {setting} | {LABELS[method]}{marks.get(row.get('machine', ''), '')} | {_f(ppl)} | {excess} |"
            f" {_f(also)} | {excess_also} | {row['prune_s']:.0f} | {time_ratio} | {row['peak_rss_mib']:.0f} |"
        )
    return lines


def unseen_table(unseen: dict, marks: dict[str, str]) -> list[str]:
    """The held-out rows as ``unseen.py`` writes them: each text's excess ratio, a time ratio only within one
    invocation."""
    lines = [
        "| model | setting | method | "
        + " | ".join(f"{TEXT_LABELS[t]} ppl (excess ratio)" for t in TEXTS)
        + " | prune s | time ratio to SparseGPT | peak RSS MiB |",
        "|---|---|---|" + "---:|" * (len(TEXTS) + 3),
    ]
    lines += unseen_rows(unseen, marks)
    return lines


def cost_table(beyond: dict, unseen: dict, model: str) -> list[str]:
    """BESA's defaults against SparseGPT timed in the same invocation: that invocation's SparseGPT row, or the
    prune-only SparseGPT timing it made (``beyond.py``'s ``_reference_s``); a run without either has no ratio."""
    lines = [
        "| model | setting | BESA prune s | SparseGPT prune s | time ratio | peak RSS MiB, BESA / SparseGPT |"
        " invocation (processes at a time) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for setting in SETTINGS:
        besa = beyond.get(f"{DEFAULT_CONFIGS['besa']}@{setting}")
        if besa is None:
            continue
        invocation = besa["invocation"]
        row = beyond.get(f"{DEFAULT_CONFIGS['sparsegpt']}@{setting}")
        reference = (
            row if row and row["invocation"] == invocation else beyond.get(f"timing:{invocation}@{setting}")
        )
        reference_s = _reference_s(beyond, setting, invocation)
        rss = _rss(besa, reference) if reference_s else "-"
        source = "its table row" if reference is row else "a prune-only SparseGPT run"
        lines.append(
            f"| {model} | {setting} | {besa['prune_s']:.0f} | {_f(reference_s, '.0f')} |"
            f" {_f(reference_s and besa['prune_s'] / reference_s)} | {rss} |"
            f" {invocation} ({besa.get('streams', 1)}); SparseGPT: {source if reference_s else 'none'} |"
        )
    for key, besa in unseen.items():
        if "/besa@" not in key:
            continue
        reference = unseen.get(key.replace("/besa@", "/sparsegpt@"))
        same = reference is not None and reference["invocation"] == besa["invocation"]
        other = "" if same or reference is None else f"; SparseGPT ran in {reference['invocation']}: no ratio"
        lines.append(
            f"| {besa['model']} | {besa['setting']} | {besa['prune_s']:.0f} |"
            f" {_f(reference['prune_s'] if same else None, '.0f')} |"
            f" {_f(besa['prune_s'] / reference['prune_s'] if same else None)} |"
            f" {_rss(besa, reference) if same else '-'} | {besa['invocation']}{other} |"
        )
    return lines


def _rss(row: dict, reference: dict) -> str:
    return f"{row['peak_rss_mib']:.0f} / {reference['peak_rss_mib']:.0f}"


def _values(rows: Iterable, pick: Callable) -> str:
    """The distinct values ``pick`` reads from ``rows``, joined by ``/``."""
    return "/".join(map(str, sorted({v for v in map(pick, rows) if v is not None}))) or "-"


def render(beyond: dict, baselines: dict, unseen: dict) -> str:
    """The summary section's body."""
    protocol, held = beyond_parser().parse_args([]), unseen_parser().parse_args([])
    rows = default_rows(beyond, baselines)
    held_rows = [r for k, r in unseen.items() if not k.endswith("/dense")]
    # the machine of BESA's rows unmarked, any other marked as the baselines table marks its machines
    found = [r["machine"] for r in rows + held_rows if r.get("machine")]
    first = [r["machine"] for r in rows if r["source"] == "beyond" and r.get("machine")]
    machines = sorted(set(found), key=lambda m: (-first.count(m), -found.count(m), m))
    marks = {m: " " + "\u2020" * i for i, m in enumerate(machines) if i}
    sources = {
        m: sorted(
            {f"`{r['source']}.json`" for r in rows if r.get("machine") == m}
            | ({"`unseen.json`"} if any(r.get("machine") == m for r in held_rows) else set())
        )
        for m in machines
    }
    machine_text = "; ".join(
        f"{m}{f' (rows marked{marks[m]})' if m in marks else ''}: {', '.join(sources[m])}" for m in machines
    )
    ptb = [r["also"][EVAL_ALSO] for r in rows if r.get("also", {}).get(EVAL_ALSO)]
    lines = [
        "## Summary: every method's defaults, and what BESA's cost",
        "",
        f"Each method run with no flag on `{protocol.model}`. `excess ratio` is (ppl - dense) / (SparseGPT's ppl -"
        " dense) at the same setting and on the same text, against the SparseGPT row of the same results file"
        " (below 1: closer to dense than SparseGPT). The first table's unmarked rows are those of *Beyond BESA*"
        " below (`beyond.json`); magnitude and Wanda, which it has no run of, come from the first baselines table"
        " (`baselines.json`, now in `benchmarks/NOTES.md`) with that table's SparseGPT as their reference. From 70%"
        " sparsity BESA's defaults fit each block to the dense block on its pruned input in the refit and choose"
        " the weights within the learned row counts by ADMM (PTB valid preferred both); *Beyond BESA* has the runs"
        " without them, and each stage alone. A setting with a SparseGPT row and no BESA row has not been run with"
        " BESA's defaults yet.",
        "",
        *defaults_table(beyond, baselines, marks),
        "",
        "\u2021: the row has a note in *Beyond BESA* below: where it came from (a run of the same settings under"
        " their flags) and, where other processes shared the cores, that its time overstates or understates the cost.",
        "",
        "Held out: a model of another family, and a text no setting was tuned on (*Unseen model and text* below).",
        "",
        *unseen_table(unseen, marks),
        "",
        "Cost: BESA's defaults against SparseGPT timed in the same invocation of the script, under the same load.",
        "",
        *cost_table(beyond, unseen, protocol.model),
        "",
        f"Protocol: model `{protocol.model}`; calibration {protocol.nsamples} x {protocol.seqlen} tokens of"
        f" `{protocol.calib}` (seed {protocol.seed}), the Wikipedia articles of `shared/data` (C4 is not reachable"
        f" offline); WikiText-2 test at seqlen {_values(rows, lambda r: r['ppl'].get('seqlen'))}, all"
        f" {_values(rows, lambda r: r['ppl'].get('windows'))} windows, and PTB test at the same seqlen, all"
        f" {_values(ptb, lambda p: p.get('windows'))} windows (BESA's settings were chosen on PTB valid, never on a"
        f" test set); the held-out rows ({_values(held_rows, lambda r: r['model'])}) calibrate the same way and"
        f" score the first {_values(held_rows, lambda r: r['scores'][TEXTS[0]].get('windows'))} windows of"
        f" {held.eval_seqlen} tokens of each text"
        f" ({', '.join(TEXT_LABELS[t] for t in TEXTS)}). Each run is one `besa prune` process with"
        f" {_values(rows + held_rows, lambda r: r['threads'])} torch thread(s),"
        f" {_values(rows, lambda r: r.get('streams', r.get('parallel_jobs')))} benchmark process(es) at a time;"
        " `prune s` is the pruning stage from its report. Machines: "
        + machine_text
        + ". Command (it reads the stored results and runs nothing):",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/summary.py",
        "```",
    ]
    return "\n".join(lines)


def put_first(path: Path) -> None:
    """Give the summary's markers their place under the title where the file has none yet (``replace_section``
    would append a new section at the end)."""
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{TITLE}\n"
    if start in text and end in text:
        return
    rest = text[len(TITLE) :] if text.startswith(TITLE + "\n") else "\n" + text
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{TITLE}\n\n{start}\n{end}\n\n{rest.lstrip()}", encoding="utf-8")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results = ROOT / "benchmarks" / "results"
    p.add_argument("--beyond", default=str(results / "beyond.json"))
    p.add_argument("--baselines", default=str(results / "baselines.json"))
    p.add_argument("--unseen", default=str(results / "unseen.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    body = render(*(_load(Path(p)) for p in (args.beyond, args.baselines, args.unseen)))
    put_first(Path(args.markdown))
    replace_section(Path(args.markdown), SECTION, body)


if __name__ == "__main__":
    main()
