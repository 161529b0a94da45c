"""The method interface: a ``Pruner`` supplies the per-block step of the sequential engine (methods that prune
each linear on its own from its inputs' statistics build on ``besa.methods.layerwise``)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from besa.engine.record import BlockResult, QuantGrids
from besa.engine.work import BlockWork
from besa.errors import BesaError
from besa.formats.quant import QuantSpec, fake_quantize, quant_params
from besa.methods.cost import BlockShape, MethodCost
from besa.methods.reach import pooled_calibration, routed_tokens, unreached_linears
from besa.methods.refit import RefitChoice
from besa.model.blocks import set_weight_matrix, weight_matrix
from besa.model.experts import ExpertLinear
from besa.settings.config import MethodConfig, PruneConfig
from besa.settings.values import NMPattern
from besa.stages.allocation import Allocation, make_allocation
from besa.stages.masks import select_prune_mask
from besa.stages.reconstruct import refit_block
from besa.stages.selection import LayerStats, magnitude_scores

__all__ = ["Pruner", "LayerStats", "QuantGrids", "BlockResult", "apply_prune_mask"]

log = logging.getLogger(__name__)


def destroyed(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether pruning left all zeros where there were weights."""
    return bool(before.count_nonzero()) and not bool(after.count_nonzero())


def _losses(refit: dict[str, Any]) -> str:
    """A refit's losses in a log line: the held-out loss before -> at its best epoch, or without held-out windows
    the first -> last epoch's mean training loss."""
    held, train = refit["held_out"], refit["train"]
    if held:
        return f"held-out loss {held[0]:.4g} -> {min(held):.4g}"
    return f"training loss {train[0]:.4g} -> {train[-1]:.4g} (epoch means)" if train else "no epoch run"


class Pruner(RefitChoice, ABC):
    """Base class of every pruning method; subclasses are registered with ``besa.registry.register_method``.

    A method prunes each block to the rate its ``allocation`` (``--allocation``) gives that block.
    ``uses_data = False`` (and an allocation that needs none) lets the engine skip the calibration data and the
    block forwards entirely.
    """

    uses_data: bool = True
    default_within_block: str = "parallel"
    """How a layerwise method gathers statistics inside a block when ``--within-block`` is not given."""

    @property
    def within_block(self) -> str:
        """``--within-block`` with the method's default filled in."""
        given = self.config.within_block
        return given if given is not None else self.default_within_block

    @property
    def engine_uses_data(self) -> bool:
        """Whether the blocks run on the calibration windows (the method's statistics, or the refit)."""
        return self.uses_data or self.refit is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration windows (the method's statistics, the refit's, the allocation's)."""
        return self.engine_uses_data or self.allocation.needs_data

    @property
    def needs_dense_stream(self) -> bool:
        """Whether the engine must also carry the dense model's own activations (``BlockWork.dense_outputs``)."""
        return self.refit is not None and self.refit_target != "pruned-input"

    def __init__(self, method_config: MethodConfig, config: PruneConfig) -> None:
        self.method_config = method_config
        self.config = config
        self.allocation: Allocation = make_allocation(
            config.allocation.policy,
            self.sparsity,
            owl_m=config.allocation.owl_m,
            owl_lambda=config.allocation.owl_lambda,
        )
        if config.refit.epochs and config.quantization.spec is not None:
            raise BesaError(
                "--refit-epochs with --wbits is not supported: the refit would move the weights off their grids"
            )

    def run_block(self, work: BlockWork) -> BlockResult:
        """The engine's step for one block: ``prune_block``, then the refit of the survivors if the run has one.

        No tensor is destroyed: a linear whose forward never runs on the calibration windows (a weight the block
        uses as a matrix of its own, say) is handed to no method, and one that pruning would leave all zeros is
        put back as it was (unquantized); both stay dense, at target 0, and ``BlockResult.left_dense`` says why.
        The experts of a Mixture-of-Experts block (``besa.model.experts``) are counted their routed tokens over every
        window first; one with fewer than ``expert_min_tokens`` (or none) is pruned by magnitude before the method
        runs (``BlockResult.fallback``). With ``expert_stats == "pooled"`` every expert runs on every token while
        the method gathers statistics."""
        data = self.engine_uses_data and bool(work.inputs)
        experts = [n for n, layer in work.linears.items() if isinstance(layer, ExpertLinear)] if data else []
        unseen = [n for n in unreached_linears(work) if n not in experts] if data else []  # the first window
        counted = routed_tokens(work, experts + unseen) if experts or unseen else {}  # every window
        tokens = {n: counted[n] for n in experts}
        routed = self.config.experts.stats == "routed"  # pooled statistics are never thin
        least = max(self.config.experts.min_tokens, 1)  # an expert no token reaches has no statistics at all
        thin = {n: t for n, t in tokens.items() if t < least and (routed or t == 0)}
        unreached = [n for n in unseen if counted[n] == 0]
        fallback = self._fall_back(work, thin)
        for name in [*unreached, *thin]:
            del work.linears[name]
        guard = self.may_zero_layers or self.refit is not None
        originals = {
            n: weight_matrix(layer).detach().to("cpu", copy=True) for n, layer in work.linears.items()
        }
        originals = originals if guard else {}
        with pooled_calibration(work, not routed):
            result = self._prune_and_refit(work)
        result.merge(fallback)
        result.expert_tokens = {f"{work.name}.{n}": t for n, t in tokens.items()}
        wiped = [n for n, w in originals.items() if destroyed(w, weight_matrix(work.linears[n]))]
        for name in wiped:
            set_weight_matrix(work.linears[name], originals[name])
        reasons = {n: "its forward never ran on the calibration windows" for n in unreached}
        reasons |= {n: "pruning would have left it all zeros" for n in wiped}
        for name, why in reasons.items():
            full = f"{work.name}.{name}"
            result.rates[full] = 0.0
            result.left_dense[full] = why
            result.grids.pop(full, None)  # put back dense: no longer on any quantization grid
            result.quant_info.pop(full, None)
            log.warning("%s: left dense: %s", full, why)
        return result

    may_zero_layers: bool = True
    """Whether the method could leave a linear all zeros (a weight update, a learned rate): ``run_block`` then keeps
    a copy of the block's linears to put such a one back. Selection alone at a rate below 1 cannot."""

    def _fall_back(self, work: BlockWork, thin: dict[str, int]) -> BlockResult:
        """Prune the experts in ``thin`` (name -> routed tokens) by weight magnitude at the block's rate (N:M: the
        pattern): the calibration sent them too few tokens for the method's statistics."""
        result = BlockResult()
        rate = self.allocation.block_rate(work.name)
        for name, count in thin.items():
            layer, full = work.linears[name], f"{work.name}.{name}"
            apply_prune_mask(
                layer, select_prune_mask(magnitude_scores(weight_matrix(layer)), rate, self.config.nm)
            )
            result.rates[full] = rate
            result.fallback[full] = (
                f"magnitude: {count} routed calibration tokens, fewer than --expert-min-tokens "
                f"{self.config.experts.min_tokens}"
            )
            self.finish_layer(result, full, layer, None, "magnitude fallback")
            log.info("%s: %s", full, result.fallback[full])
        return result

    def _prune_and_refit(self, work: BlockWork) -> BlockResult:
        """``prune_block``, then the refit of the survivors if the run has one."""
        spec = self.refit
        if spec is None:
            return self.prune_block(work)
        target = self.refit_target
        before = work.forward_all("Refit targets", keep_outputs=True) if target == "pruned-input" else None
        result = self.prune_block(work)
        inputs = work.dense_inputs if target == "dense" else work.inputs
        targets = before if before is not None else work.dense_outputs
        assert inputs is not None and targets is not None
        result.refit = refit_block(work, inputs, targets, spec, self.config.calibration.seed)
        if before is not None:
            before.release()
        log.info(
            "%s: refit %s, %d epochs: %s", work.name, target, result.refit["epochs"], _losses(result.refit)
        )
        return result

    @property
    def quant(self) -> QuantSpec | None:
        """The weight quantization of this run, or ``None`` (``wbits=16``)."""
        return self.config.quantization.spec

    def quantize_rtn(self, result: BlockResult, name: str, layer: nn.Module) -> None:
        """Round-to-nearest onto grids fitted to the layer's (pruned) weights; pruned zeros stay exactly zero."""
        spec = self.quant
        assert spec is not None
        w = weight_matrix(layer)
        h, z = quant_params(w, spec)
        set_weight_matrix(layer, fake_quantize(w, h, z, spec))
        result.add_grids(name, (h, z), {"mode": "rtn after pruning"})

    def finish_layer(
        self, result: BlockResult, name: str, layer: nn.Module, grids: QuantGrids | None, mode: str
    ) -> None:
        """After a layer is pruned: keep the grids it was quantized on, or round it to nearest now."""
        if self.quant is None:
            return
        if grids is None:
            self.quantize_rtn(result, name, layer)
        else:
            result.add_grids(name, grids, {"mode": mode})

    @property
    def sparsity(self) -> float:
        assert self.config.sparsity is not None
        return self.config.sparsity

    @property
    def pattern(self) -> NMPattern | None:
        return self.config.nm

    def prepare(self, model: nn.Module, calib_ids: torch.Tensor | None, device: torch.device, forward_batch: int,
                progress: bool) -> None:  # fmt: skip
        """Before the first block: let the allocation look at the dense model (OWL's statistics pass)."""
        if self.allocation.needs_data:
            assert calib_ids is not None
            self.allocation.prepare(model, calib_ids, device, forward_batch, progress)

    def method_cost(self, block: BlockShape) -> MethodCost:
        """What the method itself holds and runs while it prunes a block shaped ``block`` (the model's largest), for
        ``besa plan``: its working sets and its block forwards beyond the statistics pass and the propagation
        (``besa.methods.cost``). The base answer is nothing: the plan then counts what every run holds (weights,
        activations, the refit's and the KL stage's state). A method that keeps sizeable tensors of its own while it
        prunes (statistics, a learned state) or runs more forwards overrides it."""
        return MethodCost()

    @abstractmethod
    def prune_block(self, work: BlockWork) -> BlockResult:
        """Prune the linears of ``work.module`` in place (weights of pruned positions set to exactly zero) and
        say what was done: every linear's target, the grids of quantized ones, the method's facts."""

    def report_extra(self, facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Method-specific facts for ``besa_report.json`` from every block's ``BlockResult.facts``."""
        return {}

    def report_allocation(self) -> dict[str, Any]:
        """The ``allocation`` section of the report: the allocation's name, options and block rates."""
        return self.allocation.report()

    def report_quantization(self, quant_info: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The ``quantization`` section of the report, or ``None`` without quantization."""
        spec = self.quant
        if spec is None:
            return None
        return {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "scheme": "asymmetric uniform, weight-only; w = (code - zero) * scale per (row, group); 0 is on every grid",
            "layers": quant_info,
        }


def apply_prune_mask(layer: nn.Module, prune: torch.Tensor) -> None:
    """Set the weights of ``layer`` where ``prune`` (out, in) is True to exactly zero."""
    weight_matrix(layer).masked_fill_(prune.to(layer.weight.device), 0)
