"""BESA (Xu et al., ICLR 2024): per block, learn each row's (or layer's) pruning rate by minimising the block's
output reconstruction error, with the weights frozen; then prune to an exact budget. With ``--pattern N:M`` it
learns which N of every M weights go instead (an extension: one distribution per group over its patterns) when asked
(``--epochs 1``; by default N:M runs keep the patterns ADMM chooses). ``--epochs 0`` learns nothing."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from besa.engine.activations import ActivationStore
from besa.engine.record import BlockResult
from besa.engine.work import BlockWork
from besa.errors import BesaError
from besa.methods.base import apply_prune_mask
from besa.methods.besa.config import (
    KL_REL_LR,
    NM_KL_EPOCHS,
    NM_REFIT_EPOCHS,
    REFIT_EPOCHS,
    BesaConfig,
    refit_rel_lr_at,
    refit_target_at,
)
from besa.methods.besa.finalise import WEIGHT_UPDATES, FinalMasks
from besa.methods.besa.layer import MaskLogits, NonFiniteLoss, PatternLogits, RateLogits
from besa.methods.besa.rates import candidate_rates, tilted_logits
from besa.methods.besa.training import train_block
from besa.methods.cost import BlockShape, MethodCost, admm_bytes, obs_hessians
from besa.model.blocks import weight_matrix
from besa.settings.config import MethodConfig
from besa.stages.admm import AdmmSettings, admm_saliency
from besa.stages.masks import select_prune_mask
from besa.stages.selection import HessianStats, LayerStats, get_scorer
from besa.stages.update import uniform_choice

__all__ = ["BESA_BACKWARD_BYTES_PER_WEIGHT", "BESA_BYTES_PER_WEIGHT", "BesaPruner"]

# BESA's state per weight of the block it trains: each weight's rank in its row (int32) and first pruning candidate
# (int16), and in a step the masked weight the forward keeps for the backward (float32).
BESA_BYTES_PER_WEIGHT = 4 + 2 + 4
# ... plus, for one linear at a time in the backward, its weight gradient, the keep gradient and the widened index.
BESA_BACKWARD_BYTES_PER_WEIGHT = 4 + 4 + 8

log = logging.getLogger(__name__)


class BesaPruner(FinalMasks):
    """Blockwise Parameter-Efficient Sparsity Allocation.

    With ``--wbits`` and ``--quant-mode joint`` it also learns per-(row, group) clipping strengths (OmniQuant's
    learnable weight clipping, sigmoid of a logit initialised at 4) together with the sparsity logits, under the
    same block loss, the rounding passed straight through; by default (``--weight-update obs``) SparseGPT's OBS
    sweep then quantizes on the learned grids with the learned row counts. ``rtn`` learns the masks at full
    precision and rounds to nearest after.

    With ``--pattern N:M`` every layer gets a ``PatternLogits`` (a distribution per group of M weights over
    its N:M patterns) instead of rates; the same loop trains it, and the final mask is every group's most likely
    pattern, with the OBS update on that fixed mask when ``--weight-update obs``. No clipping is learned then
    (with ``--wbits`` the OBS sweep fits its own grids, or the weights are rounded to nearest).

    Learning is here; the final masks are ``besa.methods.besa.finalise.FinalMasks``'s.
    """

    # the defaults measured best on PTB valid (benchmarks/NOTES.md, besa-tuning): AdamW at 0.05, the weight update group
    # by group with the least-squares solve (the OBS sweep below 70% sparsity, ADMM from 70% and for N:M:
    # ``weight_update_at``), then 2 epochs of blockwise refit, toward the dense model's output below 70% sparsity and
    # toward the dense block's function on its pruned input from 70% on and for N:M (``refit_target_at``); N:M
    # patterns are not learned (``NM_EPOCHS``: ADMM's own) and from 70% and for N:M the refit's rate is relative to
    # each linear's weights (``refit_rel_lr_at``); N:M runs end with one epoch of the KL stage (``NM_KL_EPOCHS``);
    # `--recipe besa-paper` is the paper's form
    default_within_block = "sequential"
    default_refit_epochs = REFIT_EPOCHS

    def resolved_defaults(self) -> dict[str, Any]:
        return {
            **super().resolved_defaults(),
            "option.weight_update": self.weight_update,
            "option.epochs": self.cfg.epochs,
        }

    def refit_default(self) -> int:
        return NM_REFIT_EPOCHS if self.pattern is not None else REFIT_EPOCHS

    def refit_target_default(self) -> str:
        return refit_target_at(self.sparsity, self.pattern is not None)

    def refit_rel_lr_default(self) -> float:
        return refit_rel_lr_at(self.sparsity, self.pattern is not None)

    def kl_epochs_default(self) -> int:
        return NM_KL_EPOCHS if self.pattern is not None else 0

    def kl_rel_lr_default(self) -> float:
        return KL_REL_LR if self.pattern is not None else 0.0

    def __init__(self, method_config: MethodConfig, config: Any) -> None:
        super().__init__(method_config, config)
        assert isinstance(method_config, BesaConfig)
        nm = self.pattern is not None
        self.cfg = dataclasses.replace(method_config, epochs=method_config.resolved_epochs(nm))
        self.metric = method_config.resolved_metric(nm)
        # ``admm`` ranks by ADMM's own saliency, computed from the same Hessians as SparseGPT's
        self.scorer = get_scorer("sparsegpt" if self.metric == "admm" else self.metric)
        if self.weight_update == "admm" and config.quantization.joint is not None:
            raise BesaError("--weight-update admm cannot quantize jointly: add --quant-mode rtn")
        self._block_rate: float | None = None
        self._groups: list[list[str]] = []  # the block's layers in the order their masks are applied

    @property
    def learns(self) -> bool:
        """Whether the block's allocation (or N:M patterns) is learned (``--epochs`` above 0)."""
        return bool(self.cfg.epochs)

    @property
    def needs_dense_stream(self) -> bool:
        return (self.learns and self.cfg.target == "dense-stream") or super().needs_dense_stream

    def method_cost(self, block: BlockShape) -> MethodCost:
        """The OBS update's Hessians (``--weight-update obs``) and BESA's per-weight state; the training's forwards
        and backwards over ``epochs`` and the dense target's pass."""
        work = obs_hessians(block, self.obs_sequential, self.cfg.lsq_iters > 0) if self.uses_hessian else {}
        if self.weight_update == "admm" or (self.learns and self.metric == "admm"):
            work.update(admm_bytes(block))
        if not self.learns:
            return MethodCost(work)
        work["BESA's per-weight state"] = (
            BESA_BYTES_PER_WEIGHT * block.weights + BESA_BACKWARD_BYTES_PER_WEIGHT * block.largest
        )
        assert self.cfg.epochs is not None
        return MethodCost(work, 3.0 * self.cfg.epochs + 1.0)

    # -- statistics and ranking -------------------------------------------------------------------------------
    def _candidate_rates(self) -> torch.Tensor:
        low = max(0.0, self.block_rate - self.cfg.rate_window)
        high = min(self.cfg.max_rate, self.block_rate + self.cfg.rate_window)
        return candidate_rates(self.cfg.candidates, low, high)

    def _calibrate(self, work: BlockWork) -> tuple[dict[str, MaskLogits], ActivationStore | None]:
        """One dense pass: importance statistics of every linear and the block's outputs on the pruned stream (and,
        for the OBS update, the Hessians of the layers whose inputs the pruning of the block cannot change yet:
        all of them with ``--within-block parallel``, the first group's with ``sequential``)."""
        stats = {name: self.scorer.stats_for(layer) for name, layer in work.linears.items()}
        self._groups = work.input_groups() if self.obs_sequential else [list(work.linears)]
        hessians = {
            name: stats[name] if isinstance(stats[name], HessianStats)
            else HessianStats(weight_matrix(work.linears[name]).shape[1], weight_matrix(work.linears[name]).device)
            for name in self._groups[0]
        } if self.uses_hessian else {}  # fmt: skip
        outputs = work.calibrate(stats, hessians, keep_outputs=self.cfg.target == "pruned-input")
        rates = self._candidate_rates().to(work.device)
        init = tilted_logits(rates.cpu(), self.block_rate).to(work.device)
        block_logits: dict[str, MaskLogits] = {}
        for name, layer in work.linears.items():
            scores = self._scores(layer, stats.pop(name))
            if self.pattern is not None:
                block_logits[name] = PatternLogits(name, layer, scores, self.pattern, self.cfg.nm_sharpness)
            else:
                order = torch.argsort(scores, dim=1, stable=True)  # (R, C) ascending importance
                groups = order.shape[0] if self.cfg.granularity == "row" else 1
                block_logits[name] = RateLogits(
                    name, layer, order, rates, init.expand(groups, -1).clone(), self.quant,
                    learn_clip=self.config.quantization.joint is not None,
                )  # fmt: skip
            if name in hessians:
                block_logits[name].hessian = hessians.pop(name).hessian
        return block_logits, outputs

    def _scores(self, layer: Any, stats: LayerStats | None) -> torch.Tensor:
        """The importance (R, C) the layer's weights are ranked by: the scorer's, or with ``--metric admm`` the
        saliency ADMM's own mask at the block's rate (or the run's N:M pattern) was chosen by."""
        w = weight_matrix(layer)
        if self.metric != "admm":
            return self.scorer.scores(w, stats)
        assert isinstance(stats, HessianStats)
        choice = uniform_choice(self.pattern, self.block_rate)
        return admm_saliency(w, stats.hessian, choice, AdmmSettings(lsq_iters=0))

    def _prune_uniform(self, work: BlockWork, result: BlockResult) -> dict[str, Any]:
        """``--epochs 0``: nothing learned. Every linear keeps the block's rate (or the run's N:M pattern), the
        weights chosen by the weight update itself as ``--method sparsegpt`` / ``--method admm`` choose them (OBS /
        ADMM, group by group with ``--within-block sequential``), or by the metric's ranking on the frozen weights
        (``--weight-update none``, within each row)."""
        choice = uniform_choice(self.pattern, self.block_rate)
        groups = work.input_groups() if self.obs_sequential else [list(work.linears)]
        update = getattr(self, WEIGHT_UPDATES[self.weight_update][1])  # used only with a Hessian
        for group in groups:
            stats = {
                n: HessianStats(weight_matrix(work.linears[n]).shape[1], weight_matrix(work.linears[n]).device)
                if self.uses_hessian else self.scorer.stats_for(work.linears[n])
                for n in group
            }  # fmt: skip
            work.calibrate(stats, stop_after=group if self.obs_sequential else ())
            for name in group:
                layer, full_name, entry = work.linears[name], f"{work.name}.{name}", stats.pop(name)
                if self.uses_hessian:
                    assert isinstance(entry, HessianStats)
                    update(result, full_name, layer, entry.hessian, choice)
                else:
                    scores = self._scores(layer, entry)
                    apply_prune_mask(layer, select_prune_mask(scores, self.block_rate, self.pattern))
                    self.finish_layer(result, full_name, layer, None, "besa, nothing learned")
                result.rates[full_name] = (
                    self.pattern.sparsity if self.pattern is not None else self.block_rate
                )
        return {name: {"final_rate": result.rates[f"{work.name}.{name}"]} for name in work.linears}

    def _learn(
        self, work: BlockWork, block_logits: dict[str, MaskLogits], targets: Sequence[torch.Tensor]
    ) -> tuple[list[float], list[dict[str, Any]]]:
        """Train, retrying with a 10x smaller step after a non-finite loss; ([] , failures) if every try failed."""
        failures: list[dict[str, Any]] = []
        for attempt in range(self.cfg.retries + 1):
            scale = 0.1**attempt
            for logits in block_logits.values():
                logits.reset()
            try:
                return train_block(self.cfg, work, block_logits, targets, self.block_rate, scale), failures
            except NonFiniteLoss as exc:
                failures.append({"step_scale": scale, "at_step": exc.step, "loss": str(exc.loss)})
                log.warning(
                    "%s: non-finite BESA loss at step %d with step scale %g", work.name, exc.step, scale
                )
        return [], failures

    def prune_block(self, work: BlockWork) -> BlockResult:
        self._block_rate = self.allocation.block_rate(work.name)
        if not self.learns:
            result = BlockResult()
            result.facts = {"steps": 0, "learned": False, "layers": self._prune_uniform(work, result)}
            return result
        requires = [p.requires_grad for p in work.module.parameters()]
        work.module.requires_grad_(False)
        try:
            block_logits, outputs = self._calibrate(work)
            targets = work.dense_outputs if self.cfg.target == "dense-stream" else outputs
            assert targets is not None
            losses, failures = self._learn(work, block_logits, targets)
            if outputs is not None:
                outputs.release()
            fallback = bool(failures) and not losses
            if fallback:
                log.warning("%s: BESA training failed; falling back to the %s metric's uniform mask",
                            work.name, self.metric)  # fmt: skip
            result = BlockResult()
            info = self._finalise(work, block_logits, result, uniform=fallback)
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
