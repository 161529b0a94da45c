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
        range(len(layer_names)), [n.split(".")[-1] for n in layer_names], rotation=45, ha="right"
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
