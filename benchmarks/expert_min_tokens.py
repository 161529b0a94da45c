"""How many routed tokens an expert needs before its method beats plain magnitude: the measured default of
``--expert-min-tokens``.

An expert of a Mixture-of-Experts block is pruned like a linear of its own, from the statistics of the tokens its
router sends it. With few tokens those statistics are thin (Wanda's input norms are noisy, SparseGPT's Hessian
has rank n), and below some count plain weight magnitude, which needs no data, does better. This script measures
that count on real trained weights, since no trained MoE is reachable offline: the linears of SmolLM2-135M (the
built-in ``smollm2-135m``), each pruned from the statistics of only ``n`` calibration tokens, as an expert with
``n`` routed tokens is.

For each linear (attention ``q_proj``, MLP ``gate_proj`` and ``down_proj`` of blocks 0, 7, 15, 23 and 29) its
inputs are taken from the dense model on 32 x 256 tokens of ``enwiki-articles`` (the pool) and on 8 x 256 tokens
of **PTB valid** (held out: the tuning text; WikiText-2 test is never used). For every ``n`` of ``--counts`` and
every seed, ``n`` pool tokens drawn at random calibrate Wanda and SparseGPT (``besa``'s own functions and default
settings) at each setting; magnitude needs none. The score is a linear's relative output error on the held-out
tokens, ``||(W - W') X|| ^ 2 / ||W X|| ^ 2``, and each row gives, over linears and seeds, the median of the
method's error divided by magnitude's (below 1: the method wins), and the share of linears the method wins on.
The same is measured with the whole pool, the method's own record. The default is the smallest count from which
on both methods beat magnitude at every setting (a median ratio below 1, and a win on at least half of the
linears), rounded up to a power of two: below it magnitude, which needs no data, is the better rule (``decide``).

    BESA_DATA_DIR=../shared/data python benchmarks/expert_min_tokens.py [--seeds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402

LINEARS = ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]
BLOCKS = [0, 7, 15, 23, 29]
SETTINGS = ["0.5", "2:4", "0.7"]
COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
METHODS = ["wanda", "sparsegpt"]


def capture(model, tokenizer, args: argparse.Namespace):
    """The inputs of every studied linear on the pool (enwiki) and on the held-out text (PTB valid)."""
    import torch

    from besa.model.blocks import find_blocks
    from besa.model.data import load_calibration_documents, load_eval_text, sample_windows

    docs = load_calibration_documents("enwiki-articles")
    pool_ids = sample_windows(
        docs, lambda t: tokenizer(t)["input_ids"], args.pool_windows, args.seqlen, seed=0
    )
    held = tokenizer(load_eval_text("ptb", split="valid"), return_tensors="pt").input_ids[0]
    held_ids = held[: args.held_windows * args.seqlen].view(args.held_windows, args.seqlen)
    blocks = dict(find_blocks(model))
    names = [f"{b}.{n}" for b in [list(blocks)[i] for i in BLOCKS] for n in LINEARS]
    layers = dict(model.named_modules())
    found: dict[str, dict[str, list]] = {n: {"pool": [], "held": []} for n in names}
    side = {"which": "pool"}
    hooks = [
        layers[n].register_forward_pre_hook(
            lambda _m, a, n=n: found[n][side["which"]].append(a[0].reshape(-1, a[0].shape[-1]).float())
        )
        for n in names
    ]
    with torch.no_grad():
        for which, ids in (("pool", pool_ids), ("held", held_ids)):
            side["which"] = which
            for start in range(0, ids.shape[0], 4):
                model(ids[start : start + 4])
    for h in hooks:
        h.remove()
    return {
        n: (layers[n].weight.detach().float(), torch.cat(v["pool"]), torch.cat(v["held"]))
        for n, v in found.items()
    }


def prune(method: str, w, x, setting: str):
    """``w`` (out, in) pruned by ``method`` from the inputs ``x`` (n, in): besa's own selection and sweep."""
    from besa.methods.configs import SparseGPTConfig
    from besa.methods.sparsegpt import sparsegpt_prune
    from besa.settings.values import parse_pattern
    from besa.stages.masks import select_prune_mask
    from besa.stages.selection import magnitude_scores, wanda_scores
    from besa.stages.update import SweepSettings

    pattern = parse_pattern(setting) if ":" in setting else None
    rate = 0.5 if pattern else float(setting)
    if method == "sparsegpt":
        cfg = SparseGPTConfig()
        hessian = x.T @ x * (2.0 / x.shape[0])
        sweep = SweepSettings(cfg.blocksize, cfg.percdamp, cfg.mask_block, cfg.lsq_iters)
        new_w, _, _ = sparsegpt_prune(w, hessian, rate, pattern, sweep)
        return new_w
    scores = magnitude_scores(w) if method == "magnitude" else wanda_scores(w, x.norm(dim=0))
    return w * ~select_prune_mask(scores, rate, pattern)


def relative_error(w, pruned, held) -> float:
    ref = held @ w.T
    return float((held @ (w - pruned).T).pow(2).sum() / ref.pow(2).sum())


def run(args: argparse.Namespace) -> dict:
    import torch

    from besa.model.loading import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model("smollm2-135m")
    t = time.perf_counter()
    inputs = capture(model, tokenizer, args)
    del model
    counts = [int(c) for c in args.counts.split(",")]
    settings = args.settings.split(",")
    rows: dict[str, dict[str, dict[str, list[float]]]] = {}  # setting -> method -> count -> ratios
    for setting in settings:
        for w, pool, held in inputs.values():
            base = relative_error(w, prune("magnitude", w, pool, setting), held)
            for seed in range(args.seeds):
                order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
                for n in [*counts, pool.shape[0]]:  # the whole pool last: the method's own record
                    x = pool[order[:n]]
                    for method in METHODS:
                        ratio = relative_error(w, prune(method, w, x, setting), held) / base
                        key = str(n) if n in counts else "all"
                        rows.setdefault(setting, {}).setdefault(method, {}).setdefault(key, []).append(ratio)
        Path(args.results + ".partial").write_text(json.dumps(rows) + "\n")  # what is done so far
        print(setting, {m: {n: round(statistics.median(r), 3) for n, r in v.items()} for m, v in rows[setting].items()},
              flush=True)  # fmt: skip
    wins = {
        s: {m: {n: sum(r < 1 for r in v) / len(v) for n, v in by.items()} for m, by in rows[s].items()}
        for s in settings
    }
    median = {
        s: {m: {n: statistics.median(r) for n, r in by.items()} for m, by in rows[s].items()}
        for s in settings
    }
    chosen = decide(median, wins)
    return {
        "command": "BESA_DATA_DIR=../shared/data python benchmarks/expert_min_tokens.py" + _flags(args),
        "machine": _machine(), "seconds": time.perf_counter() - t, "linears": list(inputs), "seeds": args.seeds,
        "pool_tokens": args.pool_windows * args.seqlen, "held_tokens": args.held_windows * args.seqlen,
        "median_ratio": median,
        "win_share": wins, "first_count_won": chosen,
        "default": None if chosen is None else 1 << (chosen - 1).bit_length(),
    }  # fmt: skip


def decide(median: dict, wins: dict) -> int | None:
    """The smallest routed-token count from which on (every larger count of the grid too), at every setting, both
    methods beat magnitude: a median error ratio below 1 and a win on at least half of the linears. Below it
    magnitude, which needs no data, is the better rule for an expert."""
    counts = sorted(int(n) for n in next(iter(next(iter(median.values())).values())) if n != "all")
    good = [
        all(median[s][m][str(n)] < 1 and wins[s][m][str(n)] >= 0.5 for s in median for m in median[s])
        for n in counts
    ]  # fmt: skip
    for i, n in enumerate(counts):
        if all(good[i:]):
            return n
    return None


def _flags(args: argparse.Namespace) -> str:
    defaults = vars(build_parser().parse_args([]))
    said = [f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != defaults[k] and k not in
            ("results", "markdown", "render_only")]  # fmt: skip
    return "".join(said)


def write_markdown(results: dict, path: Path) -> None:
    settings = list(results["median_ratio"])
    counts = [n for n in next(iter(results["median_ratio"][settings[0]].values())) if n != "all"]
    head = [f"{m} @ {s}" for s in settings for m in METHODS]
    lines = [
        "## How many routed tokens an expert needs: the `--expert-min-tokens` default",
        "",
        "An expert with few routed calibration tokens is pruned by weight magnitude instead of its method"
        " (`--expert-min-tokens`). Where the method starts to win was measured on real trained linears, since no"
        " trained MoE is reachable offline: 15 linears of SmolLM2-135M (`q_proj`, `gate_proj`, `down_proj` of"
        " blocks 0, 7, 15, 23, 29), each pruned from the statistics of only n calibration tokens (drawn at random"
        f" from {results['pool_tokens']:,} `enwiki-articles` tokens, {results['seeds']} seeds), as an expert with n"
        " routed tokens is. Score: the linear's relative output error on"
        f" {results['held_tokens']:,} held-out tokens of **PTB valid**, divided by magnitude's (below 1: the method"
        " wins). Cells: the median over linears and seeds, and in brackets the share of them the method wins.",
        "",
        f"Command: `{results['command']}`. Machine: {results['machine']}. {results['seconds'] / 60:.1f} min.",
        "",
        "| routed tokens | " + " | ".join(head) + " |",
        "|---:|" + "---:|" * len(head),
    ]
    for n in [*counts, "all"]:
        cells = [
            f"{results['median_ratio'][s][m][n]:.3f} ({results['win_share'][s][m][n]:.0%})"
            for s in settings for m in METHODS
        ]  # fmt: skip
        label = f"all {results['pool_tokens']:,}" if n == "all" else n
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chosen, default = results["first_count_won"], results["default"]
    lines += [
        "",
        (
            f"From {chosen} routed tokens on (every larger count too), both methods beat magnitude at every"
            f" setting: a median ratio below 1 and a win on at least half of the linears. Below that, magnitude is"
            f" the better rule for an expert. Rounded up to a power of two, **{default}** is"
            f" `--expert-min-tokens`' default."
            if chosen is not None
            else "No count of the grid made both methods win everywhere; the default was not changed by this run."
        ),
    ]
    replace_section(path, "expert-min-tokens", "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default=",".join(map(str, COUNTS)))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pool-windows", type=int, default=32)
    p.add_argument("--held-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "expert_min_tokens.json"))
    p.add_argument("--markdown", default=str(ROOT / "benchmarks" / "NOTES.md"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    path = Path(args.results)
    if args.render_only:  # the decision is made again from the stored medians and win shares
        results = json.loads(path.read_text())
        results["first_count_won"] = chosen = decide(results["median_ratio"], results["win_share"])
        results["default"] = None if chosen is None else 1 << (chosen - 1).bit_length()
        path.write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = run(args)
        path.write_text(json.dumps(results, indent=2) + "\n")
        Path(args.results + ".partial").unlink(missing_ok=True)
    write_markdown(results, Path(args.markdown))


if __name__ == "__main__":
    main()
