"""Memory benchmark: a BESA run with its calibration activations in RAM, and with a budget that forces spilling.

Each run is a separate ``besa prune`` process, so each peak resident memory is that run's own. Modes are
interleaved (ram, spill, no-checkpoint, ram, ...) so that drift of the shared machine hits them alike; the table
gives medians of the repeats and the ratios of the medians. Finished runs are kept in a JSON file and skipped
when the script is rerun.

    BESA_DATA_DIR=../shared/data python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402

MODES = {
    "ram": ("activations in RAM (no budget), checkpoints on", []),
    "spill": ("--max-memory 16MiB: activations spilled to disk, checkpoints on", ["--max-memory", "16MiB"]),
    "no-checkpoint": ("activations in RAM, --no-checkpoint", ["--no-checkpoint"]),
}


def one_run(args: argparse.Namespace, mode: str) -> dict:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cmd = [
            sys.executable, "-m", "besa.cli", "prune", args.model, "--method", "besa", "--sparsity", "0.5",
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--optimizer", "adamw", "--lr", "0.05",
            "--out", f"{tmp}/model", "--no-progress", *MODES[mode][1],
        ]  # fmt: skip
        print("+", shlex.join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        report = json.loads(Path(f"{tmp}/model/besa_report.json").read_text())
    acts = report["memory"]["activations"]
    return {
        "prune_s": report["timings_s"]["prune"],
        "peak_rss_mib": report["memory"]["peak_rss_mib"],
        "acts_peak_mib": acts["peak_in_ram_mib"],
        "spilled_mib": acts["spilled_mib"],
        "spilled_batches": acts["spilled_batches"],
    }


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    lines = [
        "## Memory: activations in RAM vs spilled to disk (BESA, SmolLM2-135M)",
        "",
        f"BESA 50% (`--optimizer adamw --lr 0.05`), calibration {args.nsamples} x {args.seqlen} tokens of "
        "`enwiki-articles`, fp32 on the CPU. Peak RSS is the whole `besa prune` process (model, optimizer, "
        "activations); `acts in RAM` is the peak of the activation stores alone, as the budget counts them.",
        f"Medians of {args.repeats} runs per mode, modes interleaved; ratios are of the medians in this one run.",
        "",
        f"Machine: {_machine()}.",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/memory.py"
        + ("" if args.nsamples == 32 else f" --nsamples {args.nsamples}"),
        "```",
        "",
        "| mode | runs | prune s (median) | vs ram | peak RSS MiB (median) | acts in RAM MiB | spilled MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = None
    for mode, (label, _) in MODES.items():
        runs = [r for k, r in results.items() if k.startswith(f"{mode}#")]
        if not runs:
            continue
        t = statistics.median(r["prune_s"] for r in runs)
        base = t if mode == "ram" else base
        ratio = f"{t / base:.2f}x" if base else "-"
        lines.append(
            f"| {label} | {len(runs)} | {t:.1f} | {ratio} | {statistics.median(r['peak_rss_mib'] for r in runs):.0f} |"
            f" {statistics.median(r['acts_peak_mib'] for r in runs):.1f} |"
            f" {statistics.median(r['spilled_mib'] for r in runs):.0f} |"
        )
    replace_section(Path(args.markdown), "memory", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workdir", default=None, help="where the temporary outputs and spill files go")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        for rep in range(args.repeats):
            for mode in args.modes.split(","):
                key = f"{mode}#{rep}"
                if key in results:
                    continue
                results[key] = one_run(args, mode)
                path.write_text(json.dumps(results, indent=2) + "\n")
                write_markdown(args, results)
    write_markdown(args, results)


if __name__ == "__main__":
    os.environ.setdefault("BESA_LOG_LEVEL", "WARNING")
    main()
