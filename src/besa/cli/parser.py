"""The command line's parser: one flag per setting of the settings dataclasses (``help`` metadata), made once,
with its default and help, in ``build_parser``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn

from besa.registry import available_methods, get_method
from besa.settings.commands import EvalConfig, GenerateConfig, PlanConfig, SpeedConfig
from besa.settings.config import PruneConfig
from besa.settings.flat import flat_fields, from_flat, type_name
from besa.settings.options import RunOptions

__all__ = ["EVAL_RUN_FIELDS", "RUN_FIELDS", "build_parser", "from_args"]

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


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))
EVAL_RUN_FIELDS = ("progress", "trust_remote_code")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_type(f: dataclasses.Field) -> Any:
    """The CLI type of a field: its metadata's ``type``, else the first member of its annotation's union."""
    if "type" in f.metadata:
        return f.metadata["type"]
    return {"float": float, "int": int, "bool": bool}.get(type_name(f), str)


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
    for name, f in flat_fields(cls):
        if name in skip or "help" not in f.metadata:
            continue
        if seen is not None:
            if name in seen:
                if seen[name] is not _field_type(f):
                    raise TypeError(f"--{name} is declared with two different types by two methods")
                continue
            seen[name] = _field_type(f)
        meta = f.metadata
        flag = meta.get("flag", f"--{name.replace('_', '-')}")
        target = (groups or {}).get(meta.get("group"), parser)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": meta["help"]}
        if _field_type(f) is bool:
            kwargs.update(action="store_const", const=not flag.startswith("--no-"))
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            if isinstance(default, tuple):
                default = ",".join(str(v) for v in default) or None
            kwargs.update(type=_field_type(f), metavar=name.upper().replace("_", "-"))
            if "const" in meta:  # the flag alone means ``const``
                kwargs.update(nargs="?", const=kwargs["type"](meta["const"]))
                kwargs["help"] += f"; the flag alone: {meta['const']}"
            kwargs["help"] += "" if default is None else f" (default: {default})"
        if meta.get("required"):
            kwargs["required"] = True
        target.add_argument(flag, **kwargs)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` (a command's config) from the flags given; the ones left out keep their defaults."""
    given = vars(args)
    return from_flat(cls, {name: given[name] for name, _ in flat_fields(cls) if name in given})


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
    _add_dataclass_flags(e, RunOptions, skip=tuple(n for n in RUN_FIELDS if n not in EVAL_RUN_FIELDS))
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
    g = sub.add_parser(
        "generate",
        help="decode greedily with a --save-format sparse model on its sparse kernels; tokens/s and memory",
        epilog='example:\n  besa generate pruned/besa50 --prompt "The capital of France is" --max-new-tokens 64',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("folder", help="a folder written by besa prune --save-format sparse")
    _add_dataclass_flags(g, GenerateConfig)
    return parser
