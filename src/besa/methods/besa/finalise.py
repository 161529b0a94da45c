"""The last step of BESA's block (``besa.methods.besa.pruner``): from what was learned to the final masks (with
``--epochs 0``, the default for N:M, nothing was: ``BesaPruner._prune_uniform``).

The learned rates are rounded to the block's exact budget and applied to the layers, either on the frozen weights
(the paper) or through SparseGPT's OBS sweep, which keeps each row's learned count and updates the survivors
(``--weight-update obs``), or through ADMM with gradual pruning, which keeps each row's learned count, chooses the
weights within the row as its iterations go and solves the survivors (``--weight-update admm``,
``besa.stages.admm``); N:M patterns are applied the same three ways (ADMM and the sweep only solve the weights of
the learned patterns); ``WEIGHT_UPDATES`` names the methods of each way. The layers' order, and with a sequential
OBS update the Hessians of each group, come from the block as pruned so far.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from besa.engine.record import BlockResult
from besa.engine.work import BlockWork
from besa.methods.base import Pruner
from besa.methods.besa.config import BesaConfig, weight_update_at
from besa.methods.besa.layer import MaskLogits, PatternLogits, RateLogits, clip_stats
from besa.methods.besa.rates import hard_keep, round_to_budget
from besa.model.blocks import set_weight_matrix, weight_matrix
from besa.stages.admm import AdmmSettings, admm_prune
from besa.stages.selection import HessianStats
from besa.stages.update import (
    GivenMask,
    MaskChoice,
    RowShares,
    SweepQuantizer,
    SweepSettings,
    obs_sweep,
)

__all__ = ["WEIGHT_UPDATES", "FinalMasks"]

WEIGHT_UPDATES: dict[str, tuple[str, str]] = {
    "none": ("_apply_frozen", "_frozen_update"),
    "obs": ("_apply_obs", "_obs_update"),
    "admm": ("_rows_admm", "_admm_update"),
}
"""``--weight-update`` -> the ``FinalMasks`` methods that apply it: to the learned row counts (``result, name,
logits, counts, learned_clip``), and to a given mask (``result, name, layer, hessian, choice``: the learned N:M
patterns, or with ``--epochs 0`` the block rate's uniform choice). Names, not functions, so a subclass's override
is the one called."""


class FinalMasks(Pruner):
    """The part of ``BesaPruner`` that turns the learned logits of a block's linears into their final masks.

    ``cfg`` (BESA's settings), ``_block_rate`` (the block's rate) and ``_groups`` (the block's layers in the order
    their masks are applied) are set by ``BesaPruner``.
    """

    cfg: BesaConfig
    _block_rate: float | None
    _groups: list[list[str]]

    @property
    def weight_update(self) -> str:
        """``--weight-update`` (``auto``, from older recipes, means ``obs``); not given: BESA's default for the run
        (``weight_update_at``)."""
        if self.cfg.weight_update is None:
            joint = self.config.quantization.joint is not None
            return weight_update_at(self.sparsity, self.pattern is not None, joint)
        return "obs" if self.cfg.weight_update == "auto" else self.cfg.weight_update

    @property
    def block_rate(self) -> float:
        """The sparsity of the block being pruned: the allocation's rate for it (``sparsity`` when uniform)."""
        return self._block_rate if self._block_rate is not None else self.sparsity

    @property
    def _sweep(self) -> SweepSettings:
        """The OBS sweep's settings: SparseGPT's defaults, with BESA's own least-squares solve."""
        return SweepSettings(lsq_iters=self.cfg.lsq_iters)

    @property
    def uses_hessian(self) -> bool:
        """Whether the weight update needs each layer's input Hessian (``obs`` and ``admm``)."""
        return self.weight_update in ("obs", "admm")

    @property
    def obs_sequential(self) -> bool:
        """Whether the weight update (OBS or ADMM) goes group by group, each group's Hessians taken after the groups
        before it are pruned (``--within-block sequential``), as SparseGPT does by default."""
        return self.uses_hessian and self.within_block == "sequential"

    def _in_obs_order(self, work: BlockWork, block_logits: dict[str, MaskLogits]) -> Iterator[str]:
        """The layer names in the order their masks are applied; with a sequential OBS update each group's
        Hessians are gathered (on the block as pruned so far) just before its turn."""
        for i, group in enumerate(self._groups):
            if i > 0 and self.uses_hessian:
                hessians = {
                    n: HessianStats(block_logits[n].cols, weight_matrix(block_logits[n].layer).device)
                    for n in group
                }
                work.calibrate(hessians, desc="OBS statistics", stop_after=group)
                for n in group:
                    block_logits[n].hessian = hessians[n].hessian
            yield from group

    def _finalise(
        self, work: BlockWork, block_logits: dict[str, MaskLogits], result: BlockResult, uniform: bool = False
    ) -> dict[str, Any]:
        """Round the learned rates to exactly ``round(target * block params)`` zeros and apply the hard masks.

        ``uniform`` ignores what was learned: every row gets the target rate (the metric's own mask).
        """
        if self.pattern is not None:
            return self._finalise_patterns(work, block_logits, result, uniform)
        with torch.no_grad():
            rates = torch.cat([a.row_rates().detach().cpu() for a in block_logits.values()])
            if uniform:
                rates = torch.full_like(rates, self.block_rate)
            widths = torch.cat([torch.full((a.rows,), a.cols) for a in block_logits.values()])
            budget = round(self.block_rate * int(widths.sum()))
            counts, shift = round_to_budget(rates, widths, budget, self.cfg.max_rate)
            info: dict[str, Any] = {"shift": shift, "layers": {}}
            starts, position = {}, 0
            rows = getattr(self, WEIGHT_UPDATES[self.weight_update][0])
            for name, logits in block_logits.items():
                starts[name], position = position, position + logits.rows
            for name in self._in_obs_order(work, block_logits):
                logits = block_logits[name]
                assert isinstance(logits, RateLogits)
                start = starts[name]
                layer_counts = counts[start : start + logits.rows]
                learned = rates[start : start + logits.rows]
                full_name = f"{work.name}.{name}"
                rows(result, full_name, logits, layer_counts, not uniform)
                logits.hessian = None
                final = layer_counts.float() / logits.cols
                result.rates[full_name] = float(layer_counts.sum()) / logits.numel
                info["layers"][name] = {
                    "learned_rate": float(learned.mean()),
                    "final_rate": float(final.mean()),
                    "row_rates": [round(float(r), 4) for r in final.tolist()]
                    if self.cfg.granularity == "row"
                    else None,
                }
        return info

    def _finalise_patterns(
        self, work: BlockWork, block_logits: dict[str, MaskLogits], result: BlockResult, uniform: bool
    ) -> dict[str, Any]:
        """N:M: every group's most likely pattern (``uniform``: the initial one, the metric's own N:M mask)."""
        info: dict[str, Any] = {"layers": {}}
        given = getattr(self, WEIGHT_UPDATES[self.weight_update][1])
        for name in self._in_obs_order(work, block_logits):
            logits = block_logits[name]
            assert isinstance(logits, PatternLogits)
            if uniform:
                logits.reset()
            full_name = f"{work.name}.{name}"
            given(result, full_name, logits.layer, logits.hessian, GivenMask(~logits.keep()))
            logits.hessian = None
            result.rates[full_name] = logits.pattern.sparsity
            info["layers"][name] = {"patterns_moved": round(logits.moved(), 4)}
        return info

    def _frozen_update(
        self, result: BlockResult, name: str, layer: Any, hessian: torch.Tensor | None, choice: GivenMask
    ) -> None:
        """Weight update ``none`` on a given mask (the learned N:M patterns): the mask on the frozen weights."""
        weight_matrix(layer).masked_fill_(choice.prune.to(layer.weight.device), 0)
        self.finish_layer(result, name, layer, None, "besa n:m")

    def _obs_update(
        self, result: BlockResult, name: str, layer: Any, hessian: torch.Tensor, choice: MaskChoice
    ) -> None:
        """The OBS sweep on ``choice``'s mask, quantizing on its own grids when the run quantizes jointly."""
        joint = self.config.quantization.joint
        quantizer = SweepQuantizer(joint) if joint is not None else None
        new_w, _ = obs_sweep(weight_matrix(layer), hessian, choice, self._sweep, quantizer)
        set_weight_matrix(layer, new_w)
        grids = (quantizer.scale, quantizer.zero) if quantizer is not None else None
        self.finish_layer(result, name, layer, grids, "besa + sparsegpt joint")

    def _admm_update(
        self, result: BlockResult, name: str, layer: Any, hessian: torch.Tensor, choice: MaskChoice
    ) -> None:
        """Weight update ``admm``: ``choice``'s mask structure (the learned row counts, or the learned N:M patterns
        as a given mask) chosen and solved by ADMM with gradual pruning, then rounded to nearest when quantizing."""
        settings = AdmmSettings(lsq_iters=self.cfg.lsq_iters)
        new_w, _ = admm_prune(weight_matrix(layer), hessian, choice, settings)
        set_weight_matrix(layer, new_w)
        self.finish_layer(result, name, layer, None, "besa + admm, rtn")

    def _rows_admm(
        self, result: BlockResult, name: str, logits: RateLogits, counts: torch.Tensor, learned_clip: bool
    ) -> None:
        """Weight update ``admm`` on the learned row counts: ``_admm_update`` on their ``RowShares``."""
        assert logits.hessian is not None
        self._admm_update(result, name, logits.layer, logits.hessian, RowShares(counts, logits.cols))

    def _apply_obs(
        self, result: BlockResult, name: str, logits: RateLogits, counts: torch.Tensor, learned_clip: bool
    ) -> None:
        """Weight update ``obs``: the learned row counts, SparseGPT's choice within each row and its update; with
        joint quantization the sweep quantizes on the learned grids (or fits its own when nothing was learned)."""
        joint = self.config.quantization.joint
        clip = None
        if logits.clip is not None and learned_clip:
            gamma = torch.sigmoid(logits.clip.detach())
            clip = (gamma[0], gamma[1])
        w = weight_matrix(logits.layer)
        quantizer = SweepQuantizer(joint, clip) if joint is not None else None
        assert logits.hessian is not None
        new_w, _ = obs_sweep(w, logits.hessian, RowShares(counts, w.shape[1]), self._sweep, quantizer)
        set_weight_matrix(logits.layer, new_w)
        logits.hessian = None
        grids = (quantizer.scale, quantizer.zero) if quantizer is not None else None
        if clip is not None:
            assert grids is not None
            mode = {"mode": "besa joint (learned clipping) + sparsegpt update", **clip_stats(logits)}
            result.add_grids(name, grids, mode)
        else:
            self.finish_layer(result, name, logits.layer, grids, "besa + sparsegpt joint")

    def _apply_frozen(
        self, result: BlockResult, name: str, logits: RateLogits, counts: torch.Tensor, learned_clip: bool
    ) -> None:
        """Weight update ``none`` (the paper): the learned row counts' hard mask (each row's lowest-ranked weights)
        on the frozen weights; jointly learned grids first."""
        keep = hard_keep(logits.col_rank, counts)
        if logits.clip is not None and learned_clip:
            grids = logits.grids()
            set_weight_matrix(
                logits.layer, logits.quantized(weight_matrix(logits.layer)).masked_fill(~keep, 0)
            )
            result.add_grids(name, grids, {"mode": "besa joint (learned clipping)", **clip_stats(logits)})
        else:
            weight_matrix(logits.layer).masked_fill_(~keep, 0)
            if self.quant is not None:
                self.quantize_rtn(result, name, logits.layer)
