"""Command-line interface: ``besa prune`` and ``besa eval``. Bad input prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from besa.errors import BesaError
from besa.fileio import write_json_atomic
from besa.registry import available_methods, get_method
from besa.settings.config import EvalConfig, PlanConfig, PruneConfig, SpeedConfig
from besa.settings.options import RUN_FILE, RunOptions

__all__ = ["main", "build_parser"]

PRUNE_EXAMPLES = """examples:
  besa prune smollm2-135m --method besa --sparsity 0.6 --nsamples 64 --seqlen 512 --out pruned/besa60
  besa prune smollm2-135m --method wanda --sparsity 0.5 --calib enwiki-articles --out pruned/wanda50
  besa prune smollm2-135m --method sparsegpt --pattern 2:4 --nsamples 64 --seqlen 512 --out pruned/sgpt24
  besa prune ./my-llama --method magnitude --sparsity 0.6 --device cuda --out pruned/mag60 --overwrite
  besa prune smollm2-135m --method besa --sparsity 0.5 --wbits 4 --group-size 128 --out pruned/besa50-w4
  besa prune ./big --method besa --out pruned/big --max-memory 8GiB   (killed? run it again: it resumes)

Named calibration sources are read from $BESA_DATA_DIR when present there, else from the hub."""

EVAL_EXAMPLES = """examples:
  besa eval smollm2-135m --ppl wikitext2 --seqlen 512
  besa eval pruned/wanda50 --ppl wikitext2,ptb --seqlen 512 --max-windows 40 --json ppl.json
  besa eval smollm2-135m pruned/wanda50 pruned/sgpt24 --seqlen 512     (one table, a row per model)"""


_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))
_EVAL_RUN_FIELDS = ("progress", "trust_remote_code")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_type(f: dataclasses.Field) -> Any:
    """The CLI type of a field: its metadata's ``type``, else the first member of its annotation's union."""
    if "type" in f.metadata:
        return f.metadata["type"]
    first = str(f.type).split("|")[0].strip()
    return {"float": float, "int": int, "bool": bool}.get(first, str)


def _add_dataclass_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    skip: tuple[str, ...] = (),
    seen: dict[str, Any] | None = None,
    groups: dict[str, argparse._ActionsContainer] | None = None,
) -> None:
    """One ``--flag`` per dataclass field that has ``help`` metadata; defaults and help are written once, there.

    A field's metadata may also give ``flag`` (e.g. ``--no-checkpoint`` for a boolean whose flag turns it off),
    ``type``, ``required``, ``group`` (a key of ``groups``) and ``const`` (the value of the flag given alone). Flags not given are left out of the namespace, so
    the dataclass's own default applies.

    ``seen`` (flag name -> field type) lets several method configs share a field name: the flag is defined once,
    by the first method that has it, and each method reads it into its own config with its own default. Two
    methods that give one name different types are a programming error, reported at start-up.
    """
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        if seen is not None:
            if f.name in seen:
                if seen[f.name] is not _field_type(f):
                    raise TypeError(f"--{f.name} is declared with two different types by two methods")
                continue
            seen[f.name] = _field_type(f)
        meta = f.metadata
        flag = meta.get("flag", f"--{f.name.replace('_', '-')}")
        target = (groups or {}).get(meta.get("group"), parser)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"]}
        if _field_type(f) is bool:
            kwargs.update(action="store_const", const=not flag.startswith("--no-"))
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            if isinstance(default, tuple):
                default = ",".join(str(v) for v in default) or None
            kwargs.update(type=_field_type(f), metavar=f.name.upper().replace("_", "-"))
            if "const" in meta:  # the flag alone means ``const``
                kwargs.update(nargs="?", const=kwargs["type"](meta["const"]))
                kwargs["help"] += f"; the flag alone: {meta['const']}"
            kwargs["help"] += "" if default is None else f" (default: {default})"
        if meta.get("required"):
            kwargs["required"] = True
        target.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="besa", description="Prune Hugging Face causal LMs after training and measure them."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "prune",
        help="prune a model block by block and save it",
        epilog=PRUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="local folder, hub id (owner/name), .gguf file, or smollm2-135m")
    p.add_argument(
        "--method",
        default=None,
        help=f"one of: {', '.join(available_methods())} (default: the recipe's, else wanda)",
    )
    p.add_argument(
        "--recipe", default=None, metavar="YAML",
        help="read the settings from a recipe file (a run's besa_recipe.yaml) or a built-in one (besa-paper, sparsegpt-paper); flags given here override it",
    )  # fmt: skip
    _add_dataclass_flags(p, PruneConfig, skip=("method",))
    seen: dict[str, Any] = {}
    for name in available_methods():
        spec = get_method(name)
        if any("help" in f.metadata for f in dataclasses.fields(spec.config_cls)):
            group = p.add_argument_group(f"--method {name}", spec.summary)
            _add_dataclass_flags(group, spec.config_cls, seen=seen)
    run = p.add_argument_group(
        "checkpoints and memory",
        "A checkpoint is written after every block; rerunning the same command continues a killed run.",
    )
    _add_dataclass_flags(p, RunOptions, groups={"checkpoints and memory": run})

    e = sub.add_parser(
        "eval",
        help="perplexity (SparseGPT/Wanda/BESA protocol)",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("model", nargs="+", help="one or more models (folder, hub id, .gguf, smollm2-135m)")
    _add_dataclass_flags(e, EvalConfig)
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    _add_dataclass_flags(e, RunOptions, skip=tuple(n for n in _RUN_FIELDS if n not in _EVAL_RUN_FIELDS))
    r = sub.add_parser(
        "report",
        help="draw the sparsity allocation of a pruned model folder (heatmap PNG) and summarise it",
        epilog="example:\n  besa report pruned/besa50      (writes pruned/besa50/besa_allocation.png)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("folder", help="a folder written by besa prune (holds besa_report.json)")
    r.add_argument("--png", default=None, help="where to write the picture (default: inside the folder)")
    sp = sub.add_parser(
        "speedup",
        help="time a saved pruned model's linears, forward and decode: dense vs a sparse kernel of torch",
        epilog="example:\n  besa speedup pruned/sgpt-2of4 --batch 1,16 --seqlen 128 --json speed.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("folder", help="a pruned model folder (any --save-format)")
    _add_dataclass_flags(sp, SpeedConfig)
    sp.add_argument(
        "--simulate", action="store_true",
        help="instead of timing, the paper's simulated 64x64 PE accelerator: cycles per layer type, dense vs pruned",
    )  # fmt: skip
    sp.add_argument("--json", default=None, help="write every measurement to this JSON file")
    sp.add_argument(
        "--png", default=None, help="bar chart of the speed-ups (default: FOLDER/besa_speedup.png)"
    )
    sp.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    pl = sub.add_parser(
        "plan",
        help="the peak memory of each stage of a pruning run and its work, from the model's config alone",
        epilog="example:\n  besa plan meta-llama/Llama-2-7b-hf --method besa --device cuda --stream",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument(
        "model", help="model folder, hub id (only config.json is fetched), .gguf, config.json file"
    )
    _add_dataclass_flags(pl, PlanConfig)
    pl.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from besa.model.loading import load_config, resolve_dtype
    from besa.registry import get_method
    from besa.tools.plan import format_plan, model_shape, plan_run

    given = vars(args)
    cfg = PlanConfig(**{f.name: given[f.name] for f in dataclasses.fields(PlanConfig) if f.name in given})
    spec = get_method(cfg.method)
    defaults = spec.config_cls()
    run = PruneConfig(
        method=cfg.method, nsamples=cfg.nsamples, seqlen=cfg.seqlen, refit_epochs=cfg.refit_epochs,
        within_block=cfg.within_block,
    )  # fmt: skip
    pruner = spec.pruner_cls(defaults, run)  # the method's own defaults decide what is left open
    config = load_config(args.model, args.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    compute = resolve_dtype(cfg.dtype, torch.device(cfg.device.split(":")[0]))
    shape = model_shape(config)
    plan = plan_run(
        shape, cfg.method, cfg.nsamples, cfg.seqlen, compute, stored, cfg.stream,
        device=cfg.device.split(":")[0], forward_batch=cfg.forward_batch,
        epochs=getattr(defaults, "epochs", 1), refit_epochs=pruner.refit.epochs if pruner.refit else 0,
        within_block=pruner.within_block, weight_update=getattr(pruner, "weight_update", None),
        uses_data=pruner.engine_uses_data, dense_stream=pruner.needs_dense_stream, kl_epochs=cfg.kl_epochs,
        kl_batch=run.kl_batch, kl_topk=run.kl_topk, lsq=getattr(defaults, "lsq_iters", 0) > 0,
    )  # fmt: skip
    print(format_plan(args.model, shape, plan, stored))
    return 0


def _cmd_speedup(args: argparse.Namespace) -> int:
    from besa.model.loading import load_model
    from besa.output.plotting import plot_speedup, speedup_table
    from besa.tools.speed import measure_speed

    given = vars(args)
    config = SpeedConfig(
        **{f.name: given[f.name] for f in dataclasses.fields(SpeedConfig) if f.name in given}
    )
    model, _, _ = load_model(args.folder)
    if args.simulate:
        from besa.tools.simulate import simulate_model

        sim = simulate_model(model)
        print(
            f"simulated accelerator ({sim['pe_array']} PEs, dense/sparse engine split), one mat-vec per linear"
        )
        print(f"{'layer type':<20} {'layers':>6} {'dense cycles':>13} {'pruned cycles':>14} {'speed-up':>9}")
        for name, e in sim["by_type"].items():
            print(
                f"{name:<20} {e['layers']:>6} {e['dense_cycles']:>13} {e['cycles']:>14} {e['speedup']:>8.2f}x"
            )
        if args.json:
            write_json_atomic(Path(args.json), sim)
        return 0
    result = measure_speed(model, config, progress=args.progress)
    print(speedup_table(result))
    png = plot_speedup(result, args.png or Path(args.folder) / "besa_speedup.png")
    print(f"chart: {png}")
    if args.json:
        write_json_atomic(Path(args.json), result)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from besa.output.plotting import PLOT_NAME, allocation_table, plot_allocation
    from besa.output.saving import REPORT_NAME

    path = Path(args.folder) / REPORT_NAME
    if not path.is_file():
        raise BesaError(f"{args.folder!r} holds no {REPORT_NAME} (is it a folder written by besa prune?)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        blocks, layers, grid, per_block = allocation_table(report)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BesaError(f"{path} is not a besa report ({type(exc).__name__}: {exc})") from None
    png = plot_allocation(report, args.png or Path(args.folder) / PLOT_NAME)
    print(f"{report['config']['method']} at target {report['sparsity']['target']:g}: {len(blocks)} blocks")
    for j, name in enumerate(layers):
        column = [row[j] for row in grid if row[j] == row[j]]
        print(
            f"  {name:<24} mean {sum(column) / len(column):.4f}  min {min(column):.4f}  max {max(column):.4f}"
        )
    print(f"  {'block':<24} min {min(per_block):.4f}  max {max(per_block):.4f}")
    print(f"wrote {png}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from besa.settings.build import build_settings
    from besa.settings.recipe import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    if recipe is not None and recipe.calibration_ids is not None:
        raise BesaError(
            f"recipe {args.recipe!r} was calibrated on token ids given to the Python API; rerun it with "
            "besa.prune(..., recipe=..., calib_ids=...)"
        )
    method = args.method or (recipe.method if recipe else PruneConfig.method)
    spec = get_method(method)
    common = {f.name for f in dataclasses.fields(PruneConfig)} - {"method"}
    own = {f.name for f in dataclasses.fields(spec.config_cls)}
    given = vars(args)
    foreign = [
        n
        for m in available_methods()
        for n in (f.name for f in dataclasses.fields(get_method(m).config_cls))
        if n in given and n not in own
    ]
    if foreign:
        raise BesaError(f"--{foreign[0].replace('_', '-')} does not apply to --method {method}")
    settings = {k: given[k] for k in (*common, *_RUN_FIELDS) if k in given}
    config, method_config, options = build_settings(
        method, settings, {k: given[k] for k in own if k in given}, recipe
    )  # every value checked before torch is imported
    from besa.api import prune_with

    if options.stream:  # memory is the point of streaming: large tensors go straight back to the system
        from besa.engine.activations import return_large_frees

        return_large_frees()
    result = prune_with(args.model, config, method_config, options)
    if not result.report:  # a data-parallel run's other ranks: rank 0 reports
        return 0
    s = result.report["sparsity"]
    dense = len(result.report["weights"]["dense"])
    print(
        f"pruned {args.model} with {method}: the masks zero {s['masked']:.4%} of {len(result.report['layers'])} "
        f"linears ({s['pruned_layers']:.4%} zeros counted, the dense model's own zeros included); "
        f"{s['block_weights']:.2%} of all block weights ({dense} block weight{'s' * (dense != 1)} kept dense), "
        f"{s['all_parameters']:.2%} of all parameters -> {result.out}"
    )
    return 0


def _format_table(rows: dict[str, dict[str, dict[str, Any]]], datasets: list[str]) -> str:
    name_w = max(len("model"), *(len(m) for m in rows))
    lines = []
    if datasets:
        header = f"{'model':<{name_w}}  " + "  ".join(f"{d:>12}" for d in datasets)
        lines += [header, "-" * len(header)]
        for model, res in rows.items():
            lines.append(f"{model:<{name_w}}  " + "  ".join(f"{res[d]['ppl']:>12.3f}" for d in datasets))
        first = next(iter(rows.values()))
        lines.append(
            "(perplexity; "
            + ", ".join(f"{d}: {first[d]['windows']} x {first[d]['seqlen']} tokens" for d in datasets)
            + ")"
        )
    shots = [res["zero_shot"] for res in rows.values() if "zero_shot" in res]
    if shots:
        tasks = list(shots[0])
        head = f"{'model':<{name_w}}  " + "  ".join(f"{t:>14}" for t in tasks)
        lines += ["" if lines else None, head, "-" * len(head)]
        for model, res in rows.items():
            cells = [
                "/".join(
                    f"{100 * res['zero_shot'][t][m]:.1f}"
                    for m in ("acc", "acc_norm")
                    if m in res["zero_shot"][t]
                )
                for t in tasks
            ]
            lines.append(f"{model:<{name_w}}  " + "  ".join(f"{c:>14}" for c in cells))
        lines.append("(zero-shot accuracy %, acc/acc_norm; mean over the tasks)")
    return "\n".join(line for line in lines if line is not None)


def _cmd_eval(args: argparse.Namespace) -> int:
    from besa.api import evaluate

    given = vars(args)
    settings = {f.name: given[f.name] for f in dataclasses.fields(EvalConfig) if f.name in given}
    settings.update({k: given[k] for k in _EVAL_RUN_FIELDS if k in given})
    from besa.model.data import eval_name

    datasets = [eval_name(d) for d in settings.get("datasets", EvalConfig.datasets) if d != "none"]
    if args.json:
        json_path = Path(args.json)
        if json_path.is_dir() or not json_path.parent.exists() and str(json_path.parent) not in ("", "."):
            raise BesaError(f"--json {args.json!r}: not a writable file path")
    rows: dict[str, dict[str, Any]] = {model: evaluate(model, **settings) for model in args.model}
    print(_format_table(rows, datasets))
    if args.json:
        write_json_atomic(json_path, rows[args.model[0]] if len(args.model) == 1 else rows)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``besa`` console script."""
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
    handler = {
        "prune": _cmd_prune, "eval": _cmd_eval, "report": _cmd_report, "speedup": _cmd_speedup, "plan": _cmd_plan,
    }[args.command]  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())
