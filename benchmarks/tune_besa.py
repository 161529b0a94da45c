"""Tune BESA's settings on PTB validation perplexity (never on the WikiText-2 test set).

Every configuration prunes a fresh copy of the model with the same calibration windows and is scored on the first
``--max-windows`` windows of PTB valid; Wanda and SparseGPT are scored the same way as references. Finished
configurations are kept in a JSON file and skipped on a rerun.

    BESA_DATA_DIR=../shared/data python benchmarks/tune_besa.py --sparsity 0.5 --nsamples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import besa
from besa.model.data import load_calibration_documents, sample_windows
from besa.model.loading import load_model
from besa.settings.config import PruneConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402

# name -> (method, method options); the sweep moves one setting at a time away from the defaults
GRID: dict[str, tuple[str, dict]] = {
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "besa-default": ("besa", {}),
    "besa-dcoef20": ("besa", {"d_coef": 20.0}),
    "besa-dcoef100": ("besa", {"d_coef": 100.0}),
    "besa-dcoef500": ("besa", {"d_coef": 500.0}),
    "besa-adamw-0.05": ("besa", {"optimizer": "adamw", "lr": 0.05}),
    "besa-adamw-0.2": ("besa", {"optimizer": "adamw", "lr": 0.2}),
    "besa-window0.1": ("besa", {"rate_window": 0.1}),
    "besa-window0.35": ("besa", {"rate_window": 0.35}),
    "besa-lam5": ("besa", {"lam": 5.0}),
    "besa-densestream": ("besa", {"target": "dense-stream"}),
    "besa-layer": ("besa", {"granularity": "layer"}),
    "besa-metric-sparsegpt": ("besa", {"metric": "sparsegpt"}),
    "besa-adamw-0.1": ("besa", {"optimizer": "adamw", "lr": 0.1}),
    "besa-adamw-0.02": ("besa", {"optimizer": "adamw", "lr": 0.02}),
    "besa-adamw-0.05-sgptmetric": ("besa", {"optimizer": "adamw", "lr": 0.05, "metric": "sparsegpt"}),
    "besa-adamw-0.05-window0.3": ("besa", {"optimizer": "adamw", "lr": 0.05, "rate_window": 0.3}),
    "besa-adamw-0.05-epochs2": ("besa", {"optimizer": "adamw", "lr": 0.05, "epochs": 2}),
    "besa-adamw-0.05-obs": ("besa", {"optimizer": "adamw", "lr": 0.05, "weight_update": "obs"}),
    # with --wbits: "quant_mode" is passed to besa.prune, not to the method
    "wanda-rtn": ("wanda", {"quant_mode": "rtn"}),
    "besa-adamw-0.05-rtn": ("besa", {"optimizer": "adamw", "lr": 0.05, "quant_mode": "rtn"}),
    "besa-adamw-0.05-clip0.05": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "none", "clip_lr": 0.05},
    ),
    "besa-adamw-0.05-obs-clip0.05": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "obs", "clip_lr": 0.05},
    ),
    "besa-adamw-0.05-clip0.01": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "none", "clip_lr": 0.01},
    ),
    "besa-adamw-0.05-clip0.002": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "none", "clip_lr": 0.002},
    ),
    "besa-adamw-0.05-clip0.0005": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "none", "clip_lr": 0.0005},
    ),
    "besa-adamw-0.05-obs-fixedclip": (  # clipping left at its start, sigmoid(4) = 0.982
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "obs", "clip_lr": 1e-9},
    ),
    "besa-default-clip0.1": ("besa", {"clip_lr": 0.1}),
    "besa-default-clip0.01": ("besa", {"clip_lr": 0.01}),
    "besa-default-fixedclip": ("besa", {"clip_lr": 1e-9}),
    "besa-adamw-0.05-obs-clip0.01": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "obs", "clip_lr": 0.01},
    ),
    # PruneConfig fields (within_block, refit_*) go to besa.prune as settings, the rest as method options
    "sparsegpt-parallel": ("sparsegpt", {"within_block": "parallel"}),  # SparseGPT's default before issue 14
    "wanda-sequential": ("wanda", {"within_block": "sequential"}),
    "sparsegpt-refit8": ("sparsegpt", {"refit_epochs": 8}),
    "sparsegpt-refit8-lr3e-4": ("sparsegpt", {"refit_epochs": 8, "refit_lr": 3e-4}),
    "sparsegpt-refit8-lr1e-3": ("sparsegpt", {"refit_epochs": 8, "refit_lr": 1e-3}),
    "sparsegpt-refit16-lr3e-4": ("sparsegpt", {"refit_epochs": 16, "refit_lr": 3e-4}),
    "sparsegpt-parallel-refit8": ("sparsegpt", {"within_block": "parallel", "refit_epochs": 8}),
    "sparsegpt-parallel-refit8-lr3e-4": (
        "sparsegpt",
        {"within_block": "parallel", "refit_epochs": 8, "refit_lr": 3e-4},
    ),
    "sparsegpt-parallel-refit8-dense": (
        "sparsegpt",
        {"within_block": "parallel", "refit_epochs": 8, "refit_target": "dense"},
    ),
    "sparsegpt-refit8-prunedinput": ("sparsegpt", {"refit_epochs": 8, "refit_target": "pruned-input"}),
    "wanda-refit8": ("wanda", {"refit_epochs": 8}),
    "besa-adamw-0.05-refit8": ("besa", {"optimizer": "adamw", "lr": 0.05, "refit_epochs": 8}),
    "besa-adamw-0.05-obs-seq": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "obs", "within_block": "sequential"},
    ),
    "besa-adamw-0.05-obs-refit8": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "weight_update": "obs", "refit_epochs": 8},
    ),
    "besa-adamw-0.05-obs-seq-refit8-lr3e-4": (
        "besa",
        {
            "optimizer": "adamw",
            "lr": 0.05,
            "weight_update": "obs",
            "within_block": "sequential",
            "refit_epochs": 8,
            "refit_lr": 3e-4,
        },
    ),
    "besa-adamw-0.05-refit8-lr3e-4": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "refit_epochs": 8, "refit_lr": 3e-4},
    ),
    # the optional last stage: the whole model toward the dense model's next-token distribution, masks fixed
    "sparsegpt-kl2-lr1e-4": ("sparsegpt", {"kl_epochs": 2, "kl_lr": 1e-4}),
    "besa-defaults-kl2-lr1e-4": (
        "besa",
        {"kl_epochs": 2, "kl_lr": 1e-4},
    ),  # the defaults (refit included) + KL
    "besa-defaults-kl2-lr3e-5": ("besa", {"kl_epochs": 2, "kl_lr": 3e-5}),
    "besa-defaults-kl4-lr1e-4": ("besa", {"kl_epochs": 4, "kl_lr": 1e-4}),
    "besa-defaults-kl2-rel4e-4": ("besa", {"kl_epochs": 2, "kl_rel_lr": 4e-4}),
    "besa-defaults-kl4-rel4e-4": ("besa", {"kl_epochs": 4, "kl_rel_lr": 4e-4}),
    # SparseGPT's least-squares solve of the kept weights after the sweep (issue 14), with either mask block
    # mask16-lsq0 was the default before the solve, mask128-lsq0 is the paper's, mask128-lsq20 the default since
    "sparsegpt-mask16-lsq0": ("sparsegpt", {"mask_block": 16, "lsq_iters": 0}),
    "sparsegpt-mask16-lsq20": ("sparsegpt", {"mask_block": 16, "lsq_iters": 20}),
    "sparsegpt-mask128-lsq0": ("sparsegpt", {"mask_block": 128, "lsq_iters": 0}),
    "sparsegpt-mask128-lsq20": ("sparsegpt", {"mask_block": 128, "lsq_iters": 20}),
    "sparsegpt-mask128-lsq50": ("sparsegpt", {"mask_block": 128, "lsq_iters": 50}),
    "besa-lsq0": ("besa", {"lsq_iters": 0}),  # BESA's defaults (refit included) without / with the solve
    "besa-lsq20": ("besa", {"lsq_iters": 20}),
    "besa-lsq20-refit0": ("besa", {"lsq_iters": 20, "refit_epochs": 0}),
    "besa-refit2": ("besa", {"refit_epochs": 2}),  # the default below 70% (from 70%: besa-refit2-prunedinput)
    "besa-lsq20-refit2": ("besa", {"lsq_iters": 20, "refit_epochs": 2}),
    "besa-lsq0-refit0": ("besa", {"lsq_iters": 0, "refit_epochs": 0}),
    # issue 37: why the refit loses from 70% on, and what keeps its gain there (a lower rate, the block's own
    # function as the target, a penalty on the move away from the solved weights)
    "besa-refit2-lr1e-4": ("besa", {"refit_epochs": 2, "refit_lr": 1e-4}),
    "besa-refit2-prunedinput": ("besa", {"refit_epochs": 2, "refit_target": "pruned-input"}),
    "besa-refit2-anchor1": ("besa", {"refit_epochs": 2, "refit_anchor": 1.0}),
    "besa-refit2-anchor10": ("besa", {"refit_epochs": 2, "refit_anchor": 10.0}),
    # issue 37: the mask chosen and the survivors solved together by ADMM with gradual pruning (Boza, 2024), alone
    # on the uniform allocation (--method admm) and as BESA's weight update within the learned row counts
    "admm": ("admm", {}),
    "besa-admm": ("besa", {"weight_update": "admm"}),
    "besa-admm-refit0": ("besa", {"weight_update": "admm", "refit_epochs": 0}),
    "besa-admm-refit2-prunedinput": (
        "besa",
        {"weight_update": "admm", "refit_epochs": 2, "refit_target": "pruned-input"},
    ),
    "besa-admm-refit2-densestream": (
        "besa",
        {"weight_update": "admm", "refit_epochs": 2, "refit_target": "dense-stream"},
    ),
    "besa-refit2-densestream": ("besa", {"refit_epochs": 2, "refit_target": "dense-stream"}),
    "admm-refit2-prunedinput": ("admm", {"refit_epochs": 2, "refit_target": "pruned-input"}),
    # issue 37: the refit's loss weighing every token alike (--refit-loss token) instead of by its squared norm
    "admm-refit2-prunedinput-token": (
        "admm",
        {"refit_epochs": 2, "refit_target": "pruned-input", "refit_loss": "token"},
    ),
    # issue 37: the refit's Adam rate relative to each linear's surviving weights (Gemma-3-270M's are 5x smaller)
    "admm-refit2-prunedinput-rel": (
        "admm",
        {"refit_epochs": 2, "refit_target": "pruned-input", "refit_rel_lr": 1.2e-3},
    ),
    # issue 37: the N:M default's refit (relative rate) with every token weighed alike, and with 4 epochs
    "admm-refit2-prunedinput-rel-token": (
        "admm",
        {"refit_epochs": 2, "refit_target": "pruned-input", "refit_rel_lr": 1.2e-3, "refit_loss": "token"},
    ),
    "admm-refit4-prunedinput-rel": (
        "admm",
        {"refit_epochs": 4, "refit_target": "pruned-input", "refit_rel_lr": 1.2e-3},
    ),
    # the defaults, with the N:M default's relative rate (before issue 37 made it the default from 70%)
    "besa-refit-rel": ("besa", {"refit_rel_lr": 1.2e-3}),
    "besa-refit2-token": ("besa", {"refit_epochs": 2, "refit_loss": "token"}),
    "besa-refit2-prunedinput-token": (
        "besa",
        {"refit_epochs": 2, "refit_target": "pruned-input", "refit_loss": "token"},
    ),
    # issue 37: the residual stream turned by its principal axes before pruning (--rotate pca), alone and with BESA
    "sparsegpt-rotate": ("sparsegpt", {"rotate": "pca"}),
    "besa-rotate": ("besa", {"rotate": "pca"}),
    "admm-rotate": ("admm", {"rotate": "pca"}),
    # with --pattern N:M: BESA learns each group's pattern (the wanda / sparsegpt rows are the references); since issue
    # 37 an N:M run learns only with --epochs 1 (its default keeps ADMM's patterns: besa-default, and the rows before
    # ran with the N:M defaults of their time: the OBS sweep and the dense-stream refit)
    "besa-nm-adamw-0.05-epochs3": ("besa", {"optimizer": "adamw", "lr": 0.05, "epochs": 3}),
    "besa-nm-adamw-0.05-epochs3-obs-seq": (
        "besa",
        {"optimizer": "adamw", "lr": 0.05, "epochs": 3, "weight_update": "obs", "within_block": "sequential"},
    ),
    "besa-nm-adamw-0.2-epochs3": ("besa", {"optimizer": "adamw", "lr": 0.2, "epochs": 3}),
    # what the learned N:M masks are worth under the defaults' update: the same OBS update, solve and refit on
    # SparseGPT's own mask (sparsegpt-refit2) and on the metric's mask, never moved (lr 0: the prior's argmax)
    "sparsegpt-refit2": ("sparsegpt", {"refit_epochs": 2}),
    "besa-nm-lr0": ("besa", {"epochs": 1, "lr": 0.0}),
    "besa-nm-sharpness3": ("besa", {"epochs": 1, "nm_sharpness": 3.0}),
    # the 2:4 gap on PTB valid: the patterns started from Wanda's metric (the N:M default before it measured
    # worse, with and without the refit) or from SparseGPT's OBS saliency (the default since, `--metric auto`)
    "besa-nm-metric-wanda": ("besa", {"epochs": 1, "metric": "wanda"}),
    "besa-nm-metric-wanda-refit0": ("besa", {"epochs": 1, "metric": "wanda", "refit_epochs": 0}),
    "besa-nm-metric-sparsegpt": ("besa", {"epochs": 1, "metric": "sparsegpt"}),
    "besa-nm-metric-sparsegpt-refit0": ("besa", {"epochs": 1, "metric": "sparsegpt", "refit_epochs": 0}),
    # issue 37: the patterns started from ADMM's own N:M mask (the saliency its final projection chose by)
    "besa-nm-metric-admm": ("besa", {"epochs": 1, "metric": "admm"}),
    "besa-nm-metric-admm-prunedinput": (
        "besa",
        {"epochs": 1, "metric": "admm", "refit_target": "pruned-input"},
    ),
}
SETTINGS = {name for name, _ in PruneConfig.settings()}
"""Options of a configuration that are run settings (``PruneConfig`` fields), not the method's own."""


def write_markdown(path: Path, results: dict, command: str) -> None:
    """The tuning table, one row per configuration, grouped by setting, best first."""
    lines = [
        "## BESA settings, scored on PTB valid (not on the test set)",
        "",
        "Each row prunes SmolLM2-135M with the same calibration windows of `enwiki-articles` (seed 0 unless the setting names another) and scores",
        "the first windows of PTB **valid** at seqlen 512, so settings are chosen without looking at WikiText-2",
        "test. Wanda and SparseGPT are scored the same way for reference. One thread per process; `prune s` is",
        "wall time and includes any wait behind other work on the machine (the first rows of a sweep ran at the",
        "lowest priority beside the main benchmark), so read it as a rough cost, not a speed measurement.",
        "",
        "```",
        command,
        "```",
        "",
        "The setting names the run: `s<sparsity>` (or `p<N:M>`)`-n<calibration windows>x<tokens>-ptbvalid<windows>x<seqlen>`, and",
        "`-w<bits>g<group size>` when the weights are quantized (`--wbits`; `rtn` rows round after pruning, the",
        "others quantize jointly: SparseGPT inside its sweep, BESA with learned clipping, AdamW at `clip_lr`).",
        "",
        "| setting | configuration | options | PTB valid ppl | prune s |",
        "|---|---|---|---:|---:|",
    ]
    rows = sorted(results.items(), key=lambda kv: (kv[0].split("/")[0], kv[1]["ptb_valid_ppl"]))
    for key, r in rows:
        setting, name = key.split("/", 1)
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        lines.append(f"| {setting} | {name} | {options} | {r['ptb_valid_ppl']:.2f} | {r['prune_s']:.0f} |")
    replace_section(path, "besa-tuning", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="enwiki-articles")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default=None, help="N:M instead of --sparsity, e.g. 2:4")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument(
        "--seed", type=int, default=0, help="calibration seed (other than 0: named in the setting)"
    )
    p.add_argument("--wbits", type=int, default=16, help="weight bits (16: no quantization)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "tune_besa.json"))
    p.add_argument("--markdown", default=str(ROOT / "benchmarks" / "NOTES.md"))
    p.add_argument(
        "--render-only", action="store_true", help="rewrite the table from the results file, run nothing"
    )
    args = p.parse_args()
    command = (
        "BESA_DATA_DIR=../shared/data python benchmarks/tune_besa.py [--sparsity 0.5 | --pattern 2:4] [--wbits 16] "
        "[--nsamples 32 --seqlen 256] [--seed 0] [--only NAME,...]"
    )

    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        write_markdown(Path(args.markdown), results, command)
        return
    dense, tokenizer, _ = load_model(args.model)
    docs = load_calibration_documents(args.calib)
    ids = sample_windows(
        docs,
        lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
        args.nsamples,
        args.seqlen,
        args.seed,
    )
    target = f"p{args.pattern}" if args.pattern else f"s{args.sparsity}"
    setting = f"{target}-n{args.nsamples}x{args.seqlen}-ptbvalid{args.max_windows}x{args.eval_seqlen}"
    if args.wbits < 16:
        setting += f"-w{args.wbits}g{args.group_size}"
    if args.seed:
        setting += f"-seed{args.seed}"
    names = args.only.split(",") if args.only else list(GRID)
    for name in names:
        key = f"{setting}/{name}"
        if key in results:
            continue
        method, options = GRID[name]
        method_options = {k: v for k, v in options.items() if k not in SETTINGS}
        settings = {"quant_mode": "joint", **{k: v for k, v in options.items() if k in SETTINGS}}
        start = time.perf_counter()
        pruned = besa.prune(
            copy.deepcopy(dense), tokenizer=tokenizer, method=method, calib_ids=ids,
            **({"pattern": args.pattern} if args.pattern else {"sparsity": args.sparsity}),
            method_options=method_options, progress=False, wbits=args.wbits, group_size=args.group_size,
            checkpoint=False, **settings,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        ppl = besa.evaluate(
            pruned.model, tokenizer=tokenizer, datasets=["ptb:valid"], seqlen=args.eval_seqlen,
            max_windows=args.max_windows, progress=False,
        )["ptb:valid"]  # fmt: skip
        results[key] = {"method": method, "options": options, "ptb_valid_ppl": ppl["ppl"], "prune_s": seconds}
        if method == "besa" and not args.pattern:  # N:M learns patterns, not rates: no budget shift
            blocks = pruned.report["method"]["blocks"].values()
            results[key]["mean_abs_shift"] = sum(abs(b["shift"]) for b in blocks) / len(blocks)
        elif method == "besa":
            # learned patterns only: the N:M default follows ADMM's patterns and has no such facts
            layers = [i for b in pruned.report["method"]["blocks"].values() for i in b["layers"].values()]
            moved = [i["patterns_moved"] for i in layers if "patterns_moved" in i]
            if moved:
                results[key]["patterns_moved"] = sum(moved) / len(moved)
        if pruned.report.get("kl"):  # the KL stage: epochs run, held-out KL before and after each epoch
            results[key]["kl"] = {k: pruned.report["kl"].get(k) for k in ("epochs", "held_out", "train")}
        if pruned.report.get("refit"):
            refits = pruned.report["refit"]["blocks"].values()
            results[key]["refit_epochs_run"] = [b["epochs"] for b in refits]
            # per block: the first and last epoch's mean training loss, held-out loss before / at its best epoch
            results[key]["refit_losses"] = [
                [b["train"][0], b["train"][-1], b["held_out"][0], min(b["held_out"])]
                for b in refits if b.get("held_out") and b.get("train")
            ]  # fmt: skip
        print(f"{key}: ptb valid {ppl['ppl']:.3f} ({seconds:.0f}s)", flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        write_markdown(Path(args.markdown), results, command)
        del pruned


if __name__ == "__main__":
    main()
