"""Command-line interface: ``besa prune``, ``eval``, ``report``, ``speedup`` and ``plan``. Bad input prints one
line and exits with status 2; the flags are made in ``besa.cli.parser``, the commands run in ``besa.cli.commands``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from besa.cli.commands import COMMANDS
from besa.cli.parser import build_parser
from besa.errors import BesaError
from besa.settings.options import RUN_FILE

__all__ = ["HUGE_PAGES", "main"]


class _PeerLost(Exception):
    """The launcher stopped this process because another process of the run died."""


def _stopped_by_launcher(_signum: int, _frame: Any) -> None:
    raise _PeerLost


def _launched_processes() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _is_collective_failure(exc: BaseException) -> bool:
    """Whether an error comes from a collective whose peer is gone (gloo/NCCL report it as a RuntimeError)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "distbackend", "peer", "timed out"))


def _run_dir_of(args: argparse.Namespace) -> str:
    """The run folder a prune command uses: ``--run-dir``, else ``OUT.run`` beside ``--out`` (as ``RunOptions``)."""
    given = getattr(args, "run_dir", None)
    if given:
        return str(Path(given).expanduser())
    out = getattr(args, "out", None)
    if not out:
        return "the run folder"
    out = Path(out).expanduser()
    return str(out.parent / f"{out.name}.run")


HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
"""torch's CPU allocator aligns tensors of 2 MiB and more to 2 MiB and asks Linux for transparent huge pages for them
when this is ``1`` (read at its first allocation, so set before any command imports torch; a value the user set is
kept). Fewer page faults each time such memory is mapped again: on SmolLM2's KL stage 102.9 s against 112.2 s at
the same peak RSS, and about 1.5% off BESA's N:M blocks (benchmarks/NOTES.md, issue 37)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``besa`` console script."""
    os.environ.setdefault(HUGE_PAGES, "1")  # this process is ours; the library leaves the user's alone
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        return _main(args)
    except KeyboardInterrupt:  # at any point, start-up included: one line, and how to go on
        print(_interrupted(args, argv), file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace | None, argv: list[str]) -> str:
    """What an interrupted command says: for a prune that left a run folder with finished blocks, the command that
    continues it."""
    command = getattr(args, "command", None) or next((a for a in argv if not a.startswith("-")), "")
    if command != "prune" or args is None or getattr(args, "checkpoint", None) is False:
        return f"besa {command}: interrupted; nothing was written".replace("besa :", "besa:")
    run_dir = Path(_run_dir_of(args))
    try:
        done = int(json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["completed"])
    except (OSError, ValueError, KeyError, TypeError):
        return "besa prune: interrupted before the first block was finished; nothing was kept"
    again = _without(argv, "--resume", "--redo-from")  # continuing must not prune the finished blocks again
    return (
        f"besa prune: interrupted; {done} finished block{'s' * (done != 1)} kept in {str(run_dir)!r}: "
        f"continue with: {shlex.join(['besa', *again, '--resume'])}"
    )


def _without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without ``flags`` (and the value of one that takes it: ``--redo-from 3`` or ``--redo-from=3``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = arg != "--resume"
        elif not any(arg.startswith(f"{flag}=") for flag in flags):
            kept.append(arg)
    return kept


def _main(args: argparse.Namespace) -> int:
    # progress bars need a terminal; without one (a log file, a CI job) a line per block says how far it got
    quiet = "WARNING" if sys.stderr.isatty() else "INFO"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else os.environ.get("BESA_LOG_LEVEL", quiet),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler = COMMANDS[args.command]
    launched = args.command == "prune" and _launched_processes() > 1
    if launched:  # torchrun stops the other processes with SIGTERM when one of them dies
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        if getattr(args, "progress", True) is False:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return handler(args)
    except BesaError as exc:
        print(f"besa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (_PeerLost, RuntimeError) as exc:
        if not launched or not (isinstance(exc, _PeerLost) or _is_collective_failure(exc)):
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"besa prune: error (rank {rank}): another process of this torchrun run stopped, so this one stopped "
            f"too; rerun the same command to resume from the last committed block in {_run_dir_of(args)}",
            file=sys.stderr,
        )
        return 3
