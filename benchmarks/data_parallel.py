"""Data parallel over torchrun: one process (all cores) against K processes (the cores split), same windows.

    BESA_DATA_DIR=../shared/data python benchmarks/data_parallel.py [--methods wanda,sparsegpt --repeats 3]

Each method prunes SmolLM2-135M to 50% on 64 x 512 windows of ``enwiki-articles`` (seed 0) with ``besa prune``
(one process, torch threads = the cores) and with ``torchrun --nproc-per-node K -m besa prune`` (gloo, threads =
cores / K each), ``--repeats`` times each, alternating; the table gives the median wall time of the whole command
and of the pruning stage, and whether the two outputs hold the same tensors bit for bit. Run it alone: times are
the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402


def run(args: argparse.Namespace, method: str, processes: int, out: Path) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    besa = ["-m", "besa", "prune", args.model, "--method", method, "--sparsity", "0.5", "--nsamples",
            str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", "enwiki-articles", "--seed", "0",
            "--out", str(out), "--no-progress", "--no-checkpoint"]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [sys.executable, *(launcher if processes > 1 else []), *besa]
    print("+", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    report = json.loads((out / "besa_report.json").read_text())
    return {"wall_s": wall, "prune_s": report["timings_s"]["prune"], "threads": threads}


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    lines = [
        "## Data parallel: one process against torchrun (`torchrun --nproc-per-node K -m besa prune`)",
        "",
        f"Model `{args.model}`; 50%, {args.nsamples} x {args.seqlen} tokens of `enwiki-articles` (seed 0). One process "
        "uses every core as torch threads; K processes split them (gloo). Medians of the repeats, run alternately, "
        "nothing else running; `wall s` is the whole command (start-up, model load, save), `prune s` the pruning "
        "stage from the report.",
        "",
        f"Machine: {_machine()}.",
        "",
        "```",
        *(
            f"BESA_DATA_DIR=../shared/data python benchmarks/data_parallel.py --methods {m} --repeats "
            f"{len(r['runs']['1'])}"
            for m, r in results.items()
        ),
        "```",
        "",
        "| method | processes x threads | repeats | wall s (median) | prune s (median) | prune speed-up | same tensors as "
        "one process |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for method, r in results.items():
        one = r["runs"]["1"]
        for k, runs in r["runs"].items():
            wall = statistics.median(x["wall_s"] for x in runs)
            prune = statistics.median(x["prune_s"] for x in runs)
            base = statistics.median(x["prune_s"] for x in one)
            same = "" if k == "1" else ("yes, bit for bit" if r.get("same") else "no: rounding (below)")
            lines.append(
                f"| {method} | {k} x {runs[0]['threads']} | {len(runs)} | {wall:.0f} | {prune:.0f} |"
                f" {base / prune:.2f}x | {same} |"
            )
    if args.note:
        lines += ["", args.note]
    replace_section(Path(args.markdown), "data_parallel", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "data_parallel.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--note", default="", help="a paragraph under the table")
    args = p.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.render_only:
        for method in args.methods.split(","):
            if method in results:
                continue
            runs: dict[str, list[dict]] = {"1": [], str(args.processes): []}
            with tempfile.TemporaryDirectory() as tmp:
                for i in range(args.repeats):
                    for k in (1, args.processes):
                        out = Path(tmp) / f"{k}-{i}"
                        runs[str(k)].append(run(args, method, k, out))
                same = same_tensors(Path(tmp) / "1-0", Path(tmp) / f"{args.processes}-0")
            results[method] = {"runs": runs, "same": same, "machine": _machine()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(args, results)
    write_markdown(args, results)


if __name__ == "__main__":
    main()
