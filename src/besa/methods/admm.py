"""ADMM pruning (Boža, 2024) as a layerwise method: the run's allocation, each layer's mask chosen and its kept
weights solved together by ADMM with gradual pruning (``besa.stages.admm``), from the same Hessian as SparseGPT."""

from __future__ import annotations

from torch import nn

from besa.engine.record import QuantGrids
from besa.errors import BesaError
from besa.methods.configs import AdmmConfig
from besa.methods.cost import BlockShape, MethodCost, admm_bytes, obs_hessians
from besa.methods.layerwise import LayerwisePruner
from besa.model.blocks import set_weight_matrix, weight_matrix
from besa.settings.config import MethodConfig, PruneConfig
from besa.stages.admm import AdmmSettings, admm_prune
from besa.stages.selection import HessianStats, LayerStats
from besa.stages.update import uniform_choice

__all__ = ["AdmmConfig", "AdmmPruner"]


class AdmmPruner(LayerwisePruner):
    """Prune every linear by ADMM: its share of the layer's weights (a share of the whole layer, as SparseGPT's,
    or ``n`` of every ``m`` with a pattern), chosen as the iterations solve the survivors. The layers of a block
    go group by group (``--within-block sequential``), each on the inputs left by the groups pruned before it.
    Quantizing runs round to nearest after pruning (``--quant-mode rtn``)."""

    default_within_block = "sequential"

    def __init__(self, method_config: MethodConfig, config: PruneConfig) -> None:
        super().__init__(method_config, config)
        assert isinstance(method_config, AdmmConfig)
        if self.config.quantization.joint is not None:
            raise BesaError("--method admm cannot quantize jointly: add --quant-mode rtn")
        self.settings = AdmmSettings(
            method_config.admm_iters, method_config.admm_gradual, method_config.admm_rho,
            method_config.admm_damp, method_config.lsq_iters,
        )  # fmt: skip

    def method_cost(self, block: BlockShape) -> MethodCost:
        """The Hessians of one group of linears at a time, and the iterates of the largest linear."""
        work = obs_hessians(block, self.within_block == "sequential", self.settings.lsq_iters > 0)
        work.update(admm_bytes(block))
        return MethodCost(work)

    def make_stats(self, layer: nn.Module) -> LayerStats:
        w = weight_matrix(layer)
        return HessianStats(w.shape[1], w.device)

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> QuantGrids | None:
        assert isinstance(stats, HessianStats)
        new_w, _ = admm_prune(
            weight_matrix(layer), stats.hessian, uniform_choice(self.pattern, rate), self.settings
        )
        set_weight_matrix(layer, new_w)
        return None
