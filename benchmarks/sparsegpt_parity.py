"""SparseGPT parity: our SparseGPT against llm-compressor's on the very same calibration windows.

Both tools prune the same model at the same sparsity from the same windows (`enwiki-articles`, our sampler, one
file of token ids), each in its own process (CPU time and peak memory are that process's own); both outputs are
scored by `besa eval` on WikiText-2 test (all windows) and PTB valid. The peer lives in its own virtual environment
(`--setup` makes it: CPU torch 2.13.0 + llmcompressor 0.14.0.1), so its pins never touch ours.

    BESA_DATA_DIR=../shared/data python benchmarks/sparsegpt_parity.py --setup --seeds 0,1,2

``--ours parallel,sequential`` runs our SparseGPT once per ``--within-block`` mode (``default``: no flag). The quick
protocol used to compare variants across seeds (never the test set):

    BESA_DATA_DIR=../shared/data python benchmarks/sparsegpt_parity.py --seeds 0,1,2 --nsamples 16 \
        --ppl ptb:valid --max-windows 40 --ours parallel,sequential --section sparsegpt_parity_ptb \
        --results benchmarks/results/sparsegpt_parity_ptb.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = ROOT / ".bench" / "parity"  # the peer's outputs, kept for --rerun-ours
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import protocol_parser, replace_section  # noqa: E402
from baselines import _machine  # noqa: E402

PEER = "llmcompressor==0.14.0.1"
WORKER = ROOT / "benchmarks" / "_parity_worker.py"


def setup_peer(venv: Path) -> Path:
    """Create the peer's virtual environment once; return its interpreter."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, PEER], check=True)
    return python


def _run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def dense_folder(model: str) -> str:
    """A plain Hugging Face folder of ``model`` that both tools can load (the built-in GGUF dequantized once)."""
    from besa.model.loading import _dequantize_gguf, resolve_model

    source = resolve_model(model)
    return str(_dequantize_gguf(Path(source.location))) if source.kind == "gguf" else source.location


def calibration_ids(model_folder: str, args: argparse.Namespace, seed: int, path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from besa.model.data import load_calibration_documents, sample_windows

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    docs = load_calibration_documents(args.calib)
    ids = sample_windows(
        docs, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], args.nsamples, args.seqlen, seed
    )
    save_file({"ids": ids}, str(path))


def zero_facts(ours: Path, peer: Path) -> dict:
    """Counted sparsity of the decoder linears of each output and the share of zero positions they share."""
    from safetensors.torch import load_file

    a, b = load_file(str(ours / "model.safetensors")), load_file(str(peer / "model.safetensors"))
    keys = [k for k in a if ".layers." in k and k.endswith("proj.weight")]
    total = sum(a[k].numel() for k in keys)
    za = sum(int((a[k] == 0).sum()) for k in keys)
    zb = sum(int((b[k] == 0).sum()) for k in keys)
    same = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in keys)
    return {"ours_sparsity": za / total, "peer_sparsity": zb / total, "mask_agreement": same / total}


def evaluate(folder: Path, args: argparse.Namespace) -> dict:
    out = folder / "ppl.json"
    cmd = [
        sys.executable,
        "-m",
        "besa.cli",
        "eval",
        str(folder),
        "--ppl",
        args.ppl,
        "--seqlen",
        str(args.eval_seqlen),
    ]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    _run([*cmd, "--no-progress", "--json", str(out)])
    return json.loads(out.read_text())


def run(args: argparse.Namespace) -> None:
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.render_only:
        write_markdown(args, results)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(f"{args.sparsity}@seed{seed}" not in results for seed in seeds):  # the peer must run: make its env
        peer_python = (
            setup_peer(Path(args.peer_venv)) if args.setup else Path(args.peer_venv) / "bin" / "python"
        )
        if not peer_python.exists():
            sys.exit(f"no peer interpreter at {peer_python}: run with --setup")
    folder = dense_folder(args.model)
    for seed in seeds:
        key = f"{args.sparsity}@seed{seed}"
        if key in results and args.rerun_ours:
            rerun_ours(args, results, key, folder, seed)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(args, results)
            continue
        if key in results:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ids = Path(tmp) / "ids.safetensors"
            calibration_ids(folder, args, seed, ids)
            row: dict = {"sparsity": args.sparsity, "seed": seed}
            sides = [(_side(v), sys.executable) for v in _variants(args)] + [("peer", str(peer_python))]
            for side, python in sides:
                out = Path(tmp) / side.replace(":", "_")
                _run([python, str(WORKER), side, folder if side == "peer" else args.model, str(ids), str(out),
                      str(args.sparsity)])  # fmt: skip
                row[side] = {
                    **json.loads((out / "parity_timing.json").read_text()),
                    "ppl": evaluate(out, args),
                }
            row.update(zero_facts(Path(tmp) / sides[0][0].replace(":", "_"), Path(tmp) / "peer"))
            kept = KEEP / key / "peer"  # for a later --rerun-ours to compare zeros with
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / "peer" / "model.safetensors", kept / "model.safetensors")
        results[key] = row
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        write_markdown(args, results)


def rerun_ours(args: argparse.Namespace, results: dict, key: str, folder: str, seed: int) -> None:
    """Prune and score our side of an existing row again with the code as it is now; the peer's side is kept (its
    output too, under ``.bench/parity``, when an earlier run left it there)."""
    row = results[key]
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.safetensors"
        calibration_ids(folder, args, seed, ids)
        out = Path(tmp) / "ours"
        _run([sys.executable, str(WORKER), "ours", args.model, str(ids), str(out), str(args.sparsity)])
        row.setdefault("ours_earlier", []).append(row["ours"])
        row["ours"] = {**json.loads((out / "parity_timing.json").read_text()), "ppl": evaluate(out, args)}
        peer = KEEP / key / "peer"
        facts = zero_facts(out, peer) if (peer / "model.safetensors").is_file() else None
        if facts is not None:
            row.update(facts)
        else:  # the zeros of our new output against the peer's cannot be compared: the peer's output is gone
            row["ours_sparsity"] = zero_facts(out, out)["ours_sparsity"]
            row["mask_agreement"] = None
    row["rerun_ours"] = True


def _variants(args: argparse.Namespace) -> list[str]:
    return [v.strip() for v in args.ours.split(",") if v.strip()]


def _side(variant: str) -> str:
    """The worker's side name of one of our variants (``ours`` for the defaults)."""
    return "ours" if variant == "default" else f"ours:{variant}"


def _label(side: str) -> str:
    flags = {"dense-target": "--obs-target dense", "mask128": "--mask-block 128"}.get(
        side[5:], f"--within-block {side[5:]}"
    )
    return {"ours": "ours", "peer": "llm-compressor"}.get(side, f"ours `{flags}`")


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    rows = sorted(results.values(), key=lambda r: (r["sparsity"], r["seed"]))
    sets = [d.strip() for d in args.ppl.split(",")]
    sides = [_side(v) for v in _variants(args)] + ["peer"]
    head = " | ".join(f"{s} {_label(side)}" for s in sets for side in sides)
    cpu_head = " | ".join(f"CPU s {_label(side)}" for side in sides)
    lines = [
        "## SparseGPT parity: `besa` against llm-compressor on the same windows"
        + (" (quick protocol: PTB valid)" if args.section != "sparsegpt_parity" else ""),
        "",
        f"Model `{args.model}`; {args.nsamples} x {args.seqlen} calibration tokens of `{args.calib}` drawn by our"
        f" sampler (one file of token ids fed to both tools); {PEER} `oneshot` with `SparseGPTModifier` (block 128,"
        " damping 0.01, the decoder linears, sequential pipeline, fp32 CPU); perplexity by `besa eval` at seqlen"
        f" {args.eval_seqlen}"
        + (f", first {args.max_windows} windows" if args.max_windows else ", all windows")
        + ".",
        f"Machine: {_machine()}. CPU s is the pruning call's process CPU time (model load and save excluded), each"
        " tool alone in its own process, one after the other.",
        "",
        "Command:",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/sparsegpt_parity.py --setup --seeds "
        + ",".join(str(r["seed"]) for r in rows)
        + _command_tail(args),
        "```",
        "",
        f"| sparsity | seed | {head} | sparsity ours | sparsity peer | same zeros | {cpu_head} |",
        "|---|---:|" + "---:|" * (len(sets) * len(sides) + 3 + len(sides)),
    ]
    for r in rows:
        mark = {side: "*" if side == "ours" and r.get("rerun_ours") else "" for side in sides}
        ppl = " | ".join(f"{r[side]['ppl'][s]['ppl']:.2f}{mark[side]}" for s in sets for side in sides)
        cpu = " | ".join(f"{r[side]['cpu_s']:.0f}" for side in sides)
        lines.append(
            f"| {r['sparsity']} | {r['seed']} | {ppl} | {r['ours_sparsity']:.6f} | {r['peer_sparsity']:.6f} |"
            f" {'-' if r['mask_agreement'] is None else format(r['mask_agreement'], '.4f')} | {cpu} |"
        )
    if len(rows) > 1:
        med = " | ".join(
            f"{statistics.median(r[side]['ppl'][s]['ppl'] for r in rows):.2f}" for s in sets for side in sides
        )
        cpu = " | ".join(f"{statistics.median(r[side]['cpu_s'] for r in rows):.0f}" for side in sides)
        lines.append(f"| | median | {med} | | | | {cpu} |")
    if any(r.get("rerun_ours") for r in rows):
        lines += [
            "",
            "\\* our side pruned and scored again with the code at a later commit (`--rerun-ours`; its earlier"
            " results are kept in the results file as `ours_earlier`); the peer's side and its CPU time are from the"
            " first run, and `same zeros` is `-` where the peer's output of that first run was not kept.",
        ]
    if args.note:
        lines += ["", args.note]
    replace_section(Path(args.markdown), args.section, "\n".join(lines))


def _command_tail(args: argparse.Namespace) -> str:
    """The flags of this run that differ from the defaults, for the command line in the section."""
    tail = ""
    for flag, default in (("nsamples", 64), ("ppl", "wikitext2"), ("max_windows", None), ("ours", "default"),
                          ("section", "sparsegpt_parity")):  # fmt: skip
        value = getattr(args, flag)
        if value != default:
            tail += f" --{flag.replace('_', '-')} {value}"
    if Path(args.results).name != "sparsegpt_parity.json":
        tail += f" --results benchmarks/results/{Path(args.results).name}"
    return tail


def build_parser() -> argparse.ArgumentParser:
    p = protocol_parser(__doc__, seed=False)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seeds", default="0", help="calibration seeds, comma-separated; one row each")
    p.add_argument("--ppl", default="wikitext2")
    p.add_argument("--setup", action="store_true", help=f"create the peer's virtual environment ({PEER})")
    p.add_argument("--peer-venv", default=str(ROOT / ".bench" / "llmcompressor"))
    p.add_argument(
        "--ours",
        default="default",
        help="our variants: default, parallel, sequential, dense-target, mask128 (comma list)",
    )
    p.add_argument("--section", default="sparsegpt_parity", help="the BENCHMARKS.md section to write")
    p.add_argument("--note", default="", help="a paragraph under the table")
    p.add_argument("--render-only", action="store_true")
    p.add_argument(
        "--rerun-ours", action="store_true",
        help="rows already measured: prune and score our side again with the current code, keep the peer's",
    )  # fmt: skip
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "sparsegpt_parity.json"))
    p.add_argument("--markdown", default=str(ROOT / "benchmarks" / "NOTES.md"))
    return p


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(build_parser().parse_args())
