"""SparseGPT (Frantar & Alistarh, 2023) as a composition of stages: the run's allocation, the OBS saliency chosen
block by block during the sweep, and the OBS weight update (``besa.stages.update``)."""

from __future__ import annotations

import torch
from torch import nn

from besa.config import NMPattern
from besa.methods.base import LayerwisePruner, QuantGrids
from besa.methods.configs import SparseGPTConfig
from besa.modeling import set_weight_matrix, weight_matrix
from besa.quant import QuantSpec
from besa.stages.selection import HessianStats, LayerStats
from besa.stages.update import BlockShare, NMGroups, SweepQuantizer, obs_sweep

__all__ = ["SparseGPTConfig", "SparseGPTPruner", "sparsegpt_prune"]


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: QuantSpec | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """SparseGPT on one weight (out, in): ``(new weight, prune mask, (scale, zero) or None)``.

    Unstructured: each column block prunes its exact share of ``round(sparsity * out * in)`` weights by OBS
    saliency over the whole block; N:M: the ``n`` lowest of every ``m`` columns of each row. With ``quant`` the
    kept weights are quantized inside the sweep (GPTQ-style). See ``besa.stages.update.obs_sweep``.
    """
    choice = NMGroups(pattern) if pattern is not None else BlockShare(sparsity)
    quantizer = SweepQuantizer(quant) if quant is not None else None
    new_w, prune = obs_sweep(w, hessian, choice, blocksize, percdamp, quantizer)
    return new_w, prune, (quantizer.scale, quantizer.zero) if quantizer is not None else None


class SparseGPTPruner(LayerwisePruner):
    """Prune with SparseGPT's second-order update of the remaining weights.

    Inside a block the layers are pruned group by group (``--within-block sequential``), each on the inputs left
    by the groups pruned before it: on the same windows this beat the papers' one dense pass on every calibration
    seed (BENCHMARKS.md, SparseGPT parity).
    """

    default_within_block = "sequential"

    def make_stats(self, layer: nn.Module) -> LayerStats:
        w = weight_matrix(layer)
        return HessianStats(w.shape[1], w.device)

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> QuantGrids | None:
        assert isinstance(stats, HessianStats)
        cfg = self.method_config
        assert isinstance(cfg, SparseGPTConfig)
        joint = self.config.joint_quant  # the OBS sweep quantizes too
        new_w, _, grids = sparsegpt_prune(
            weight_matrix(layer), stats.hessian, rate, self.pattern, cfg.blocksize, cfg.percdamp, joint
        )
        set_weight_matrix(layer, new_w)
        return grids
