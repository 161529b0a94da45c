"""Decode speed of pruned models on besa's sparse CPU kernels (``besa.load_sparse``) against the same weights dense.

For each model folder (written by ``besa prune --save-format sparse``) and thread count, in one process:

- the machine's memory bandwidth (a 256 MiB copy: bytes read + written per second), the roofline;
- every pruned linear once per pass, in model order (so its weights come from memory, as in a decode step): the
  kernel's time against dense fp32 and dense bf16, and the bytes it reads per second against the roofline;
- greedy decode of ``--tokens`` tokens at batch 1 after a short prompt, dense fp32, dense bf16, sparse fp32 and
  sparse bf16 values: time per token inside the decoder blocks (hooks on the first and last block; the embedding
  and the output head stay dense) and end to end, with the ceilings the bytes read per token allow; the tokens of
  sparse fp32 must equal dense fp32's;
- the same with 4-bit values: sparse 4-bit codes (``load_sparse(bits=4)``, the values rounded at load on groups
  of ``INT4_GROUP`` columns) against dense 4-bit, torch's own CPU int4 weight-only kernel
  (``_weight_int4pack_mm_for_cpu``, what torchao's int4 weight-only runs on the CPU) on the same codes, both in a
  bfloat16 model; per linear also sparse 8-bit codes;
- a prefill of ``--prefill`` tokens, sparse (each linear on the plan measured at load) against dense;
- what the pruned linears hold against their dense bytes.

Medians of ``--repeats``, the variants taking turns run by run (a drift of the machine's speed moves them alike).
Models are pruned first when their folder is missing, with BESA's defaults (no flag but
the sparsity) on ``--nsamples`` x ``--seqlen`` calibration tokens (fewer than the quality tables use: the speed of
a pruned model depends on where its zeros are, not on how well they were chosen)::

    BESA_DATA_DIR=../shared/data python benchmarks/decode.py --work out/decode \\
        [--models smollm2-135m,gemma3-270m] [--settings 0.5,0.7,2:4] [--threads 1,2]

Writes ``benchmarks/results/decode.json``, the ``decode`` section of BENCHMARKS.md and
``benchmarks/results/decode_speedup.png``; keeps finished measurements and skips them when rerun. Runs are kept per
CPU (``cpu_tag``: AMD EPYC and Intel Xeon machines alternate here, and their kernels differ), each CPU with its own
tables and panel of the plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402
from unseen import model_spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "decode.json"
PLOT = ROOT / "benchmarks" / "results" / "decode_speedup.png"
OLD_ROWS = "19490db or earlier (kernels without the prefetch; prefill without the prefill kernel)"
"""What rows measured before runs kept their commit ran."""
PROMPT = list(range(100, 116))  # 16 fixed token ids: every variant decodes the same steps
INT4_GROUP = (
    64  # columns per scale of the 4-bit rows: torch's int4 kernel needs it to divide every linear's width
)


class DenseInt4(torch.nn.Module):
    """A linear on torch's CPU int4 weight-only kernel: codes in [0, 15] packed by torch, a bfloat16 scale and
    offset per (group, row) with ``w = (code - 8) * scale + offset``; bfloat16 inputs and outputs."""

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None
    ):
        super().__init__()
        self.out_features = codes.shape[0]
        self.weight_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        offset = (8 - zero) * scale  # ours is (code - zero) * scale
        self.scales_zeros = torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight_packed, INT4_GROUP, self.scales_zeros
        )
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def dense_int4(model: torch.nn.Module, pruned: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` (bfloat16) with the linears named in ``pruned`` (name -> float32 weight) on ``DenseInt4``, their
    weights rounded to 4-bit codes exactly as ``besa.runtime.layout.quantize`` rounds the sparse ones."""
    from besa.formats.quant import QuantSpec, fake_quantize, quant_params, quantize_codes

    spec = QuantSpec(4, INT4_GROUP)
    for name, w in pruned.items():
        scale, zero = quant_params(w, spec)
        codes = quantize_codes(fake_quantize(w, scale, zero, spec), scale, zero, spec)
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, DenseInt4(codes, scale, zero, getattr(owner, child).bias))
    return model


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a 256 MiB float32 copy (each byte read once and written once)."""
    src = torch.rand(64 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _seconds(lambda: dst.copy_(src), repeats)


def cpu_tag(machine: str) -> str:
    """A short name of the CPU in ``machine`` (``baselines._machine()``): "AMD EPYC", "Intel Xeon" (the machines
    here name no generation, so two generations of one brand would share their rows)."""
    cpu = machine.split("(", 1)[1].rsplit(")", 1)[0] if "(" in machine else machine
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        cpu = cpu.replace(noise, "")
    return " ".join(cpu.split()[:2])


def _split(key: str) -> tuple[str, str, str, str]:
    """(cpu, model, setting, threads) of a run's key."""
    cpu, model, setting, threads = key.split("|")
    return cpu, model, setting, threads


def _migrate(results: dict) -> dict:
    """Results written before runs were kept per CPU: their keys gain the CPU of the file's one machine."""
    old = {k: v for k, v in results.get("runs", {}).items() if k.count("|") == 2}
    for key, row in old.items():
        row.setdefault("machine", results["machine"])
        results["runs"][f"{cpu_tag(row['machine'])}|{key}"] = results["runs"].pop(key)
    for stale in ("machine", "isa", "roofline"):
        results.pop(stale, None)
    return results


def _commit() -> str:
    """The checkout's commit, ``-dirty`` when it has changes."""
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def _folder(work: Path, model: str, setting: str) -> Path:
    return work / f"{model}-besa-{setting.replace(':', 'of')}"


def prune_missing(args: argparse.Namespace, work: Path) -> None:
    for model in args.models.split(","):
        for setting in args.settings.split(","):
            out = _folder(work, model, setting)
            if (out / "besa_report.json").is_file():
                continue
            flag = ["--pattern", setting] if ":" in setting else ["--sparsity", setting]
            cmd = [sys.executable, "-m", "besa.cli", "prune", model_spec(model), "--method", "besa", *flag,
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--save-format", "sparse",
                   "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


class BlockClock:
    """Seconds spent inside the decoder blocks per forward, from the first block's start to the last one's end."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.per_forward: list[float] = []
        self._start = 0.0
        blocks[0].register_forward_pre_hook(self._begin)
        blocks[-1].register_forward_hook(self._end)

    def _begin(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: object) -> None:
        self.per_forward.append(time.perf_counter() - self._start)


def decode(models: dict[str, torch.nn.Module], tokens: int, repeats: int) -> dict[str, dict]:
    """Greedy decode at batch 1 of every model in ``models``, the variants taking turns run by run (so a drift of
    the machine's speed moves them alike): per-token seconds in the blocks and end to end (prefill excluded), and
    the ids, medians over ``repeats`` runs after one warm-up run each."""
    from besa.model.blocks import find_blocks

    clocks = {name: BlockClock([b for _, b in find_blocks(m)]) for name, m in models.items()}
    runs: dict[str, list] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name, model in models.items():
            runs[name].append(_decode_once(model, clocks[name], tokens))
    return {name: {"token_s": median(r[0] for r in done[1:]), "blocks_s": median(r[1] for r in done[1:]),
                   "ids": done[1][2]} for name, done in runs.items()}  # fmt: skip


def _decode_once(model: torch.nn.Module, clock: BlockClock, tokens: int) -> tuple[float, float, list[int]]:
    prompt = torch.tensor([PROMPT])
    model.config.use_cache = True
    clock.per_forward.clear()
    steps: list[float] = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, ids = out.cache, [int(out.logits[0, -1].argmax())]
        for _ in range(tokens - 1):
            t = time.perf_counter()
            out = model(torch.tensor([[ids[-1]]]), cache=past, use_cache=True)
            past = out.cache
            ids.append(int(out.logits[0, -1].argmax()))
            steps.append(time.perf_counter() - t)
    return median(steps), median(clock.per_forward[1:]), ids


def _bf16_linear(w: torch.Tensor):
    return lambda x: F.linear(x.to(torch.bfloat16), w)


def linear_passes(model: torch.nn.Module, int4: torch.nn.Module, repeats: int) -> dict:
    """Every pruned linear of ``model`` once per pass, in model order, at one token: seconds and bytes per shape,
    sparse (float32 values, 8-bit and 4-bit codes) against dense fp32, bf16 and 4-bit (``int4``'s linears)."""
    from besa.formats.quant import QuantSpec
    from besa.runtime.layout import quantize
    from besa.runtime.linear import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    dense32 = [m.packed.dense() for m in layers]
    calls = {
        "sparse": layers,
        "sparse_int8": [SparseLinear(quantize(m.packed, QuantSpec(8, INT4_GROUP))) for m in layers],
        "sparse_int4": [SparseLinear(quantize(m.packed, QuantSpec(4, INT4_GROUP))) for m in layers],
        "dense_fp32": [partial(F.linear, weight=w) for w in dense32],
        "dense_bf16": [_bf16_linear(w.to(torch.bfloat16)) for w in dense32],
        "dense_int4": [m for m in int4.modules() if isinstance(m, DenseInt4)],
    }
    shapes: dict[str, dict] = {}
    per_kind: dict[str, dict[str, list[float]]] = {kind: {} for kind in calls}
    for _ in range(repeats + 1):  # the kinds take turns, pass by pass
        for kind, fns in calls.items():
            spent: dict[str, float] = {}
            for m, fn in zip(layers, fns, strict=True):
                key = f"{m.out_features}x{m.in_features}"
                x = torch.randn(1, 1, m.in_features)
                t = time.perf_counter()
                fn(x)
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
            for key, sec in spent.items():
                per_kind[kind].setdefault(key, []).append(sec)
    for kind, per_shape in per_kind.items():
        for key, values in per_shape.items():
            shapes.setdefault(key, {})[kind] = median(values[1:])
    for key in shapes:
        members = [m for m in layers if f"{m.out_features}x{m.in_features}" == key]
        shapes[key]["count"] = len(members)
        shapes[key]["sparse_bytes"] = sum(m.packed.nbytes for m in members)
        for kind in ("sparse_int8", "sparse_int4"):
            shapes[key][f"{kind}_bytes"] = sum(
                m.packed.nbytes for m in calls[kind] if f"{m.out_features}x{m.in_features}" == key
            )
        shapes[key]["dense_bytes"] = sum(m.packed.rows * m.packed.cols * 4 for m in members)
    return shapes


def bytes_per_token(model: torch.nn.Module) -> dict:
    """Bytes a decode step reads: the blocks' weights (pruned linears as held) and the output head."""
    from besa.model.blocks import find_blocks
    from besa.runtime.linear import SparseLinear

    blocks = [b for _, b in find_blocks(model)]
    dense_blocks = sparse_blocks = 0
    for block in blocks:
        for m in block.modules():
            if isinstance(m, SparseLinear):
                sparse_blocks += m.packed.nbytes
                dense_blocks += m.packed.rows * m.packed.cols * 4
            for p in m.parameters(recurse=False):
                dense_blocks += p.numel() * 4
                sparse_blocks += p.numel() * 4
    head = model.get_output_embeddings().weight.numel() * 4
    return {"blocks_dense": dense_blocks, "blocks_sparse": sparse_blocks, "head": head}


def measure(folder: Path, threads: int, args: argparse.Namespace) -> dict:
    from besa.model.loading import load_model
    from besa.runtime.linear import SparseLinear
    from besa.runtime.load import load_sparse, sparse_bytes

    torch.set_num_threads(threads)
    sparse, _ = load_sparse(folder)
    sparse16, _ = load_sparse(folder, dtype=torch.bfloat16)
    sparse4, _ = load_sparse(folder, dtype=torch.bfloat16, bits=4, group_size=INT4_GROUP)
    dense, _, _ = load_model(str(folder))
    dense16 = load_model(str(folder), dtype=torch.bfloat16)[0]
    pruned = {n: m.packed.dense().float() for n, m in sparse.named_modules() if isinstance(m, SparseLinear)}
    dense4 = dense_int4(load_model(str(folder), dtype=torch.bfloat16)[0], pruned)
    row: dict = {
        "threads": threads,
        "crossover": next(m.crossover for m in sparse.modules() if hasattr(m, "packed")),
    }
    variants = {"dense_fp32": dense, "dense_bf16": dense16, "sparse_fp32": sparse, "sparse_bf16": sparse16,
                "dense_int4": dense4, "sparse_int4": sparse4}  # fmt: skip
    row.update(decode(variants, args.tokens, args.repeats))
    row["same_tokens"] = row["sparse_fp32"]["ids"] == row["dense_fp32"]["ids"]
    row["same_tokens_int4"] = row["sparse_int4"]["ids"] == row["dense_int4"]["ids"]
    for name in variants:
        row[name].pop("ids")
    held, dense_bytes = sparse_bytes(sparse)
    row["held_ratio"] = held / dense_bytes
    held4, dense4_bytes = sparse_bytes(sparse4)
    row["held_ratio_int4"] = held4 / dense4_bytes
    row["bytes"] = bytes_per_token(sparse)
    row["linears"] = linear_passes(sparse, dense4, args.repeats)
    row["prefill"] = prefill(dense, sparse, args)
    return row


def prefill(dense: torch.nn.Module, sparse: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Seconds of one forward of ``--prefill`` tokens, dense fp32 and sparse fp32 (on the plans measured at load,
    kept per weight shape)."""
    prompt = torch.randint(0, 1000, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"dense_fp32": [], "sparse_fp32": []}
    with torch.no_grad():
        for _ in range(
            max(args.repeats, 7) + 1
        ):  # one forward is short and noisy: more repeats, taking turns
            for name, model in (("dense_fp32", dense), ("sparse_fp32", sparse)):
                t = time.perf_counter()
                model(prompt, use_cache=False)
                times[name].append(time.perf_counter() - t)
    plans = {f"{m.out_features}x{m.in_features}": m.plan for m in sparse.modules() if hasattr(m, "plan")}
    return {**{name: median(t[1:]) for name, t in times.items()}, "plans": plans,
            "crossover": next(m.crossover for m in sparse.modules() if hasattr(m, "packed"))}  # fmt: skip


def redo_prefill(results: dict, args: argparse.Namespace) -> None:
    """Measure the prefill of every finished run again (after a change to the prefill path)."""
    from besa.model.loading import load_model
    from besa.runtime.load import load_sparse

    here = cpu_tag(_machine())
    for key, row in results["runs"].items():
        cpu, model, setting, threads = _split(key)
        if cpu != here:
            continue
        torch.set_num_threads(int(threads))
        folder = _folder(args.work, model, setting)
        print(f"prefill again: {key}", flush=True)
        row["prefill"] = prefill(load_model(str(folder))[0], load_sparse(folder)[0], args)
        row["commit"] = _commit()  # the prefill now measures this code (the rest of the row may not)
        row["crossover"] = row["prefill"]["crossover"]
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def write_markdown(results: dict, markdown: Path) -> None:
    runs = results["runs"]
    cpus = sorted({_split(k)[0] for k in runs})
    lines = [
        "## Decode on sparse CPU kernels: pruned models against their dense weights (`besa.load_sparse`)",
        "",
        "Greedy decode at batch 1 after a 16-token prompt, each variant of the same weights in one process: dense "
        "fp32, dense bf16, and the pruned linears on besa's bitmask kernels with fp32 or bf16 values. `blocks` is "
        "the time per token inside the decoder blocks (the embedding and the output head stay dense); `ceiling` is "
        "what the bytes read per token allow (dense bytes / sparse bytes: blocks alone, and with the head). "
        "Per-linear `bandwidth` is the bytes the kernel reads per second, every pruned linear once per pass in "
        "model order, against the copy roofline. `prefill` is one forward of 128 tokens, sparse over dense fp32 "
        "on each linear's plan measured at load (the decode kernel, the prefill kernel or the weight unpacked for a dense "
        "product, whichever was fastest at that many tokens; `plans` in the results file). "
        "Models pruned by BESA's defaults from 16 x 256 calibration tokens "
        "(speed depends on where the zeros are, not on how well they were chosen). Medians of "
        f"{results['repeats']} repeats of {results['tokens']} tokens, the variants taking turns run by run.",
        "",
        "Command (each CPU's rows come from a machine of that CPU; the script keeps the other CPU's rows):",
        "",
        "```",
        "BESA_DATA_DIR=../shared/data python benchmarks/decode.py --work out/decode",
        "```",
    ]
    for cpu in cpus:
        lines += _cpu_tables(cpu, {k: r for k, r in runs.items() if _split(k)[0] == cpu})
    lines += ["", f"![decode speed-up against sparsity]({PLOT.relative_to(ROOT)})"]
    replace_section(markdown, "decode", "\n".join(lines))


def _cpu_tables(cpu: str, runs: dict) -> list[str]:
    """The three tables of one CPU's runs."""
    machines = sorted({r["machine"] for r in runs.values()})
    commits = sorted({r.get("commit", OLD_ROWS) for r in runs.values()})
    roofs = sorted({f"{r['isa']}: " + ", ".join(f"{t} thread(s) {bw / 1e9:.1f} GB/s" for t, bw in r["roofline"].items())
                    for r in runs.values()})  # fmt: skip
    lines = [
        "",
        f"### {cpu}",
        "",
        f"Machine: {'; '.join(machines)}. Code: commit {', '.join(commits)}. Each row names the kernels it ran "
        "(`besa.runtime.kernels`: the "
        "instruction set) and is held against the copy roofline measured in its own invocation: "
        + "; ".join(roofs)
        + ".",
        "",
        "| model | pruned | threads | kernels | blocks ms/token dense fp32 | dense bf16 | sparse fp32 | sparse bf16 | blocks "
        "speed-up vs fp32 | vs bf16 (bf16 values) | ceiling blocks | end-to-end speed-up | ceiling end to end | "
        "linears held / dense | same tokens | prefill sparse / dense |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for key, row in sorted(runs.items()):
        _, model, setting, threads = _split(key)
        b = row["bytes"]
        ceil_blocks = b["blocks_dense"] / b["blocks_sparse"]
        ceil_all = (b["blocks_dense"] + b["head"]) / (b["blocks_sparse"] + b["head"])
        d32, d16, s32, s16 = (row[k] for k in ("dense_fp32", "dense_bf16", "sparse_fp32", "sparse_bf16"))
        lines.append(
            f"| {model} | {setting} | {threads} | {row['isa']} | {d32['blocks_s'] * 1e3:.2f} | {d16['blocks_s'] * 1e3:.2f} | "
            f"{s32['blocks_s'] * 1e3:.2f} | {s16['blocks_s'] * 1e3:.2f} | **{_ratio(d32['blocks_s'], s32['blocks_s'])}** | "
            f"{_ratio(d16['blocks_s'], s16['blocks_s'])} | {ceil_blocks:.2f}x | "
            f"{_ratio(d32['token_s'], s32['token_s'])} | {ceil_all:.2f}x | {row['held_ratio']:.3f} | "
            f"{'yes' if row['same_tokens'] else 'NO'} | {row['prefill']['sparse_fp32'] / row['prefill']['dense_fp32']:.2f} |"
        )
    lines += ["", "With 4-bit values: sparse 4-bit codes (`besa.load_sparse(bits=4)`, rounded at load on groups of "
              f"{INT4_GROUP} columns) against dense 4-bit, torch's CPU int4 weight-only kernel "
              "(`_weight_int4pack_mm_for_cpu`, what torchao's int4 weight-only runs on the CPU) on the same codes, both in "
              "a bfloat16 model. `held` is what the sparse codes hold against the dense codes with the same scales. "
              "`same tokens`: whether the two decode the same greedy tokens (torch's kernel rounds the scales and the "
              "inputs to bfloat16, besa's keeps them in float32, so a close call can go either way).", "",
              "| model | pruned | threads | blocks ms/token dense int4 | sparse int4 | speed-up vs dense int4 | "
              "sparse int4 vs dense fp32 | held / dense 4-bit | same tokens |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for key, row in sorted(runs.items()):
        _, model, setting, threads = _split(key)
        if "dense_int4" not in row:
            continue
        d4, s4, d32 = (
            row["dense_int4"]["blocks_s"],
            row["sparse_int4"]["blocks_s"],
            row["dense_fp32"]["blocks_s"],
        )
        lines.append(f"| {model} | {setting} | {threads} | {d4 * 1e3:.2f} | {s4 * 1e3:.2f} | **{_ratio(d4, s4)}** | "
                     f"{_ratio(d32, s4)} | {row['held_ratio_int4']:.3f} | "
                     f"{'yes' if row['same_tokens_int4'] else 'no'} |")  # fmt: skip
    lines += ["", "Per linear shape (all pruned linears of that shape, one token each, from memory):", "",
              "| model | pruned | threads | shape x count | sparse µs | dense fp32 µs | dense bf16 µs | speed-up vs fp32 | "
              "bandwidth | of roofline | sparse int8 µs | sparse int4 µs | dense int4 µs |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key, row in sorted(runs.items()):
        _, model, setting, threads = _split(key)
        roof = row["roofline"][threads]
        for shape, s in row["linears"].items():
            bw = s["sparse_bytes"] / s["sparse"]
            lines.append(
                f"| {model} | {setting} | {threads} | {shape} x {s['count']} | {s['sparse'] * 1e6:.0f} | "
                f"{s['dense_fp32'] * 1e6:.0f} | {s['dense_bf16'] * 1e6:.0f} | {_ratio(s['dense_fp32'], s['sparse'])} | "
                f"{bw / 1e9:.1f} GB/s | {bw / roof:.2f} | {s.get('sparse_int8', float('nan')) * 1e6:.0f} | "
                f"{s.get('sparse_int4', float('nan')) * 1e6:.0f} | {s.get('dense_int4', float('nan')) * 1e6:.0f} |"
            )
    return lines


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = sorted({_split(k)[0] for k in results["runs"]})
    fig, axes = plt.subplots(1, len(cpus), figsize=(6 * len(cpus), 4), sharey=True, squeeze=False)
    for ax, cpu in zip(axes[0], cpus, strict=True):
        series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        two_four: dict[tuple[str, str], float] = {}
        for key, row in results["runs"].items():
            where, model, setting, threads = _split(key)
            if where != cpu:
                continue
            speed = row["dense_fp32"]["blocks_s"] / row["sparse_fp32"]["blocks_s"]
            if ":" in setting:
                two_four[(model, threads)] = speed
            else:
                series.setdefault((model, threads), []).append((float(setting), speed))
        for (model, threads), points in sorted(series.items()):
            points.sort()
            line = ax.plot(*zip(*points, strict=True), marker="o", label=f"{model}, {threads} thread(s)")[0]
            if (model, threads) in two_four:
                ax.scatter([0.5], [two_four[(model, threads)]], marker="x", s=60, color=line.get_color())
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(cpu)
        ax.set_xlabel("sparsity (x: 2:4)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("decoder blocks: dense fp32 time / sparse time")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "decode")
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--settings", default="0.5,0.7,2:4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument(
        "--redo-prefill", action="store_true", help="measure the prefill of the finished runs again"
    )
    args = p.parse_args()
    from besa.runtime.kernels import ISA_NAMES, kernels

    prune_missing(args, args.work)
    results = _migrate(json.loads(RESULTS.read_text())) if RESULTS.is_file() else {"runs": {}}
    results.update(tokens=args.tokens, repeats=args.repeats)
    machine = _machine()
    here = cpu_tag(machine)
    isa = ISA_NAMES[kernels().isa] if kernels().available else "none (fallback)"
    wanted = [f"{here}|{m}|{s}|{t}" for m in args.models.split(",") for s in args.settings.split(",")
              for t in args.threads.split(",")]  # fmt: skip
    roofline: dict[str, float] = {}
    commit = _commit()
    if any(key not in results["runs"] for key in wanted):  # else: render only
        for threads in args.threads.split(","):
            torch.set_num_threads(int(threads))
            roofline[threads] = copy_bandwidth(args.repeats + 2)
    if args.redo_prefill:
        redo_prefill(results, args)
    for key in wanted:
        if key in results["runs"]:
            continue
        _, model, setting, threads = _split(key)
        print(f"measuring {key}", flush=True)
        run = measure(_folder(args.work, model, setting), int(threads), args)
        results["runs"][key] = {**run, "machine": machine, "isa": isa, "roofline": roofline, "commit": commit}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)
    write_markdown(results, args.markdown)


if __name__ == "__main__":
    main()
