"""Layerwise methods: each linear of a block is pruned on its own from statistics of its inputs (``LayerwisePruner``),
and the selection-only ones among them, which rank each row's weights by a score and keep the survivors as they are
(``ScoredPruner``: magnitude, Wanda)."""

from __future__ import annotations

from abc import abstractmethod

from torch import nn

from besa.engine.record import BlockResult, QuantGrids
from besa.engine.work import BlockWork
from besa.methods.base import Pruner, apply_prune_mask
from besa.methods.cost import BlockShape, MethodCost
from besa.model.blocks import weight_matrix
from besa.stages.masks import select_prune_mask
from besa.stages.selection import SCORERS, LayerStats

__all__ = ["LayerwisePruner", "ScoredPruner"]


class LayerwisePruner(Pruner):
    """A method that prunes each linear on its own from statistics of its inputs on the dense block.

    One calibration pass over the block feeds every layer's ``LayerStats`` (or, with ``within_block ==
    "sequential"``, one pass per group of layers fed the same input, each cut short after that group and run after
    the groups before it are pruned); then ``prune_layer`` runs per layer, followed by round-to-nearest
    quantization when the run quantizes and the method did not do it itself.
    """

    def make_stats(self, layer: nn.Module) -> LayerStats | None:
        """Statistics this method needs for ``layer``, or ``None`` if it needs no calibration data."""
        return None

    @abstractmethod
    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> QuantGrids | None:
        """Zero a ``rate`` share of the weights of ``layer`` (and update the others, if the method does).

        A method that also quantized the layer (``self.quant``) returns its (scale, zero) grids; ``None`` lets the
        engine round the pruned weights to nearest.
        """

    def prune_block(self, work: BlockWork) -> BlockResult:
        result = BlockResult()
        rate = self.allocation.block_rate(work.name)
        stats = {name: self.make_stats(layer) for name, layer in work.linears.items()}
        needs_data = any(s is not None for s in stats.values())
        sequential = needs_data and self.within_block == "sequential"
        for group in work.input_groups() if sequential else [list(work.linears)]:
            if needs_data:
                work.calibrate({name: stats[name] for name in group}, stop_after=group if sequential else ())
            for name in group:
                layer = work.linears[name]
                grids = self.prune_layer(layer, stats.pop(name), rate)
                result.rates[f"{work.name}.{name}"] = rate
                self.finish_layer(result, f"{work.name}.{name}", layer, grids, f"{self.config.method} joint")
        return result


class ScoredPruner(LayerwisePruner):
    """Selection without a weight update: rank each row's weights by the ``score`` of ``stages.selection`` and zero
    the lowest ``rate`` share of every row (or ``n`` of every ``m`` with a pattern); the survivors stay as they are."""

    score: str = "magnitude"
    may_zero_layers = False  # a share of every row below 1 is zeroed: a row, and so the layer, keeps weights

    def make_stats(self, layer: nn.Module) -> LayerStats | None:
        return SCORERS[self.score].stats_for(layer)

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> None:
        scores = SCORERS[self.score].scores(weight_matrix(layer), stats)
        apply_prune_mask(layer, select_prune_mask(scores, rate, self.pattern))

    def method_cost(self, block: BlockShape) -> MethodCost:
        """The scores of one linear at a time: float32, the size of the block's largest weight."""
        return MethodCost({"scores of the largest linear (float32)": 4 * block.largest})
