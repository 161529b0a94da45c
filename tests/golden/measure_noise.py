"""How far the golden cases move from their record under the other kernels torch can pick: writes noise.json.

    .venv/bin/python tests/golden/measure_noise.py      # every case and setting: about 4 minutes on 2 cores
    .venv/bin/python tests/golden/measure_noise.py --cases besa-row --threads 1 2 --out /tmp/noise.json

Each setting runs every golden case (``tests/test_golden.CASES``) in a fresh process with
``ATEN_CPU_CAPABILITY`` (which torch reads when it is imported) set to ``default``, ``avx2`` or ``avx512`` and
torch on 1 to 4 threads, and compares what it saves with the recorded digests and zero masks as the test does
(``test_golden.worst_gaps``). First it runs the setting of the record itself (torch's own choice of kernel, 1
thread), which must show no gap at all: the script stops if it does (rerun after the record is right).

It writes ``tests/golden/noise.json``:

- ``cases``: each case's worst gap over all settings, per metric: what ``test_golden.tolerance`` reads;
- ``sources``: the setting and tensor each of those came from;
- ``methods``: the worst per family (the method, ``-w4`` when quantized) and setting, for people to read.

Thread counts above the cores are fine: the split of the work, and so the order of the float sums, depends on
the thread count only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
CAPABILITIES = ("default", "avx2", "avx512")
THREADS = (1, 2, 3, 4)
RECORDED = "auto/1t"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def worker(cases: list[str], threads: int, out: Path) -> None:
    """Run ``cases`` in this process (the parent set ``ATEN_CPU_CAPABILITY``); write each one's worst gaps."""
    import torch
    import transformers

    from conftest import make_tokenizer
    from test_golden import (
        CASES,
        METRICS,
        TENSOR_METRICS,
        calib_ids_from,
        case_gaps,
        saved_tensors,
        worst_gaps,
    )

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)  # after conftest, which sets 1
    tokenizer = make_tokenizer()
    result: dict = {
        "kernel": f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            gaps = case_gaps(saved_tensors(CASES[name], tokenizer, calib_ids_from(0), Path(tmp) / name), name)
            worst = worst_gaps(gaps)
            where = {m: max(gaps, key=lambda k, m=m: getattr(gaps[k], m)) for m in TENSOR_METRICS}
            result[name] = {m: worst[m] for m in METRICS} | {
                f"{m}_at": where[m] for m in TENSOR_METRICS if worst[m] > 0
            }
    out.write_text(json.dumps(result) + "\n")


def up(value: float) -> float:
    """``value`` rounded up to 3 significant digits (a tolerance made from it can only grow)."""
    if value <= 0:
        return 0.0
    exp = math.floor(math.log10(value)) - 2
    return float(f"{math.ceil(value / 10.0**exp - 1e-9)}e{exp}")


def dumps(data: dict) -> str:
    """JSON with one line per innermost object: a table a person can read, of modest size."""
    if not isinstance(data, dict) or not any(isinstance(v, dict) for v in data.values()):
        return json.dumps(data)
    inner = ",\n".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in data.items())
    return "{\n" + inner + "\n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", help="golden cases to run (default: all)")
    parser.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES), choices=CAPABILITIES)
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("noise.json"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    from test_golden import CASES, METRICS, family

    cases = args.cases or list(CASES)
    if args.worker:
        worker(cases, args.threads[0], args.worker)
        return

    settings = [(None, 1), *((cap, n) for cap in args.capabilities for n in args.threads)]
    by_setting: dict[str, dict[str, dict]] = {}
    kernels: dict[str, str] = {}
    for cap, threads in settings:
        label = f"{cap or 'auto'}/{threads}t"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if cap:
            env["ATEN_CPU_CAPABILITY"] = cap
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "gaps.json"
            argv = [__file__, "--worker", str(out), "--threads", str(threads), "--cases", *cases]
            subprocess.run([sys.executable, *argv], env=env, check=True)
            got = json.loads(out.read_text())
        kernels[label] = got.pop("kernel")
        by_setting[label] = got
        worst = {m: f"{max(got[name][m] for name in cases):.2g}" for m in METRICS}
        print(
            f"{label:11} {kernels[label]:22} {time.perf_counter() - start:4.0f} s  worst {worst}", flush=True
        )
        moved = [name for name in cases if any(got[name][m] for m in METRICS)]
        if label == RECORDED and moved:
            sys.exit(f"the setting of the record differs from it in {moved}: re-record first")

    measured: dict[str, dict[str, float]] = {}
    sources: dict[str, dict[str, str]] = {}
    methods: dict[str, dict[str, dict[str, float]]] = {}
    for label, got in by_setting.items():
        for name in cases:
            gap = got[name]
            row = methods.setdefault(family(name), {}).setdefault(label, dict.fromkeys(METRICS, 0.0))
            worst = measured.setdefault(name, dict.fromkeys(METRICS, 0.0))
            for m in METRICS:
                row[m] = max(row[m], up(gap[m]))
                if up(gap[m]) > worst[m]:
                    worst[m] = up(gap[m])
                    sources.setdefault(name, {})[m] = " ".join([label, gap.get(f"{m}_at", "(all tensors)")])

    import torch

    about = (
        "Worst gaps of the golden cases from their record under other torch kernels (ATEN_CPU_CAPABILITY) "
        "and thread counts, on the machine below: written by tests/golden/measure_noise.py, read by "
        "tests/test_golden.py (see its docstring for the metrics and how they become tolerances)."
    )
    noise = {
        "about": about,
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "settings": kernels,
        "cases": measured,
        "sources": sources,
        "methods": methods,
    }
    args.out.write_text(dumps(noise) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
