"""How fast the command line answers before any work: `besa --help`, a subcommand's help, and a bad setting.

Each command runs as a fresh process, repeated; the table gives the median and the spread of the wall times, and
whether torch was imported (it must not be, for these to answer in well under a second).

    python benchmarks/cli_startup.py --repeats 11
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402

COMMANDS = {
    "besa --help": ["--help"],
    "besa prune --help": ["prune", "--help"],
    "besa eval --help": ["eval", "--help"],
    "besa prune m --sparsity 2 --out o (error, exit 2)": ["prune", "m", "--sparsity", "2", "--out", "o"],
}
PROBE = "import sys, runpy; sys.argv = ['besa', *sys.argv[1:]]\ntry:\n    runpy.run_module('besa.cli', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"


def measure(argv: list[str], repeats: int) -> tuple[list[float], bool]:
    times, torch_loaded = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        torch_loaded = torch_loaded or "TORCH True" in done.stderr
    return times, torch_loaded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--note", default="", help="a sentence about the conditions (another job running, say)")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    lines = [
        "## Command-line start-up: help and argument errors",
        "",
        f"Machine: {_machine()}. Each command is a fresh Python process, run {args.repeats} times; wall seconds.",
        *([args.note] if args.note else []),
        "",
        "```",
        f"python benchmarks/cli_startup.py --repeats {args.repeats}",
        "```",
        "",
        "| command | median s | min s | max s | torch imported |",
        "|---|---:|---:|---:|---|",
    ]
    for label, argv in COMMANDS.items():
        times, torch_loaded = measure(argv, args.repeats)
        lines.append(
            f"| `{label}` | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |"
            f" {'yes' if torch_loaded else 'no'} |"
        )
        print(lines[-1], flush=True)
    replace_section(Path(args.markdown), "cli_startup", "\n".join(lines))


if __name__ == "__main__":
    main()
