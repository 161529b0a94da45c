"""What each ``besa`` command does once its flags are parsed (``cmd_prune``, ``cmd_eval``, ``cmd_report``,
``cmd_speedup``, ``cmd_plan``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from besa.cli.parser import EVAL_RUN_FIELDS, RUN_FIELDS, from_args
from besa.errors import BesaError
from besa.fileio import write_json_atomic
from besa.registry import available_methods, get_method
from besa.settings.commands import EvalConfig, GenerateConfig, PlanConfig, SpeedConfig
from besa.settings.config import PruneConfig

__all__ = ["COMMANDS"]


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from besa.model.loading import load_config
    from besa.tools.plan import format_plan, model_shape, plan_run

    cfg = from_args(PlanConfig, args)
    spec = get_method(cfg.method)
    pruner = spec.pruner_cls(spec.config_cls(), cfg.prune_config())  # the method's defaults decide the rest
    config = load_config(args.model, args.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    shape = model_shape(config)
    print(format_plan(args.model, shape, plan_run(shape, cfg, pruner, stored), stored))
    return 0


def cmd_speedup(args: argparse.Namespace) -> int:
    from besa.model.loading import load_model
    from besa.output.plotting import plot_speedup, speedup_table
    from besa.tools.speed import measure_speed

    config = from_args(SpeedConfig, args)
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


def cmd_report(args: argparse.Namespace) -> int:
    from besa.output.plotting import PLOT_NAME, allocation_table, plot_allocation
    from besa.settings.options import REPORT_NAME

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


def cmd_prune(args: argparse.Namespace) -> int:
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
    common = {name for name, _ in PruneConfig.settings()} - {"method"}
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
    settings = {k: given[k] for k in (*common, *RUN_FIELDS) if k in given}
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


def cmd_eval(args: argparse.Namespace) -> int:
    from besa.evaluation.perplexity import evaluate

    given = vars(args)
    settings = {f.name: given[f.name] for f in dataclasses.fields(EvalConfig) if f.name in given}
    settings.update({k: given[k] for k in EVAL_RUN_FIELDS if k in given})
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


def cmd_generate(args: argparse.Namespace) -> int:
    import resource
    import time

    import torch
    from transformers import TextStreamer

    from besa.runtime.kernels import ISA_NAMES, kernels
    from besa.runtime.linear import SparseLinear
    from besa.runtime.load import load_sparse, sparse_bytes

    config = from_args(GenerateConfig, args)
    dtype = getattr(torch, config.dtype)
    model, tokenizer = load_sparse(args.folder, dtype=dtype, bits=config.bits, group_size=config.group_size)
    ids = tokenizer(config.prompt, return_tensors="pt").input_ids
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=config.max_new_tokens, do_sample=False, streamer=TextStreamer(tokenizer)
        )
    seconds = time.perf_counter() - t
    new = out.shape[1] - ids.shape[1]
    held, dense = sparse_bytes(model)
    found = kernels()
    print(
        f"{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s (prompt included; "
        f"{ISA_NAMES[found.isa] if found.available else 'dense fallback'}, {torch.get_num_threads()} threads); "
        f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; the pruned "
        f"linears hold {held / 2**20:.1f} MiB, {held / max(dense, 1):.3f} of their dense bytes"
        + (f" at {config.bits} bits" if config.bits else "")
    )
    if config.check_dense:
        from besa.model.loading import load_model

        reference, _, _ = load_model(args.folder, dtype=dtype)
        reference.config.use_cache = True
        for name, module in model.named_modules():  # the very weights the kernels hold (codes: dequantized)
            if isinstance(module, SparseLinear):
                reference.get_submodule(name).weight.data = module.packed.dense().to(dtype)
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=config.max_new_tokens, do_sample=False)
        same = torch.equal(expected, out)
        print(f"greedy tokens {'equal' if same else 'DIFFER from'} the dense weights' greedy decode")
        return 0 if same else 1
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "prune": cmd_prune,
    "eval": cmd_eval,
    "report": cmd_report,
    "speedup": cmd_speedup,
    "plan": cmd_plan,
}
