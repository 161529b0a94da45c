"""Scale: a model larger than the memory a run may use, pruned with ``--stream``.

    BESA_DATA_DIR=../shared/data python benchmarks/scale.py [--layers 120 --hidden 1024 --ffn 2816]

Builds a randomly initialised LLaMA-architecture model from a config (no download; SmolLM2's tokenizer and
vocabulary so the calibration is real text), saves it sharded in bf16 (about 3.2 GB with the defaults), then
prunes it with Wanda and BESA streamed (a small calibration: quality is not what this measures), and with Wanda
unstreamed for contrast. Each prune runs in its own process under ``/usr/bin/time -v`` (its peak RSS). Every output
is loaded with ``from_pretrained`` and its zeros counted; the streamed Wanda output is compared tensor by tensor with
the unstreamed one (cast to the stored bf16). Writes the ``scale`` section of BENCHMARKS.md and keeps what it has
finished in ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402

RUNS = {  # name -> (method, streamed, extra flags)
    "wanda-stream": ("wanda", True, []),
    "besa-stream": ("besa", True, []),
    "wanda-plain": ("wanda", False, []),
}


def build_source(args: argparse.Namespace, folder: Path) -> None:
    """The random model, saved in bf16 shards with SmolLM2's tokenizer (skipped when already there)."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    import torch
    import transformers

    from besa.model.loading import model_folder

    smol, _ = model_folder("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    print(f"building a {args.layers}-block LLaMA ({args.hidden} wide) in bf16 ...", flush=True)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="500MB")
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(folder)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_prune(args: argparse.Namespace, source: Path, out: Path, method: str, streamed: bool,
              extra: list[str]) -> dict:  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    run_dir = out.with_name(out.name + ".run")
    resume = (
        run_dir / "run.json"
    ).is_file()  # a run of this script stopped midway: go on from its checkpoints
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        "/usr/bin/time", "-v", sys.executable, "-m", "besa.cli", "prune", str(source), "--method", method,
        "--sparsity", "0.5", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib",
        "enwiki-articles", "--out", str(out), "--no-progress", *(["--stream"] if streamed else []), *extra,
        *(["--resume"] if resume else []),
    ]  # fmt: skip
    print("+", " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    report = json.loads((out / "besa_report.json").read_text())
    return {
        "method": method, "streamed": streamed, "flags": extra, "peak_rss_mib": rss_kb / 1024,
        "process_s": wall, "prune_s": report["timings_s"]["prune"], "masked": report["sparsity"]["masked"],
        "report_zeros": report["sparsity"]["pruned_layers_zeros"], "layers": list(report["layers"]),
        "out_bytes": disk_bytes(out), "machine": _machine(), "resumed_blocks": report["run"]["resumed_blocks"],
    }  # fmt: skip


def count_loaded(out: Path, layers: list[str]) -> dict:
    """Load ``out`` with plain ``from_pretrained`` and count the zeros of the pruned linears."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    modules = dict(model.named_modules())
    zeros = sum(int((modules[name].weight == 0).sum()) for name in layers)
    numel = sum(modules[name].weight.numel() for name in layers)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"loaded_zeros": zeros, "loaded_numel": numel, "loaded_dtype": dtype}


def same_weights(streamed: Path, plain: Path) -> tuple[bool, int]:
    """Whether every tensor of ``streamed`` equals ``plain``'s cast to its dtype; and how many were compared."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, str]:
        path = folder / "model.safetensors.index.json"
        if path.is_file():
            return json.loads(path.read_text())["weight_map"]
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")

    a, b = index(streamed), index(plain)
    if set(a) - set(b):
        return False, 0
    for name, file in a.items():
        with safe_open(str(streamed / file), "pt") as f, safe_open(str(plain / b[name]), "pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
            if not torch.equal(x, y.to(x.dtype)):
                return False, len(a)
    return True, len(a)


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    src = results.get("source", {})
    gb = src.get("bytes", 0) / 1e9
    lines = [
        "## Scale: a model larger than a run's memory, streamed block by block (`--stream`)",
        "",
        f"A randomly initialised LLaMA-architecture model built from a config ({src.get('layers')} blocks, hidden "
        f"{src.get('hidden')}, MLP {src.get('ffn')}, SmolLM2's vocabulary and tokenizer, untied head; "
        f"{src.get('params', 0) / 1e9:.2f} B parameters), saved in bf16 shards: **{gb:.2f} GB** on disk. Pruned to "
        f"50% on {args.nsamples} x {args.seqlen} tokens of `enwiki-articles` (quality is not measured here: the "
        "weights are random). Peak RSS is `/usr/bin/time -v`'s maximum resident set size of the whole `besa prune` "
        "process (Python, torch and transformers included); every output is loaded with plain "
        "`AutoModelForCausalLM.from_pretrained` and its zeros counted. Times are rough (runs beside other work); a "
        "resumed run's times cover the blocks it pruned itself, its peak RSS the whole of its own process.",
        "",
        f"Machine: {_machine()}.",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/scale.py",
        "```",
        "",
        "| run | peak RSS MiB | peak RSS / model on disk | prune s | process s | output GB | zeros counted after "
        "from_pretrained | output dtype |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, (method, streamed, _extra) in RUNS.items():
        r = results.get(key)
        label = f"{method} {'`--stream`' if streamed else '(unstreamed: whole model in fp32)'}"
        if r is None:
            lines.append(f"| {label} | (not run yet) | | | | | | |")
            continue
        ratio = r["peak_rss_mib"] * 2**20 / src["bytes"]
        zeros = r.get("loaded_zeros", 0) / max(r.get("loaded_numel", 1), 1)
        if r.get("resumed_blocks"):
            label += f" (resumed after {r['resumed_blocks']} blocks)"
        lines.append(
            f"| {label} | {r['peak_rss_mib']:.0f} | {ratio:.1%} | {r['prune_s']:.0f} | {r['process_s']:.0f} |"
            f" {r['out_bytes'] / 1e9:.2f} | {zeros:.6f} (report: {r['report_zeros'] == r.get('loaded_zeros')}) |"
            f" {r.get('loaded_dtype', '')} |"
        )
    eq = results.get("equality")
    if eq:
        lines += [
            "",
            f"Streamed Wanda vs unstreamed Wanda: {eq['tensors']} tensors compared, "
            + ("**bit-identical** (the unstreamed fp32 output cast to the stored bf16)." if eq["same"]
               else "**they differ**."),
        ]  # fmt: skip
    replace_section(Path(args.markdown), "scale", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=120)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--work", default=str(ROOT / ".bench" / "scale"), help="where the models go (several GB)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def keep() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        write_markdown(args, results)

    if args.render_only:
        write_markdown(args, results)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"llama-{args.layers}x{args.hidden}-bf16"
    build_source(args, source)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    h, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    params = (
        n * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h
    )  # q,k,v,o (full heads), MLP, norms; embed + head
    results["source"] = {"layers": n, "hidden": h, "ffn": f, "params": params, "bytes": disk_bytes(source)}
    keep()
    for key in args.runs.split(","):
        if key in results:
            continue
        method, streamed, extra = RUNS[key]
        out = work / key
        r = run_prune(args, source, out, method, streamed, extra)
        r.update(count_loaded(out, r.pop("layers")))
        results[key] = r
        keep()
        if key != "wanda-plain" and key != "wanda-stream":
            shutil.rmtree(out, ignore_errors=True)
    if "equality" not in results and (work / "wanda-stream").is_dir() and (work / "wanda-plain").is_dir():
        same, count = same_weights(work / "wanda-stream", work / "wanda-plain")
        results["equality"] = {"same": same, "tensors": count}
        keep()
    print(json.dumps({k: v for k, v in results.items()}, indent=1, default=str)[:3000])
    os.sync()


if __name__ == "__main__":
    main()
