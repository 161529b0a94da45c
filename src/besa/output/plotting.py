"""The picture users look at: the learned sparsity allocation as a heatmap (blocks x layers) and a per-block line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["allocation_table", "allocation_figure", "plot_allocation", "PLOT_NAME"]

PLOT_NAME = "besa_allocation.png"


def allocation_table(report: dict[str, Any]) -> tuple[list[str], list[str], list[list[float]], list[float]]:
    """From a report: block names, layer names, counted sparsity [block][layer] (NaN where absent), block sparsity.

    Block sparsity is the parameter-weighted mean over the block's pruned linears.
    """
    blocks: dict[str, dict[str, dict[str, Any]]] = {}
    for info in report["layers"].values():
        blocks.setdefault(info["block"], {})[info["layer"]] = info
    layer_names: list[str] = []
    for layers in blocks.values():
        layer_names.extend(n for n in layers if n not in layer_names)
    grid = [
        [layers[n]["sparsity"] if n in layers else float("nan") for n in layer_names]
        for layers in blocks.values()
    ]
    per_block = [
        sum(i["zeros"] for i in layers.values()) / max(sum(i["numel"] for i in layers.values()), 1)
        for layers in blocks.values()
    ]
    return list(blocks), layer_names, grid, per_block


def short_layer_name(name: str) -> str:
    """A heatmap column's label: the linear's own name (``q_proj``), with its projection for an expert's
    (``down_proj.3``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def plot_allocation(report: dict[str, Any], path: str | Path) -> Path:
    """Draw the heatmap and the per-block line into ``path`` (PNG, written atomically)."""
    import matplotlib.pyplot as plt

    fig = allocation_figure(report)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def allocation_figure(report: dict[str, Any]) -> Any:
    """The matplotlib figure of ``plot_allocation``: counted sparsity per (block, layer), and per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    block_names, layer_names, grid, per_block = allocation_table(report)
    data = np.array(grid, dtype=float)  # (blocks, layers)
    target = report["sparsity"]["target"]
    method = report["config"]["method"]
    fig, (ax_map, ax_line) = plt.subplots(
        1, 2, figsize=(4 + 0.6 * len(layer_names) + 5, 1.5 + 0.22 * len(block_names)),
        gridspec_kw={"width_ratios": [max(len(layer_names), 2), 4]},
    )  # fmt: skip
    spread = max(float(np.nanmax(np.abs(data - target))), 0.01)
    image = ax_map.imshow(data, aspect="auto", cmap="RdBu_r", vmin=target - spread, vmax=target + spread)
    ax_map.set_xticks(
        range(len(layer_names)), [short_layer_name(n) for n in layer_names], rotation=45, ha="right"
    )
    ax_map.set_yticks(range(len(block_names)), [str(i) for i in range(len(block_names))])
    ax_map.set_ylabel("block")
    ax_map.set_title(f"{method}: counted sparsity per layer")
    fig.colorbar(image, ax=ax_map, fraction=0.05, pad=0.02)
    ax_line.plot(per_block, range(len(per_block)), marker="o", markersize=3, label="block")
    ax_line.axvline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax_line.yaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers, not 2.5
    ax_line.invert_yaxis()
    ax_line.set_xlabel("sparsity")
    ax_line.set_title("per block")
    ax_line.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def layer_type(row: dict[str, Any]) -> str:
    """A timed linear's name inside its block (``self_attn.q_proj``): its ``type``, or its qualified name without
    the block path (everything up to the block's index)."""
    import re

    return row.get("type") or re.sub(r"^(.*?\.)?\d+\.", "", row["layer"], count=1)


def _by_layer_kind(result: dict[str, Any]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    """The timed linears grouped by their name inside the block (``self_attn.q_proj``), batch and threads."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in result["layers"]:
        groups.setdefault((layer_type(row), row["batch"], row.get("threads", 0)), []).append(row)
    return groups


def _speed_cells(rows: list[dict[str, Any]], tag: str) -> str:
    """Median dense and sparse milliseconds of ``rows`` and their ratio (``tag`` ``"_bf16"``: the bfloat16 pair)."""
    import statistics

    if f"dense{tag}_s" not in rows[0]:
        return f"{'':>10} {'':>10} {'':>9}"
    dense = statistics.median(r[f"dense{tag}_s"] for r in rows) * 1e3
    sparse = statistics.median(r[f"sparse{tag}_s"] for r in rows) * 1e3
    return f"{dense:>10.3f} {sparse:>10.3f} {dense / sparse:>8.2f}x"


def speedup_table(result: dict[str, Any]) -> str:
    """``besa speedup``'s printed table: median dense/sparse milliseconds per layer kind, threads and batch, in the
    model's dtype and (where timed) bfloat16; then the whole model."""
    threads = result["threads"] if isinstance(result["threads"], list) else [result["threads"]]
    lines = [
        f"device {result['device']} ({result['dtype']}, threads {', '.join(map(str, threads))}), sparse kernels: "
        f"{', '.join(result['kinds'])}; medians of {result['repeats']} calls, seqlen {result['seqlen']}",
        f"{'what':<32} {'thr':>3} {'batch':>5} {'dense ms':>10} {'sparse ms':>10} {'speed-up':>9} "
        f"{'bf16 dense':>10} {'bf16 sparse':>10} {'speed-up':>9}",
    ]
    for (short, batch, count), rows in _by_layer_kind(result).items():
        lines.append(f"{short + f' (x{len(rows)})':<32} {count:>3} {batch:>5} {_speed_cells(rows, '')} "
                     f"{_speed_cells(rows, '_bf16')}")  # fmt: skip
    for row in result["model"]:
        lines.append(f"{row['what']:<32} {row.get('threads', 0):>3} {row['batch']:>5} {_speed_cells([row], '')} "
                     f"{_speed_cells([row], '_bf16')}")  # fmt: skip
    lines.append("(speed-up = dense time / sparse time, bf16: dense bfloat16 against sparse bfloat16 values; below 1 "
                 "the sparse kernel is slower)")  # fmt: skip
    return "\n".join(lines)


def plot_speedup(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the speed-ups of ``besa speedup`` in the model's dtype: each layer kind (median over blocks)
    and the whole model, one bar per batch size and thread count, with the break-even line at 1."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_layer_kind(result)
    names = list(dict.fromkeys(short for short, _, _ in groups)) + list(
        dict.fromkeys(r["what"] for r in result["model"])
    )
    settings = sorted(
        {(b, t) for _, b, t in groups} | {(r["batch"], r.get("threads", 0)) for r in result["model"]}
    )
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    width = 0.8 / len(settings)
    for i, (batch, count) in enumerate(settings):
        values = []
        for name in names:
            rows = groups.get((name, batch, count))
            if rows:
                values.append(
                    statistics.median(r["dense_s"] for r in rows)
                    / statistics.median(r["sparse_s"] for r in rows)
                )
            else:
                match = [r["speedup"] for r in result["model"]
                         if r["what"] == name and r["batch"] == batch and r.get("threads", 0) == count]  # fmt: skip
                values.append(match[0] if match else float("nan"))
        label = f"batch {batch}" + (f", {count} thread{'s' * (count > 1)}" if count else "")
        ax.bar([j + i * width for j in range(len(names))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up (dense time / sparse time)")
    ax.set_title(f"sparse vs dense on {result['device']} ({', '.join(result['kinds'])})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
