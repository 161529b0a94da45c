"""Joint pruning and quantization benchmark: 50% sparsity with 4- and 3-bit weights (group 128) on SmolLM2-135M.

Rows: Wanda then round-to-nearest, SparseGPT quantizing inside its OBS sweep, BESA then round-to-nearest, and
BESA learning its clipping jointly with the masks. Same protocol as ``baselines.py`` (64 x 512 calibration tokens
of enwiki-articles, seed 0; WikiText-2 test at seqlen 512, all windows). Each run is its own ``besa prune`` and
``besa eval`` process; finished runs are kept in a JSON file and skipped on a rerun.

    BESA_DATA_DIR=../shared/data python benchmarks/joint_quant.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _besa as _cli  # noqa: E402
from baselines import _machine, _machine_lines, _machine_marks  # noqa: E402

BESA_FLAGS = ["--optimizer", "adamw", "--lr", "0.05"]
# the clipping's step for the OBS rows by weight width, chosen on PTB valid (BENCHMARKS.md, tuning table's
# -w4g128 / -w3g128 rows); the frozen-weight rows use the 4-bit choice at both widths
OBS_CLIP_LR = {4: "0.01", 3: "0.05"}
ROWS = {
    "wanda+rtn": ("Wanda, then RTN", ["--method", "wanda"]),
    "sparsegpt-joint": ("SparseGPT, quantizing while pruning", ["--method", "sparsegpt"]),
    "sparsegpt-joint-parallel": (
        "SparseGPT, one dense pass per block (before issue 14)",
        ["--method", "sparsegpt", "--within-block", "parallel"],
    ),
    "besa+rtn": ("BESA, then RTN", ["--method", "besa", "--quant-mode", "rtn", *BESA_FLAGS]),
    "besa-joint": (
        "joint BESA, frozen weights (the paper's form)",
        ["--method", "besa", "--weight-update", "none", *BESA_FLAGS, "--clip-lr", "0.01"],
    ),
    "besa-obs-joint": (
        "**joint BESA** + OBS update (the default with --wbits)",
        ["--method", "besa", "--weight-update", "obs", *BESA_FLAGS, "--clip-lr", "{obs_clip_lr}"],
    ),
    # other clipping steps, kept for the record, not run by default
    "besa-joint-cliplr0.05": (
        "joint BESA, frozen weights, clip lr 0.05",
        ["--method", "besa", "--weight-update", "none", *BESA_FLAGS, "--clip-lr", "0.05"],
    ),
    "besa-obs-joint-cliplr0.05": (
        "joint BESA + OBS update, clip lr 0.05",
        ["--method", "besa", "--weight-update", "obs", *BESA_FLAGS, "--clip-lr", "0.05"],
    ),
    "besa-obs-joint-cliplr0.01": (
        "joint BESA + OBS update, clip lr 0.01",
        ["--method", "besa", "--weight-update", "obs", *BESA_FLAGS, "--clip-lr", "0.01"],
    ),
}
DEFAULT_ROWS = [r for r in ROWS if "-cliplr" not in r and "-parallel" not in r]


def row_flags(row: str, bits: int) -> list[str]:
    """A row's ``besa prune`` flags at ``bits`` (the OBS rows' clip lr depends on the width)."""
    return [OBS_CLIP_LR.get(bits, "0.01") if f == "{obs_clip_lr}" else f for f in ROWS[row][1]]


def one_run(args: argparse.Namespace, row: str, bits: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        _cli(
            "prune", args.model, "--sparsity", "0.5", "--wbits", str(bits), "--group-size", str(args.group_size),
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0", "--calib", args.calib,
             "--no-checkpoint", "--out", f"{tmp}/model", *row_flags(row, bits),
            threads=threads,
        )  # fmt: skip
        report = json.loads(Path(f"{tmp}/model/besa_report.json").read_text())
        windows = ["--max-windows", str(args.max_windows)] if args.max_windows else []
        _cli(
            "eval", f"{tmp}/model", "--ppl", "wikitext2", "--seqlen", "512", "--json", f"{tmp}/ppl.json", *windows,
            threads=threads,
        )  # fmt: skip
        ppl = json.loads(Path(f"{tmp}/ppl.json").read_text())["wikitext2"]
    return {
        "ppl": ppl,
        "prune_s": report["timings_s"]["prune"],
        "peak_rss_mib": report["memory"]["peak_rss_mib"],
        "sparsity": report["sparsity"]["pruned_layers"],
        "threads": threads,
        "machine": _machine(),
    }


SHORT = {
    "wanda+rtn": "Wanda+RTN",
    "sparsegpt-joint": "SparseGPT joint",
    "besa+rtn": "BESA then RTN",
    "besa-joint": "joint BESA\n(frozen weights)",
    "besa-obs-joint": "joint BESA\n+ OBS update",
}


def draw_chart(args: argparse.Namespace, results: dict, path: Path) -> bool:
    """Grouped bars of the default rows' perplexity, one group per bit width (log scale); False if none ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in DEFAULT_ROWS if any(f"{r}@w{b}" in results for b in args.bits)]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs, ys = [], []
        for j, bits in enumerate(args.bits):
            r = results.get(f"{row}@w{bits}")
            if r is not None:
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(r["ppl"]["ppl"])
        bars = ax.bar(xs, ys, width, label=SHORT.get(row, row).replace("\n", " "))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(args.bits)), [f"{b}-bit weights" for b in args.bits])
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(f"SmolLM2-135M, 50% sparsity, group {args.group_size}: lower is better", fontsize=10)
    ax.legend(fontsize=7, ncol=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    lines = [
        f"## Joint pruning and quantization (50% sparsity, group {args.group_size})",
        "",
        f"SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} tokens of `{args.calib}` (seed 0), WikiText-2 "
        "test perplexity at seqlen 512"
        + (f", first {args.max_windows} windows." if args.max_windows else ", all windows."),
        "Weight-only asymmetric uniform quantization; the saved weights are the dequantized ones (exact zeros kept).",
        "SmolLM2's input widths 576 and 1536 are not all multiples of 128: a row's last group is then 64 wide.",
        "Counted sparsity can exceed 50% slightly: survivors that round to 0 count as zeros.",
        "",
        *_machine_lines(results),
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/joint_quant.py"
        + (f" --jobs {args.jobs}" if args.jobs != 1 else ""),
        "```",
        "",
        "| bits | method | WikiText-2 ppl | counted sparsity | prune s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    marks = _machine_marks(results)
    for bits in args.bits:
        for row, (label, _) in ROWS.items():
            flags = row_flags(row, bits)
            r = results.get(f"{row}@w{bits}")
            if r is None and row not in DEFAULT_ROWS:
                continue
            if r is None:
                lines.append(f"| {bits} | {label} | (not run yet) | | | |")
                continue
            lines.append(
                f"| {bits} | {label}{marks.get(r.get('machine'), '')} (`{' '.join(flags)}`) | {r['ppl']['ppl']:.2f} |"
                f" {r['sparsity']:.4f} |"
                f" {r['prune_s']:.0f} | {r['peak_rss_mib']:.0f} |"
            )
    chart = Path(args.results).with_suffix(".png")
    if draw_chart(args, results, chart):
        try:
            where = chart.resolve().relative_to(Path(args.markdown).resolve().parent)
        except ValueError:
            where = chart
        lines += ["", f"![perplexity by method and bit width]({where.as_posix()})"]
    replace_section(Path(args.markdown), "joint-quant", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="enwiki-articles")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[4, 3])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    p.add_argument("--max-windows", type=int, default=None, help="for quick trials only")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, the cores split between them")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "joint_quant.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def job(row: str, bits: int) -> None:
        key = f"{row}@w{bits}"
        if key in results:
            return
        result = one_run(args, row, bits, threads)
        with lock:
            results[key] = result
            path.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(args, results)

    if not args.render_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(job, row, bits) for bits in args.bits for row in args.rows.split(",")]
            for f in futures:
                f.result()
    write_markdown(args, results)


if __name__ == "__main__":
    main()
