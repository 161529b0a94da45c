"""Counting sparsity and writing ``besa_report.json``."""

from __future__ import annotations

import dataclasses
import platform
import resource
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from besa.engine import distributed
from besa.engine.activations import MemoryBudget
from besa.engine.record import RunRecord
from besa.model.blocks import BlockWeight, find_blocks, find_linears
from besa.model.experts import block_expert_matrices
from besa.model.loading import ModelSource
from besa.settings.config import PruneConfig

__all__ = ["count_layer_sparsity", "model_sparsity", "library_versions", "peak_memory", "build_report"]


def count_layer_sparsity(
    model: nn.Module, block_class: str | None = None, routers: bool = False
) -> dict[str, dict[str, Any]]:
    """Zeros counted in every prunable linear of every decoder block (routers too if ``routers``), by name."""
    layers: dict[str, dict[str, Any]] = {}
    for block_name, block in find_blocks(model, block_class):
        matrices = {name: layer.weight.data for name, layer in find_linears(block, model, routers).items()}
        matrices.update(block_expert_matrices(block))  # every expert's matrices, as the engine pruned them
        for name, w in matrices.items():
            zeros = int((w == 0).sum())
            layers[f"{block_name}.{name}"] = {
                "block": block_name,
                "layer": name,
                "shape": list(w.shape),
                "zeros": zeros,
                "numel": w.numel(),
                "sparsity": zeros / w.numel(),
            }
    return layers


def model_sparsity(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sparsity over the pruned linears and over every parameter of the model (counted zeros)."""
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    params = {id(p): p for p in model.parameters()}.values()
    all_zeros = sum(int((p.data == 0).sum()) for p in params)
    all_numel = sum(p.numel() for p in params)
    return {
        "pruned_layers": zeros / max(numel, 1),
        "pruned_layers_zeros": zeros,
        "pruned_layers_numel": numel,
        "all_parameters": all_zeros / max(all_numel, 1),
        "all_parameters_numel": all_numel,
    }


def block_weight_shares(weights: list[BlockWeight], layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What share of all the blocks' weights (every parameter of two or more dimensions) the pruned linears hold,
    and the counted zeros of those linears over all of them: the figures a weight left dense cannot hide from."""
    total = sum(w.numel for w in weights)
    if not total:
        return {}
    covered = sum(w.numel for w in weights if w.kind == "pruned")
    zeros = sum(v["zeros"] for v in layers.values())
    return {
        "block_weights_numel": total,
        "block_weights_pruned_share": covered / total,
        "block_weights": zeros / total,
    }


def weights_section(weights: list[BlockWeight], record: RunRecord) -> dict[str, Any]:
    """The report's account of every block weight: how many of each kind and rule, each one kept dense, the
    linears left dense although they were to be pruned (name -> why), every expert's routed calibration tokens and
    the experts pruned by the fallback rule (name -> why)."""
    by_rule: dict[str, dict[str, int]] = {}
    for w in weights:
        entry = by_rule.setdefault(f"{w.kind}:{w.rule}", {"tensors": 0, "numel": 0})
        entry["tensors"] += 1
        entry["numel"] += w.numel
    dense = [
        {
            "name": w.name,
            "shape": list(w.shape),
            "kind": w.kind,
            "rule": w.rule,
            **({"why": w.why} if w.why else {}),
        }
        for w in weights
        if w.kind != "pruned"
    ]
    return {
        "by_rule": by_rule, "dense": dense, "left_dense": record.left_dense, "expert_tokens": record.expert_tokens,
        "fallback": record.fallback,
    }  # fmt: skip


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers."""
    import transformers

    return {
        "besa": version("besa"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process and, where used, peak CUDA memory, in MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@dataclass
class RunFacts:
    """What a finished run hands the report besides the model.

    ``counts`` (layers, totals) replaces counting the model's zeros when its blocks are not in memory (a streamed
    run counts them from the checkpoints: ``besa.engine.streaming.count_streamed``). ``weights`` (every block
    weight, classified: ``besa.model.blocks.classify_block_weights``) gives the ``weights`` section and the pruned
    linears' share of all block weights. ``timings`` is filled further until the end of the run.
    """

    source: ModelSource
    config: PruneConfig
    method_config: Any
    pruner: Any
    record: RunRecord
    timings: dict[str, Any]
    budget: MemoryBudget
    run_dir: Path | None = None
    resumed: int = 0
    counts: tuple[dict[str, dict[str, Any]], dict[str, Any]] | None = None
    weights: list[BlockWeight] | None = None


def build_report(model: nn.Module, facts: RunFacts) -> dict[str, Any]:
    """The ``besa_report.json`` of a finished run."""
    config, pruner, record, counts, weights = (
        facts.config,
        facts.pruner,
        facts.record,
        facts.counts,
        facts.weights,
    )
    layers, totals = counts if counts is not None else (None, None)
    if layers is None:
        layers = count_layer_sparsity(model, routers=config.experts.prune_routers)
        totals = model_sparsity(model, layers)
    rates = record.rates
    for name, info in layers.items():
        info["target"] = rates.get(name, config.sparsity)  # the report calls it the target
        info["masked"] = round(
            info["target"] * info["numel"]
        )  # the mask's own count (dense zeros not included)
    masked = sum(info["masked"] for info in layers.values()) / max(
        sum(i["numel"] for i in layers.values()), 1
    )
    return {
        "model": dataclasses.asdict(facts.source),
        "config": {**config.to_dict(), "within_block": pruner.within_block},
        "method_options": facts.method_config.to_dict(),
        "sparsity": {
            "target": config.sparsity,
            "pattern": config.pattern,
            "masked": masked,
            **totals,
            **block_weight_shares(weights or [], layers),
        },  # fmt: skip
        "layers": layers,
        "weights": weights_section(weights or [], record),
        "allocation": pruner.report_allocation(),
        "method": pruner.report_extra(record.facts),
        "quantization": pruner.report_quantization(record.quant_info),
        "refit": pruner.report_refit(record.refit),
        "timings_s": facts.timings,
        "memory": {**peak_memory(), "activations": facts.budget.summary()},
        "run": {
            "run_dir": str(facts.run_dir) if facts.run_dir else None,
            "resumed_blocks": facts.resumed,
            "processes": distributed.world().size,  # torchrun: the calibration windows split over these
            "note": "timings_s.per_block of resumed blocks are those of the run that pruned them",
        },
        "versions": library_versions(),
    }
