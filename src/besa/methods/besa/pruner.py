"""BESA (Xu et al., ICLR 2024): per block, learn each row's (or layer's) pruning rate by minimising the block's
output reconstruction error, with the weights frozen; then prune to an exact budget. With ``--pattern N:M`` it
learns which N of every M weights go instead (an extension: one distribution per group over its patterns)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from besa.engine.activations import ActivationStore
from besa.engine.pipeline import BlockWork
from besa.engine.record import BlockResult
from besa.methods.base import Pruner
from besa.methods.besa.config import BesaConfig, refit_epochs_at
from besa.methods.besa.layer import (
    Allocation,
    LayerAllocation,
    NonFiniteLoss,
    PatternAllocation,
    clip_stats,
)
from besa.methods.besa.rates import candidate_rates, hard_keep, round_to_budget, tilted_logits
from besa.methods.besa.training import train_block
from besa.model.blocks import set_weight_matrix, weight_matrix
from besa.settings.config import MethodConfig
from besa.stages.selection import HessianStats, get_scorer
from besa.stages.update import (
    GivenMask,
    MaskChoice,
    RowShares,
    SweepQuantizer,
    obs_sweep,
)

__all__ = ["BesaPruner"]

log = logging.getLogger(__name__)


class BesaPruner(Pruner):
    """Blockwise Parameter-Efficient Sparsity Allocation.

    With ``--wbits`` and ``--quant-mode joint`` it also learns per-(row, group) clipping strengths (OmniQuant's
    learnable weight clipping, sigmoid of a logit initialised at 4) together with the sparsity logits, under the
    same block loss, the rounding passed straight through; by default (``--weight-update obs``) SparseGPT's OBS
    sweep then quantizes on the learned grids with the learned row counts. ``rtn`` learns the masks at full
    precision and rounds to nearest after.

    With ``--pattern N:M`` every layer gets a ``PatternAllocation`` (a distribution per group of M weights over
    its N:M patterns) instead of rates; the same loop trains it, and the final mask is every group's most likely
    pattern, with the OBS update on that fixed mask when ``--weight-update obs``. No clipping is learned then
    (with ``--wbits`` the OBS sweep fits its own grids, or the weights are rounded to nearest).
    """

    # the defaults measured best on PTB valid (BENCHMARKS.md, besa-tuning): AdamW at 0.05, the OBS update group by
    # group with the least-squares solve, then 2 epochs of blockwise refit below 70% sparsity and none from 70% on
    # (``refit_epochs_at``); `--recipe besa-paper` is the paper's form
    default_within_block = "sequential"

    def refit_default(self) -> int:
        return refit_epochs_at(self.sparsity)

    def __init__(self, method_config: MethodConfig, config: Any) -> None:
        super().__init__(method_config, config)
        assert isinstance(method_config, BesaConfig)
        self.cfg = method_config
        self.metric = method_config.resolved_metric(self.pattern is not None)
        self.scorer = get_scorer(self.metric)
        self._target: float | None = None
        self._groups: list[list[str]] = []  # the block's layers in the order their masks are applied

    @property
    def needs_dense_stream(self) -> bool:
        return self.cfg.target == "dense-stream" or super().needs_dense_stream

    @property
    def weight_update(self) -> str:
        """``--weight-update`` (``auto``, from older recipes, means ``obs``)."""
        return "obs" if self.cfg.weight_update == "auto" else self.cfg.weight_update

    # -- statistics and ranking -------------------------------------------------------------------------------
    @property
    def target(self) -> float:
        """The sparsity of the block being pruned: the allocation's rate for it (``sparsity`` when uniform)."""
        return self._target if self._target is not None else self.sparsity

    def _candidate_rates(self) -> torch.Tensor:
        low = max(0.0, self.target - self.cfg.rate_window)
        high = min(self.cfg.max_rate, self.target + self.cfg.rate_window)
        return candidate_rates(self.cfg.candidates, low, high)

    def _calibrate(self, work: BlockWork) -> tuple[dict[str, Allocation], ActivationStore | None]:
        """One dense pass: importance statistics of every linear and the block's outputs on the pruned stream (and,
        for the OBS update, the Hessians of the layers whose inputs the pruning of the block cannot change yet:
        all of them with ``--within-block parallel``, the first group's with ``sequential``)."""
        stats = {name: self.scorer.stats_for(layer) for name, layer in work.linears.items()}
        self._groups = work.input_groups() if self.obs_sequential else [list(work.linears)]
        hessians = {
            name: stats[name] if isinstance(stats[name], HessianStats)
            else HessianStats(weight_matrix(work.linears[name]).shape[1], weight_matrix(work.linears[name]).device)
            for name in self._groups[0]
        } if self.weight_update == "obs" else {}  # fmt: skip
        outputs = work.calibrate(stats, hessians, keep_outputs=self.cfg.target == "pruned-input")
        rates = self._candidate_rates().to(work.device)
        init = tilted_logits(rates.cpu(), self.target).to(work.device)
        allocs: dict[str, Allocation] = {}
        for name, layer in work.linears.items():
            scores = self.scorer.scores(weight_matrix(layer), stats.pop(name))
            if self.pattern is not None:
                allocs[name] = PatternAllocation(name, layer, scores, self.pattern, self.cfg.nm_sharpness)
            else:
                order = torch.argsort(scores, dim=1, stable=True)  # (R, C) ascending importance
                groups = order.shape[0] if self.cfg.granularity == "row" else 1
                allocs[name] = LayerAllocation(
                    name, layer, order, rates, init.expand(groups, -1).clone(), self.quant,
                    learn_clip=self.config.joint_quant is not None,
                )  # fmt: skip
            if name in hessians:
                allocs[name].hessian = hessians.pop(name).hessian
        return allocs, outputs

    @property
    def obs_sequential(self) -> bool:
        """Whether the OBS update goes group by group, each group's Hessians taken after the groups before it
        are pruned (``--within-block sequential``), as SparseGPT does by default."""
        return self.weight_update == "obs" and self.within_block == "sequential"

    def _in_obs_order(self, work: BlockWork, allocs: dict[str, Allocation]) -> Iterator[str]:
        """The layer names in the order their masks are applied; with a sequential OBS update each group's
        Hessians are gathered (on the block as pruned so far) just before its turn."""
        for i, group in enumerate(self._groups):
            if i > 0 and self.weight_update == "obs":
                hessians = {
                    n: HessianStats(allocs[n].cols, weight_matrix(allocs[n].layer).device) for n in group
                }
                work.calibrate(hessians, desc="OBS statistics", stop_after=group)
                for n in group:
                    allocs[n].hessian = hessians[n].hessian
            yield from group

    # -- final masks ------------------------------------------------------------------------------------------
    def _finalise(
        self, work: BlockWork, allocs: dict[str, Allocation], result: BlockResult, uniform: bool = False
    ) -> dict[str, Any]:
        """Round the learned rates to exactly ``round(target * block params)`` zeros and apply the hard masks.

        ``uniform`` ignores what was learned: every row gets the target rate (the metric's own mask).
        """
        if self.pattern is not None:
            return self._finalise_patterns(work, allocs, result, uniform)
        with torch.no_grad():
            rates = torch.cat([a.row_rates().detach().cpu() for a in allocs.values()])
            if uniform:
                rates = torch.full_like(rates, self.target)
            widths = torch.cat([torch.full((a.rows,), a.cols) for a in allocs.values()])
            budget = round(self.target * int(widths.sum()))
            counts, shift = round_to_budget(rates, widths, budget, self.cfg.max_rate)
            info: dict[str, Any] = {"shift": shift, "layers": {}}
            starts, position = {}, 0
            for name, alloc in allocs.items():
                starts[name], position = position, position + alloc.rows
            for name in self._in_obs_order(work, allocs):
                alloc = allocs[name]
                assert isinstance(alloc, LayerAllocation)
                start = starts[name]
                layer_counts = counts[start : start + alloc.rows]
                learned = rates[start : start + alloc.rows]
                full_name = f"{work.name}.{name}"
                if alloc.hessian is not None:
                    self._apply_obs(result, full_name, alloc, layer_counts, learned_clip=not uniform)
                else:
                    keep = hard_keep(alloc.col_rank, layer_counts)
                    self._apply_frozen(result, full_name, alloc, keep, not uniform)
                final = layer_counts.float() / alloc.cols
                result.targets[full_name] = float(layer_counts.sum()) / alloc.numel
                info["layers"][name] = {
                    "learned_rate": float(learned.mean()),
                    "final_rate": float(final.mean()),
                    "row_rates": [round(float(r), 4) for r in final.tolist()]
                    if self.cfg.granularity == "row"
                    else None,
                }
        return info

    def _finalise_patterns(
        self, work: BlockWork, allocs: dict[str, Allocation], result: BlockResult, uniform: bool
    ) -> dict[str, Any]:
        """N:M: every group's most likely pattern (``uniform``: the initial one, the metric's own N:M mask)."""
        info: dict[str, Any] = {"layers": {}}
        for name in self._in_obs_order(work, allocs):
            alloc = allocs[name]
            assert isinstance(alloc, PatternAllocation)
            if uniform:
                alloc.reset()
            full_name = f"{work.name}.{name}"
            keep = alloc.keep()
            if alloc.hessian is not None:
                self._obs_update(result, full_name, alloc.layer, alloc.hessian, GivenMask(~keep))
                alloc.hessian = None
            else:
                weight_matrix(alloc.layer).masked_fill_(~keep.to(alloc.layer.weight.device), 0)
                self.finish_layer(result, full_name, alloc.layer, None, "besa n:m")
            result.targets[full_name] = alloc.pattern.sparsity
            info["layers"][name] = {"patterns_moved": round(alloc.moved(), 4)}
        return info

    def _obs_update(
        self, result: BlockResult, name: str, layer: Any, hessian: torch.Tensor, choice: MaskChoice
    ) -> None:
        """The OBS sweep on ``choice``'s mask, quantizing on its own grids when the run quantizes jointly."""
        joint = self.config.joint_quant
        quantizer = SweepQuantizer(joint) if joint is not None else None
        new_w, _ = obs_sweep(
            weight_matrix(layer), hessian, choice, quantizer=quantizer, lsq_iters=self.cfg.lsq_iters
        )
        set_weight_matrix(layer, new_w)
        grids = (quantizer.scale, quantizer.zero) if quantizer is not None else None
        self.finish_layer(result, name, layer, grids, "besa + sparsegpt joint")

    def _apply_obs(
        self, result: BlockResult, name: str, alloc: LayerAllocation, counts: torch.Tensor, learned_clip: bool
    ) -> None:
        """Weight update ``obs``: the learned row counts, SparseGPT's choice within each row and its update; with
        joint quantization the sweep quantizes on the learned grids (or fits its own when nothing was learned)."""
        joint = self.config.joint_quant
        clip = None
        if alloc.clip is not None and learned_clip:
            gamma = torch.sigmoid(alloc.clip.detach())
            clip = (gamma[0], gamma[1])
        w = weight_matrix(alloc.layer)
        quantizer = SweepQuantizer(joint, clip) if joint is not None else None
        assert alloc.hessian is not None
        new_w, _ = obs_sweep(
            w, alloc.hessian, RowShares(counts, w.shape[1]), quantizer=quantizer, lsq_iters=self.cfg.lsq_iters
        )
        set_weight_matrix(alloc.layer, new_w)
        alloc.hessian = None
        grids = (quantizer.scale, quantizer.zero) if quantizer is not None else None
        if clip is not None:
            assert grids is not None
            mode = {"mode": "besa joint (learned clipping) + sparsegpt update", **clip_stats(alloc)}
            result.add_grids(name, grids, mode)
        else:
            self.finish_layer(result, name, alloc.layer, grids, "besa + sparsegpt joint")

    def _apply_frozen(
        self, result: BlockResult, name: str, alloc: LayerAllocation, keep: torch.Tensor, learned_clip: bool
    ) -> None:
        """Weight update ``none`` (the paper): the hard mask on the frozen weights; jointly learned grids first."""
        if alloc.clip is not None and learned_clip:
            grids = alloc.grids()
            set_weight_matrix(alloc.layer, alloc.quantized(weight_matrix(alloc.layer)).masked_fill(~keep, 0))
            result.add_grids(name, grids, {"mode": "besa joint (learned clipping)", **clip_stats(alloc)})
        else:
            weight_matrix(alloc.layer).masked_fill_(~keep, 0)
            if self.quant is not None:
                self.quantize_rtn(result, name, alloc.layer)

    def _learn(
        self, work: BlockWork, allocs: dict[str, Allocation], targets: Sequence[torch.Tensor]
    ) -> tuple[list[float], list[dict[str, Any]]]:
        """Train, retrying with a 10x smaller step after a non-finite loss; ([] , failures) if every try failed."""
        failures: list[dict[str, Any]] = []
        for attempt in range(self.cfg.retries + 1):
            scale = 0.1**attempt
            for alloc in allocs.values():
                alloc.reset()
            try:
                return train_block(self.cfg, work, allocs, targets, self.target, scale), failures
            except NonFiniteLoss as exc:
                failures.append({"step_scale": scale, "at_step": exc.step, "loss": str(exc.loss)})
                log.warning(
                    "%s: non-finite BESA loss at step %d with step scale %g", work.name, exc.step, scale
                )
        return [], failures

    def prune_block(self, work: BlockWork) -> BlockResult:
        self._target = self.allocation.block_rate(work.name)
        requires = [p.requires_grad for p in work.module.parameters()]
        work.module.requires_grad_(False)
        try:
            allocs, outputs = self._calibrate(work)
            targets = work.dense_outputs if self.cfg.target == "dense-stream" else outputs
            assert targets is not None
            losses, failures = self._learn(work, allocs, targets)
            if outputs is not None:
                outputs.release()
            fallback = bool(failures) and not losses
            if fallback:
                log.warning("%s: BESA training failed; falling back to the %s metric's uniform mask",
                            work.name, self.metric)  # fmt: skip
            result = BlockResult()
            info = self._finalise(work, allocs, result, uniform=fallback)
        finally:
            for p, r in zip(work.module.parameters(), requires, strict=True):
                p.requires_grad_(r)
        info["steps"] = len(losses)
        info["loss_first"] = losses[0] if losses else math.nan
        info["loss_last"] = losses[-1] if losses else math.nan
        if failures:
            info["non_finite"] = failures
            info["fallback"] = f"uniform {self.metric} mask" if fallback else None
        result.facts = info
        log.info("%s: BESA loss %.4g -> %.4g over %d steps", work.name, info["loss_first"], info["loss_last"],
                 info["steps"])  # fmt: skip
        return result

    def report_extra(self, facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "name": "besa",
            "budget_rounding": (
                "per block: all learned row rates shifted by one common amount, then floored, the remainder given "
                "to the rows with the largest fractional parts, so each block holds exactly round(target * params) "
                "zeros"
            ),
            "metric": self.metric,
            "weight_update": self.weight_update,
            "fallback_blocks": [name for name, info in facts.items() if info.get("fallback")],
            "blocks": facts,
        }
