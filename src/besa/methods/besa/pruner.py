"""BESA (Xu et al., ICLR 2024): per block, learn each row's (or layer's) pruning rate by minimising the block's
output reconstruction error, with the weights frozen; then prune to an exact budget."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from besa.activations import ActivationStore
from besa.config import MethodConfig
from besa.errors import BesaError
from besa.methods.base import LayerStats, Pruner
from besa.methods.besa.allocation import (
    candidate_index,
    candidate_rates,
    column_ranks,
    hard_keep,
    keep_probability,
    round_to_budget,
    straight_through,
    tilted_logits,
)
from besa.methods.magnitude import magnitude_scores
from besa.methods.sparsegpt import HessianStats, inverse_hessian_factor, sparsegpt_prune
from besa.methods.wanda import InputNormStats, wanda_scores
from besa.modeling import set_weight_matrix, weight_matrix
from besa.pipeline import BlockWork, rebatch
from besa.quant import CLIP_INIT_LOGIT, QuantSpec, fake_quantize, grid_from_range, group_range
from besa.registry import register_method

__all__ = ["BesaConfig", "BesaPruner", "NonFiniteLoss", "reconstruction_loss"]

log = logging.getLogger(__name__)

METRICS = ("wanda", "magnitude", "sparsegpt")


@dataclass
class BesaConfig(MethodConfig):
    """BESA settings.

    Args:
        metric: importance used to rank the weights of each row once per block: wanda, magnitude, sparsegpt.
        granularity: ``row`` (one learned rate per output row, the paper's setting) or ``layer``.
        candidates: number of candidate pruning rates D.
        rate_window: candidates span [target - w, target + w] (clipped to [0, max_rate]); bounds how far one
            row's or layer's rate may move from the target, so no row is emptied.
        max_rate: highest pruning rate any row may reach.
        lam: weight of the sparsity penalty lam * (expected block sparsity - target)^2.
        target: ``pruned-input`` (dense block on the pruned model's input, the paper's main setting) or
            ``dense-stream`` (the dense model's own block output).
        optimizer: ``prodigy`` (prodigyopt) or ``adamw``.
        lr: learning rate (Prodigy: 1.0; AdamW: 0.01 when not given).
        d_coef: Prodigy's coefficient on its estimated step size.
        epochs: passes over the calibration windows per block.
        batch_size: calibration sequences per optimizer step (the stored activations are re-cut to this size;
            the calibration and propagation passes use the engine's ``forward_batch``).
        clip_lr: AdamW learning rate of the clipping logits when they are learned (``--wbits`` with joint mode),
            whatever ``optimizer`` trains the sparsity logits (0.01 chosen on PTB valid at 4 bits).
        weight_update: ``none`` keeps the surviving weights as they are (the paper). ``obs`` keeps the learned
            number of pruned weights of every row but lets SparseGPT's OBS sweep choose them within the row and
            update the survivors to compensate (an extension, not in the paper). With ``--wbits`` and
            ``--quant-mode joint`` the clipping is learned with the allocation as usual, and the OBS sweep quantizes
            on grids clipped by it. ``auto`` (default): ``obs`` when quantizing jointly (measured better at 4 and 3
            bits on PTB valid, see BENCHMARKS.md), else ``none``.
        retries: after a NaN/inf loss the block is trained again from the start with a 10x smaller step, up to
            this many times; then it falls back to the metric's uniform mask (recorded in the report).
    """

    metric: str = field(
        default="wanda", metadata={"help": "BESA: importance ranking: wanda, magnitude, sparsegpt"}
    )
    granularity: str = field(default="row", metadata={"help": "BESA: learn a rate per row or per layer"})
    candidates: int = field(default=100, metadata={"help": "BESA: number of candidate pruning rates"})
    rate_window: float = field(default=0.2, metadata={"help": "BESA: candidate rates span target +- this"})
    max_rate: float = field(default=0.99, metadata={"help": "BESA: highest pruning rate of any row"})
    lam: float = field(default=20.0, metadata={"help": "BESA: weight of the sparsity penalty"})
    target: str = field(default="pruned-input", metadata={"help": "BESA: pruned-input or dense-stream"})
    optimizer: str = field(default="prodigy", metadata={"help": "BESA: prodigy or adamw"})
    lr: float | None = field(default=None, metadata={"help": "BESA: learning rate (prodigy 1.0, adamw 0.01)"})
    d_coef: float = field(default=5.0, metadata={"help": "BESA: Prodigy d_coef"})
    epochs: int = field(default=1, metadata={"help": "BESA: epochs over the calibration set per block"})
    batch_size: int = field(default=1, metadata={"help": "BESA: calibration sequences per optimizer step"})
    clip_lr: float = field(
        default=0.01,
        metadata={"help": "BESA with --wbits: AdamW learning rate of the clipping logits"},
    )
    weight_update: str = field(
        default="auto",
        metadata={
            "help": "BESA: none (the paper: weights frozen), obs (SparseGPT update, learned row counts) or auto "
            "(obs with --wbits joint, else none)"
        },
    )
    retries: int = field(
        default=1,
        metadata={"help": "BESA: retries with a 10x smaller step after a NaN/inf loss, then uniform"},
    )

    def __post_init__(self) -> None:
        choices = {
            "metric": METRICS,
            "granularity": ("row", "layer"),
            "target": ("pruned-input", "dense-stream"),
            "optimizer": ("prodigy", "adamw"),
            "weight_update": ("auto", "none", "obs"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BesaError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.candidates < 2:
            raise BesaError(f"--candidates must be at least 2, got {self.candidates}")
        if not 0 < self.rate_window <= 1:
            raise BesaError(f"--rate-window must be in (0, 1], got {self.rate_window}")
        if not 0 < self.max_rate <= 1:
            raise BesaError(f"--max-rate must be in (0, 1], got {self.max_rate}")
        if self.batch_size < 1:
            raise BesaError(f"--batch-size must be positive, got {self.batch_size}")
        if self.epochs < 1:
            raise BesaError(f"--epochs must be positive, got {self.epochs}")
        if self.retries < 0:
            raise BesaError(f"--retries must be non-negative, got {self.retries}")
        if not self.clip_lr > 0:
            raise BesaError(f"--clip-lr must be positive, got {self.clip_lr}")
        if self.lam < 0:
            raise BesaError(f"--lam must be non-negative, got {self.lam}")


class NonFiniteLoss(ArithmeticError):
    """A BESA training step produced a NaN or infinite loss (or logits)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step = step
        self.loss = loss


def reconstruction_loss(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the squared error relative to the target's norm in that channel (B, T, H) -> ()."""
    target = target.float()
    scale = target.reshape(-1, target.shape[-1]).norm(dim=0).clamp_min(1e-6)  # (H,)
    return ((target - output.float()) / scale).square().sum() / target.shape[-1]


class _LayerAllocation:
    """One linear's frozen ranking and its learnable logits over candidate rates."""

    def __init__(
        self,
        name: str,
        layer: nn.Module,
        order: torch.Tensor,
        rates: torch.Tensor,
        theta: torch.Tensor,
        quant: QuantSpec | None = None,
        learn_clip: bool = False,
    ):
        self.name = name
        self.layer = layer
        self.rows, self.cols = order.shape
        rank = column_ranks(order)  # (R, C) rank of every weight in its row
        self.cand_of_col = candidate_index(rates, self.cols)[
            rank
        ]  # (R, C) first candidate pruning each weight
        self.col_rank = rank.to(torch.int32)
        self.rates = rates  # (D,) ascending
        self.theta = nn.Parameter(theta)  # (R, D) or (1, D)
        self.init = theta.detach().clone()
        self.current_mask: torch.Tensor | None = None  # set before each training forward
        self.hessian: torch.Tensor | None = None  # inputs' Hessian, kept for the OBS weight update
        self.quant = quant
        self.clip: nn.Parameter | None = (
            None  # (2, R, groups) logits of gamma_hi, gamma_lo when learning jointly
        )
        if quant is not None and learn_clip:
            self.range = group_range(weight_matrix(layer).detach(), quant)
            self.clip = nn.Parameter(
                torch.full((2, *self.range[0].shape), CLIP_INIT_LOGIT, device=order.device)
            )
            self.clip_init = self.clip.detach().clone()

    def grids(self, ste: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the dense weight's groups under the current clipping."""
        assert self.quant is not None and self.clip is not None
        gamma = torch.sigmoid(self.clip)
        return grid_from_range(*self.range, self.quant, gamma[0], gamma[1], ste=ste)

    def quantized(self, w: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """The dense weight on its learned grids (float32), differentiable in the clipping with ``ste``."""
        assert self.quant is not None
        return fake_quantize(w, *self.grids(ste), self.quant, ste=ste)

    def parameters(self) -> list[nn.Parameter]:
        return [self.theta] if self.clip is None else [self.theta, self.clip]

    def reset(self) -> None:
        """Back to the initial logits (before a retry)."""
        with torch.no_grad():
            self.theta.copy_(self.init)
            if self.clip is not None:
                self.clip.copy_(self.clip_init)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def row_rates(self, beta: torch.Tensor | None = None) -> torch.Tensor:
        """Expected pruning rate of every row (R,), differentiable."""
        beta = torch.softmax(self.theta, dim=-1) if beta is None else beta
        return (beta @ self.rates).expand(self.rows)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training mask in column order (R, C), hard forward / soft backward, and the rows' expected rates."""
        beta = torch.softmax(self.theta, dim=-1)
        rates = self.row_rates(beta)
        counts = (rates.detach() * self.cols).floor().long()
        return straight_through(
            hard_keep(self.col_rank, counts), keep_probability(beta, self.cand_of_col)
        ), rates

    def mask(self) -> torch.Tensor:
        return self.step()[0]


def _clip_stats(alloc: _LayerAllocation) -> dict[str, float]:
    """Mean / min / max of a layer's learned clipping strengths, upper and lower, for the report."""
    assert alloc.clip is not None
    gamma = torch.sigmoid(alloc.clip.detach())
    return {
        f"clip_{side}_{stat}": round(float(getattr(gamma[j], stat)()), 4)
        for j, side in enumerate(("hi", "lo"))
        for stat in ("mean", "min", "max")
    }


def _masked_forward(layer: nn.Module, alloc: _LayerAllocation, x: torch.Tensor) -> torch.Tensor:
    w = weight_matrix(layer).detach()
    assert alloc.current_mask is not None
    if alloc.clip is not None:  # joint: learned clipping, rounding passed straight through
        w = alloc.quantized(w, ste=True).to(w.dtype)
    return F.linear(x, w * alloc.current_mask.to(w.dtype), layer.bias)


@register_method(
    "besa", BesaConfig, "learned per-row sparsity allocation by block reconstruction (Xu et al., 2024)"
)
class BesaPruner(Pruner):
    """Blockwise Parameter-Efficient Sparsity Allocation.

    With ``--wbits`` and ``--quant-mode joint`` it also learns per-(row, group) clipping strengths (OmniQuant's
    learnable weight clipping, sigmoid of a logit initialised at 4) together with the sparsity logits, under the
    same block loss, the rounding passed straight through; by default (``--weight-update auto``) SparseGPT's OBS
    sweep then quantizes on the learned grids with the learned row counts. ``rtn`` learns the masks at full
    precision and rounds to nearest after.
    """

    def __init__(self, method_config: MethodConfig, config: Any) -> None:
        super().__init__(method_config, config)
        if config.nm is not None:
            raise BesaError(
                "--method besa learns unstructured allocations; --pattern is not supported with it"
            )
        assert isinstance(method_config, BesaConfig)
        self.cfg = method_config
        self.blocks: dict[str, dict[str, Any]] = {}

    @property
    def needs_dense_stream(self) -> bool:
        return self.cfg.target == "dense-stream"

    @property
    def weight_update(self) -> str:
        """``--weight-update`` with ``auto`` resolved: OBS when quantizing jointly, the paper's frozen weights else."""
        if self.cfg.weight_update != "auto":
            return self.cfg.weight_update
        return "obs" if self.quant is not None and self.config.quant_mode == "joint" else "none"

    # -- statistics and ranking -------------------------------------------------------------------------------
    def _make_stats(self, layer: nn.Module) -> LayerStats | None:
        width = weight_matrix(layer).shape[1]
        device = weight_matrix(layer).device
        if self.cfg.metric == "wanda":
            return InputNormStats(width, device)
        if self.cfg.metric == "sparsegpt":
            return HessianStats(width, device)
        return None

    def _scores(self, layer: nn.Module, stats: LayerStats | None) -> torch.Tensor:
        w = weight_matrix(layer)
        if isinstance(stats, InputNormStats):
            return wanda_scores(w, stats.norms)
        if isinstance(stats, HessianStats):
            factor = inverse_hessian_factor(stats.hessian, 0.01)
            return w.float().square() / factor.diagonal().square().unsqueeze(0)
        return magnitude_scores(w)

    def _candidate_rates(self) -> torch.Tensor:
        low = max(0.0, self.sparsity - self.cfg.rate_window)
        high = min(self.cfg.max_rate, self.sparsity + self.cfg.rate_window)
        return candidate_rates(self.cfg.candidates, low, high)

    def _calibrate(self, work: BlockWork) -> tuple[dict[str, _LayerAllocation], ActivationStore | None]:
        """One dense pass: importance statistics of every linear and the block's outputs on the pruned stream."""
        stats = {name: self._make_stats(layer) for name, layer in work.linears.items()}
        obs = self.weight_update == "obs"
        hessians = {
            name: stats[name] if isinstance(stats[name], HessianStats)
            else HessianStats(weight_matrix(layer).shape[1], weight_matrix(layer).device)
            for name, layer in work.linears.items()
        } if obs else {}  # fmt: skip

        def feed(name: str, x: torch.Tensor) -> None:
            if stats[name] is not None:
                stats[name].add(x)
            if obs and hessians[name] is not stats[name]:
                hessians[name].add(x)

        with work.input_hooks(feed):
            outputs = work.forward_all("Calibrating", keep_outputs=self.cfg.target == "pruned-input")
        rates = self._candidate_rates().to(work.device)
        init = tilted_logits(rates.cpu(), self.sparsity).to(work.device)
        allocs = {}
        for name, layer in work.linears.items():
            scores = self._scores(layer, stats.pop(name))
            order = torch.argsort(scores, dim=1, stable=True)  # (R, C) ascending importance
            groups = order.shape[0] if self.cfg.granularity == "row" else 1
            allocs[name] = _LayerAllocation(
                name, layer, order, rates, init.expand(groups, -1).clone(), self.quant,
                learn_clip=self.config.quant_mode == "joint",
            )  # fmt: skip
            if obs:
                allocs[name].hessian = hessians.pop(name).hessian
        return allocs, outputs

    # -- training ---------------------------------------------------------------------------------------------
    def _optimizers(
        self, allocs: dict[str, _LayerAllocation], scale: float = 1.0
    ) -> list[torch.optim.Optimizer]:
        """Fresh optimizers for one block: ``--optimizer`` over the sparsity logits and, when the clipping is
        learned, AdamW at ``--clip-lr`` over the clipping logits (its own optimizer, so the step is its own under
        Prodigy too, which refuses groups with different learning rates)."""
        lr = (self.cfg.lr or (1e-2 if self.cfg.optimizer == "adamw" else 1.0)) * scale
        thetas = [a.theta for a in allocs.values()]
        if self.cfg.optimizer == "adamw":
            opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(thetas, lr=lr, weight_decay=0.0)]
        else:
            from prodigyopt import Prodigy

            opts = [Prodigy(thetas, lr=lr, d_coef=self.cfg.d_coef, weight_decay=0.0)]
        clips = [a.clip for a in allocs.values() if a.clip is not None]
        if clips:
            opts.append(torch.optim.AdamW(clips, lr=self.cfg.clip_lr * scale, weight_decay=0.0))
        return opts

    @contextmanager
    def _masked(self, allocs: dict[str, _LayerAllocation]) -> Iterator[None]:
        for alloc in allocs.values():
            alloc.layer.forward = lambda x, _l=alloc.layer, _a=alloc: _masked_forward(_l, _a, x)
        try:
            yield
        finally:
            for alloc in allocs.values():
                del alloc.layer.forward

    def _train(
        self,
        work: BlockWork,
        allocs: dict[str, _LayerAllocation],
        targets: Sequence[torch.Tensor],
        scale: float = 1.0,
    ) -> list[float]:
        """Train the allocation logits over the calibration set; raise ``NonFiniteLoss`` on a NaN/inf loss."""
        total = sum(a.numel for a in allocs.values())
        opts = self._optimizers(allocs, scale)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if work.device.type == "cuda" and next(work.module.parameters()).dtype != torch.float32
            else torch.autocast("cpu", enabled=False)
        )
        losses: list[float] = []
        samples = work.num_samples
        steps = self.cfg.epochs * -(-samples // self.cfg.batch_size)
        bar = tqdm(
            total=steps, desc=f"({work.index + 1}/{work.num_blocks}) Learning", leave=False,
            disable=None if work.progress else True,
        )  # fmt: skip
        with torch.enable_grad(), self._masked(allocs):
            for _ in range(self.cfg.epochs):
                size = self.cfg.batch_size
                for hidden, target in zip(rebatch(work.inputs, size), rebatch(targets, size), strict=True):
                    block_rate = 0.0
                    for alloc in allocs.values():
                        alloc.current_mask, rates = alloc.step()
                        block_rate = block_rate + rates.mean() * (alloc.numel / total)
                    with autocast:
                        out = work.forward(hidden)
                    rec = reconstruction_loss(target.to(work.device), out)
                    loss = rec + self.cfg.lam * (block_rate - self.sparsity) ** 2
                    if not torch.isfinite(loss):
                        bar.close()
                        raise NonFiniteLoss(len(losses), float(loss.detach()))
                    for opt in opts:
                        opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for opt in opts:
                        opt.step()
                    losses.append(float(loss.detach()))
                    bar.update()
                    bar.set_postfix(
                        loss=f"{float(rec.detach()):.4g}", sparsity=f"{float(block_rate.detach()):.4f}"
                    )
        bar.close()
        for alloc in allocs.values():
            alloc.current_mask = None
            if not all(torch.isfinite(p).all() for p in alloc.parameters()):
                raise NonFiniteLoss(len(losses), math.nan)
        return losses

    # -- final masks ------------------------------------------------------------------------------------------
    def _finalise(
        self, work: BlockWork, allocs: dict[str, _LayerAllocation], uniform: bool = False
    ) -> dict[str, Any]:
        """Round the learned rates to exactly ``round(target * block params)`` zeros and apply the hard masks.

        ``uniform`` ignores what was learned: every row gets the target rate (the metric's own mask).
        """
        with torch.no_grad():
            rates = torch.cat([a.row_rates().detach().cpu() for a in allocs.values()])
            if uniform:
                rates = torch.full_like(rates, self.sparsity)
            widths = torch.cat([torch.full((a.rows,), a.cols) for a in allocs.values()])
            budget = round(self.sparsity * int(widths.sum()))
            counts, shift = round_to_budget(rates, widths, budget, self.cfg.max_rate)
            info: dict[str, Any] = {"shift": shift, "layers": {}}
            start = 0
            for name, alloc in allocs.items():
                layer_counts = counts[start : start + alloc.rows]
                learned = rates[start : start + alloc.rows]
                start += alloc.rows
                keep = hard_keep(alloc.col_rank, layer_counts)
                full_name = f"{work.name}.{name}"
                if alloc.hessian is not None:  # OBS: the learned row counts, SparseGPT's choice and update
                    joint = self.quant if self.config.quant_mode == "joint" else None
                    clip = None
                    if alloc.clip is not None and not uniform:
                        gamma = torch.sigmoid(alloc.clip.detach())
                        clip = (gamma[0], gamma[1])
                    new_w, _, grids = sparsegpt_prune(
                        weight_matrix(alloc.layer), alloc.hessian, self.sparsity, quant=joint,
                        row_counts=layer_counts, clip=clip,
                    )  # fmt: skip
                    set_weight_matrix(alloc.layer, new_w)
                    alloc.hessian = None
                    if clip is not None:
                        assert grids is not None
                        self.record_grids(full_name, grids, {
                            "mode": "besa joint (learned clipping) + sparsegpt update", **_clip_stats(alloc)
                        })  # fmt: skip
                    else:
                        self.finish_layer(full_name, alloc.layer, grids, "besa + sparsegpt joint")
                elif alloc.clip is not None and not uniform:  # joint: the learned grids, then the mask
                    grids = alloc.grids()
                    set_weight_matrix(
                        alloc.layer, alloc.quantized(weight_matrix(alloc.layer)).masked_fill(~keep, 0)
                    )
                    self.record_grids(
                        full_name, grids, {"mode": "besa joint (learned clipping)", **_clip_stats(alloc)}
                    )
                else:
                    weight_matrix(alloc.layer).masked_fill_(~keep, 0)
                    if self.quant is not None:
                        self.quantize_rtn(full_name, alloc.layer)
                final = layer_counts.float() / alloc.cols
                self.layer_targets[full_name] = float(layer_counts.sum()) / alloc.numel
                info["layers"][name] = {
                    "learned_rate": float(learned.mean()),
                    "final_rate": float(final.mean()),
                    "row_rates": [round(float(r), 4) for r in final.tolist()]
                    if self.cfg.granularity == "row"
                    else None,
                }
        return info

    def _learn(
        self, work: BlockWork, allocs: dict[str, _LayerAllocation], targets: Sequence[torch.Tensor]
    ) -> tuple[list[float], list[dict[str, Any]]]:
        """Train, retrying with a 10x smaller step after a non-finite loss; ([] , failures) if every try failed."""
        failures: list[dict[str, Any]] = []
        for attempt in range(self.cfg.retries + 1):
            scale = 0.1**attempt
            for alloc in allocs.values():
                alloc.reset()
            try:
                return self._train(work, allocs, targets, scale), failures
            except NonFiniteLoss as exc:
                failures.append({"step_scale": scale, "at_step": exc.step, "loss": str(exc.loss)})
                log.warning(
                    "%s: non-finite BESA loss at step %d with step scale %g", work.name, exc.step, scale
                )
        return [], failures

    def prune_block(self, work: BlockWork) -> None:
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
                            work.name, self.cfg.metric)  # fmt: skip
            info = self._finalise(work, allocs, uniform=fallback)
        finally:
            for p, r in zip(work.module.parameters(), requires, strict=True):
                p.requires_grad_(r)
        info["steps"] = len(losses)
        info["loss_first"] = losses[0] if losses else math.nan
        info["loss_last"] = losses[-1] if losses else math.nan
        if failures:
            info["non_finite"] = failures
            info["fallback"] = f"uniform {self.cfg.metric} mask" if fallback else None
        self.blocks[work.name] = info

    def block_record(self, block_name: str) -> dict:
        return {**super().block_record(block_name), "besa": self.blocks.get(block_name)}

    def restore_block(self, block_name: str, record: dict) -> None:
        super().restore_block(block_name, record)
        if record.get("besa") is not None:
            self.blocks[block_name] = record["besa"]

    def report_extra(self) -> dict[str, Any]:
        return {
            "name": "besa",
            "budget_rounding": (
                "per block: all learned row rates shifted by one common amount, then floored, the remainder given "
                "to the rows with the largest fractional parts, so each block holds exactly round(target * params) "
                "zeros"
            ),
            "weight_update": self.weight_update,
            "fallback_blocks": [name for name, info in self.blocks.items() if info.get("fallback")],
            "blocks": self.blocks,
        }
