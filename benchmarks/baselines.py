"""Baseline benchmark: dense, magnitude, Wanda and SparseGPT on one model under one protocol.

Each pruning run and each evaluation is a separate ``besa`` process, so the peak resident memory in each report is
that run's own. Finished runs are kept in a JSON file and skipped when the script is rerun, and ``BENCHMARKS.md``
is rewritten after every run, so a long benchmark can be interrupted and resumed.

    BESA_DATA_DIR=../shared/data python benchmarks/baselines.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import protocol_parser, replace_section  # noqa: E402

SETTINGS = ["0.5", "0.6", "0.7", "2:4"]
METHODS = ["magnitude", "wanda", "sparsegpt"]
ALL_METHODS = ["magnitude", "wanda", "sparsegpt", "besa"]  # table order
NO_NM: set[str] = set()  # methods without N:M support (BESA learns N:M patterns since issue 11)


def _besa(*args: str, threads: int | None = None) -> None:
    cmd = [sys.executable, "-m", "besa.cli", *args, "--no-progress"]
    print("+", shlex.join(cmd[2:]), flush=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, check=True, env=env)


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, torch {torch.__version__}, "
        "CPU fp32"
    )


def run(args: argparse.Namespace) -> None:
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    common_eval = ["--ppl", "wikitext2", "--seqlen", str(args.eval_seqlen)]
    if args.max_windows:
        common_eval += ["--max-windows", str(args.max_windows)]

    if args.render_only:
        write_markdown(args, results)
        return
    lock = threading.Lock()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def save() -> None:
        with lock:
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(args, results)

    def dense_job() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            _besa("eval", args.model, *common_eval, "--json", f"{tmp}/ppl.json", threads=threads)
            results["dense"] = {"ppl": json.loads(Path(f"{tmp}/ppl.json").read_text())["wikitext2"]}
        save()

    def prune_job(setting: str, method: str) -> None:
        results[_key(method, setting, args)] = {
            **prune_and_score(args, method, setting, _flags(method, args), threads, common_eval),
            "parallel_jobs": args.jobs,
        }
        save()

    jobs = [dense_job] if "dense" not in results and not args.no_dense else []
    jobs += [
        (lambda s=s, m=m: prune_job(s, m))
        for s in args.settings.split(",")
        for m in args.methods.split(",")
        if not (":" in s and m in NO_NM) and _key(m, s, args) not in results
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def prune_and_score(
    args: argparse.Namespace,
    method: str,
    setting: str,
    flags: list[str],
    threads: int | None,
    common_eval: list[str],
    dataset: str = "wikitext2",
    also: tuple[str, ...] = (),
    score: bool = True,
) -> dict:
    """One ``besa prune`` process at ``setting`` (a sparsity or ``N:M``) with ``flags``, then ``besa eval`` of its
    output (``common_eval``: its ``--ppl``/``--seqlen`` flags; ``dataset``: the result to read): the perplexity
    on ``dataset`` (and under ``also`` those of the other ``--ppl`` results named there), the counted sparsity,
    the prune stage's and the process's seconds, the peak RSS.
    ``args`` gives the model and the calibration (``model``, ``calib``, ``nsamples``, ``seqlen``, ``seed``).
    ``score=False`` times the prune alone: the row has no ``ppl``."""
    with tempfile.TemporaryDirectory() as tmp:
        target = ["--pattern", setting] if ":" in setting else ["--sparsity", setting]
        start = time.perf_counter()
        _besa(
            "prune", args.model, "--method", method, *target, "--calib", args.calib,
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
            "--out", f"{tmp}/model", *flags, threads=threads,
        )  # fmt: skip
        wall = time.perf_counter() - start
        report = json.loads(Path(f"{tmp}/model/besa_report.json").read_text())
        if score:
            _besa("eval", f"{tmp}/model", *common_eval, "--json", f"{tmp}/ppl.json", threads=threads)
            scores = json.loads(Path(f"{tmp}/ppl.json").read_text())
    extra = {"ppl": scores[dataset]} if score else {}
    if score and also:
        extra["also"] = {name: scores[name] for name in also}
    return {
        "method": method,
        "setting": setting,
        "prune_s": report["timings_s"]["prune"],
        "process_s": wall,
        "peak_rss_mib": report["memory"]["peak_rss_mib"],
        "sparsity": report["sparsity"]["pruned_layers"],
        "threads": threads or torch_threads(),
        "machine": _machine(),
        "flags": " ".join(flags),
        **extra,
    }


def _flags(method: str, args: argparse.Namespace) -> list[str]:
    """The extra ``besa prune`` flags of a run: ``--flags`` for every method, ``--besa-flags`` for BESA."""
    return shlex.split(args.flags) + (shlex.split(args.besa_flags) if method == "besa" else [])


def _key(method: str, setting: str, args: argparse.Namespace) -> str:
    """Results key: ``method@setting``; a labelled variant is ``method:label@setting`` (``--label``, or
    ``--besa-label`` for BESA runs)."""
    label = args.label or (args.besa_label if method == "besa" else "")
    return f"{method}:{label}@{setting}" if label else f"{method}@{setting}"


def _machines(results: dict) -> list[str]:
    """The machines the runs of ``results`` ran on, most runs first."""
    found = [r["machine"] for r in results.values() if r.get("machine")]
    return sorted(set(found), key=lambda m: -found.count(m)) or [_machine()]


def _machine_marks(results: dict) -> dict[str, str]:
    """A footnote mark for every machine but the one most runs used (no marks when there is one)."""
    return {m: " " + "\u2020" * i for i, m in enumerate(_machines(results)) if i}


def _machine_lines(results: dict) -> list[str]:
    machines, marks = _machines(results), _machine_marks(results)
    return [f"Machine: {machines[0]}."] + [f"Rows marked{marks[m]}: {m}." for m in machines[1:]]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _non_default_flags(args: argparse.Namespace) -> str:
    """The flags that differ from the defaults (output paths left out), to print a command anyone can rerun."""
    defaults = vars(build_parser().parse_args([]))
    flags = []
    for k, v in vars(args).items():
        if k in ("results", "markdown", "render_only", "title", "note") or v == defaults[k]:
            continue
        flag = f" --{k.replace('_', '-')}"
        flags.append(flag if isinstance(v, bool) else f"{flag} {shlex.quote(str(v))}")
    return "".join(flags)


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    dense = results.get("dense", {}).get("ppl", {})
    lines = [
        args.title,
        "",
        *([args.note, ""] if args.note else []),
        f"Model `{args.model}`; calibration {args.nsamples} x {args.seqlen} tokens of `{args.calib}` (seed {args.seed});"
        f" WikiText-2 test perplexity at seqlen {args.eval_seqlen}"
        + (
            f", first {args.max_windows} windows."
            if args.max_windows
            else (f", all {dense['windows']} windows." if dense else ", all windows.")
        ),
        "C4 is not reachable offline, so calibration uses the Wikipedia articles of `shared/data` (none of them is a"
        " WikiText-2 test article).",
        "",
        *_machine_lines(results),
        "",
        "Command:",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/baselines.py" + _non_default_flags(args),
        "```",
        "",
        "`prune s` is the pruning stage alone (calibration capture, every block's step and propagation, from",
        "`besa_report.json`); `process s` is the whole `besa prune` process (model load and save included); peak RSS",
        "is the pruning process's peak resident memory. Sparsity is counted zeros over all pruned linears.",
        "`threads` is each run's torch threads and `runs` how many ran at a time on the machine; times are single",
        "runs on a shared machine: compare them within one machine and one threads/runs setting, not across.",
        "",
        "| sparsity | method | WikiText-2 ppl | counted sparsity | prune s | process s | peak RSS MiB | threads | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    marks = _machine_marks(results)
    if dense:
        lines.append(f"| 0 | dense | {dense['ppl']:.2f} | 0 | - | - | - | | |")
    settings = list(dict.fromkeys([*SETTINGS, *args.settings.split(",")]))
    requested = set(args.methods.split(","))
    for setting in settings:
        variants = sorted(
            k.split("@")[0] for k in results if ":" in k.split("@")[0] and k.endswith(f"@{setting}")
        )
        for method in [*ALL_METHODS, *variants]:
            r = results.get(f"{method}@{setting}")
            if r is None:
                if (
                    method in requested
                    and not args.label
                    and setting in args.settings.split(",")
                    and not (":" in setting and method in NO_NM)
                ):
                    lines.append(f"| {setting} | {method} | (not run yet) | | | | | | |")
                continue
            label = f"{method} `{r['flags']}`" if r.get("flags") else method
            lines.append(
                f"| {setting} | {label}{marks.get(r.get('machine'), '')} | {r['ppl']['ppl']:.2f} |"
                f" {r['sparsity']:.4f} | {r['prune_s']:.0f} | {r['process_s']:.0f} | {r['peak_rss_mib']:.0f} |"
                f" {r.get('threads', '')} | {r.get('parallel_jobs', '')} |"
            )
    replace_section(Path(args.markdown), args.section, "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = protocol_parser(__doc__)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, the cores split between them")
    p.add_argument(
        "--besa-flags", default="", help="extra flags for the besa runs, e.g. '--optimizer adamw --lr 0.05'"
    )
    p.add_argument(
        "--besa-label", default="", help="keep these besa runs as a separate variant row (besa:LABEL)"
    )
    p.add_argument("--flags", default="", help="extra flags for every run, e.g. '--allocation owl'")
    p.add_argument("--section", default="baselines", help="the BENCHMARKS.md section these results own")
    p.add_argument("--title", default="## Pruning methods on SmolLM2-135M: magnitude, Wanda, SparseGPT, BESA")
    p.add_argument(
        "--no-dense", action="store_true", help="skip the dense model's row (it is in another table)"
    )
    p.add_argument("--note", default="", help="a paragraph under the title")
    p.add_argument("--label", default="", help="keep these runs as variant rows (METHOD:LABEL)")
    p.add_argument(
        "--render-only", action="store_true", help="rewrite the table from the results file, run nothing"
    )
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "baselines.json"))
    p.add_argument("--markdown", default=str(ROOT / "benchmarks" / "NOTES.md"))
    return p


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
