"""The method interface: a ``Pruner`` supplies the per-block step of the sequential engine."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from besa.config import MethodConfig, NMPattern, PruneConfig
from besa.modeling import weight_matrix
from besa.pipeline import BlockWork

__all__ = ["Pruner", "LayerwisePruner", "LayerStats"]


class LayerStats:
    """Running statistics of one linear's inputs, fed batch by batch during the calibration pass."""

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of inputs ``x`` of shape (..., in_features)."""
        raise NotImplementedError


class Pruner(ABC):
    """Base class of every pruning method; subclasses are registered with ``besa.registry.register_method``.

    ``needs_calibration = False`` lets the engine skip the calibration data and the block forwards entirely.
    """

    needs_calibration: bool = True

    @property
    def needs_dense_stream(self) -> bool:
        """Whether the engine must also carry the dense model's own activations (``BlockWork.dense_outputs``)."""
        return False

    def __init__(self, method_config: MethodConfig, config: PruneConfig) -> None:
        self.method_config = method_config
        self.config = config
        self.layer_targets: dict[str, float] = {}

    @property
    def sparsity(self) -> float:
        assert self.config.sparsity is not None
        return self.config.sparsity

    @property
    def pattern(self) -> NMPattern | None:
        return self.config.nm

    @abstractmethod
    def prune_block(self, work: BlockWork) -> None:
        """Prune the linears of ``work.module`` in place (weights of pruned positions set to exactly zero)."""

    def report_extra(self) -> dict:
        """Method-specific facts for ``besa_report.json`` (learned allocations, fallbacks, ...)."""
        return {}

    def block_record(self, block_name: str) -> dict:
        """JSON-able facts about a finished block, kept in its checkpoint so a resumed run reports them too."""
        prefix = f"{block_name}."
        return {"layer_targets": {k: v for k, v in self.layer_targets.items() if k.startswith(prefix)}}

    def restore_block(self, block_name: str, record: dict) -> None:
        """Take back what ``block_record`` gave for a block loaded from a checkpoint."""
        self.layer_targets.update(record.get("layer_targets", {}))


class LayerwisePruner(Pruner):
    """A method that prunes each linear on its own from statistics of its inputs on the dense block.

    One calibration pass over the block feeds every layer's ``LayerStats``; then ``prune_layer`` runs per layer.
    """

    def make_stats(self, layer: nn.Module) -> LayerStats | None:
        """Statistics this method needs for ``layer``, or ``None`` if it needs no calibration data."""
        return None

    @abstractmethod
    def prune_layer(self, layer: nn.Module, stats: LayerStats | None) -> None:
        """Zero the pruned weights of ``layer`` (and update the others, if the method does)."""

    def prune_block(self, work: BlockWork) -> None:
        stats = {name: self.make_stats(layer) for name, layer in work.linears.items()}
        if any(s is not None for s in stats.values()):

            def feed(name: str, x: torch.Tensor) -> None:
                if stats[name] is not None:
                    stats[name].add(x)

            with work.input_hooks(feed):
                work.forward_all("Calibrating")
        for name, layer in work.linears.items():
            self.prune_layer(layer, stats[name])
            self.layer_targets[f"{work.name}.{name}"] = self.sparsity
            del stats[name]


def apply_prune_mask(layer: nn.Module, prune: torch.Tensor) -> None:
    """Set the weights of ``layer`` where ``prune`` (out, in) is True to exactly zero."""
    weight_matrix(layer).masked_fill_(prune.to(layer.weight.device), 0)
