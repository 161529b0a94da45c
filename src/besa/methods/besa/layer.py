"""One linear under BESA: its frozen ranking, its learnable logits over candidate rates (and clipping), the
masked forward used while learning, and the block loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from besa.formats.quant import CLIP_INIT_LOGIT, QuantSpec, fake_quantize, grid_from_range, group_range
from besa.methods.besa.patterns import (
    keep_patterns,
    pattern_hard_keep,
    pattern_prior,
    pattern_soft_keep,
    temperature,
)
from besa.methods.besa.rates import (
    candidate_index,
    column_ranks,
    hard_keep,
    keep_probability,
    masked_weight,
    straight_through,
)
from besa.model.blocks import weight_matrix
from besa.settings.values import NMPattern

__all__ = [
    "NonFiniteLoss",
    "reconstruction_loss",
    "RateLogits",
    "PatternLogits",
    "MaskLogits",
    "clip_stats",
    "masked_forward",
    "stored_layout",
    "weight_replaced",
]


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


class RateLogits:
    """One linear's frozen ranking and its learnable logits over candidate pruning rates (per row, or one set for
    the whole layer)."""

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
        index = candidate_index(rates, self.cols)
        small = torch.int16 if rates.numel() < torch.iinfo(torch.int16).max else torch.int32
        # (R, C) first candidate pruning each weight, kept small (widened per step, where it is gathered)
        self.cand_of_col = index.to(small)[rank]
        self.col_rank = rank.to(torch.int32)
        self.rates = rates  # (D,) ascending
        self.theta = nn.Parameter(theta)  # (R, D) or (1, D)
        self.init = theta.detach().clone()
        self._beta: torch.Tensor | None = None  # set by prepare_step before each training forward
        self._counts: torch.Tensor | None = None
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

    def step(self, progress: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The training mask in column order (R, C), hard forward / soft backward, and the rows' expected rates
        (the same at any ``progress``)."""
        beta = torch.softmax(self.theta, dim=-1)
        rates = self.row_rates(beta)
        counts = (rates.detach() * self.cols).floor().long()
        return straight_through(
            hard_keep(self.col_rank, counts), keep_probability(beta, self.cand_of_col)
        ), rates

    def mask(self) -> torch.Tensor:
        return self.step()[0]

    def prepare_step(self, progress: float = 0.0) -> torch.Tensor:
        """Set up the next training forward (``masked_weight``); return the rows' expected rates."""
        beta = torch.softmax(self.theta, dim=-1)
        rates = self.row_rates(beta)
        self._beta, self._counts = beta, (rates.detach() * self.cols).floor().long()
        return rates

    def masked_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` under this step's hard mask; gradients reach the logits straight through the soft one
        (``rates.masked_weight``: the values of ``step``'s mask without keeping it in memory)."""
        return masked_weight(w, self._beta, self.col_rank, self._counts, self.cand_of_col)

    def end_steps(self) -> None:
        self._beta = self._counts = None


class PatternLogits:
    """One linear under BESA for N:M: a learnable distribution per group of ``m`` weights over the patterns that
    keep ``m - n`` of them (``besa.methods.besa.patterns``), started from the ranking ``scores``.

    The sparsity is N/M by construction, so the block's sparsity penalty is constant. The training forward uses
    the expected keep mask at the annealed temperature (``patterns.temperature``), the final mask every group's
    most likely pattern.
    """

    clip: nn.Parameter | None = (
        None  # the clipping is not learned with N:M masks (the OBS sweep fits its grids)
    )

    def __init__(
        self, name: str, layer: nn.Module, scores: torch.Tensor, pattern: NMPattern, sharpness: float
    ):
        self.name = name
        self.layer = layer
        self.rows, self.cols = scores.shape
        self.pattern = pattern
        self.patterns = keep_patterns(pattern).to(scores.device)
        theta = pattern_prior(scores, self.patterns, sharpness)
        self.theta = nn.Parameter(theta)
        self.init = theta.detach().clone()
        self.current_mask: torch.Tensor | None = None
        self.hessian: torch.Tensor | None = None
        self.quant = None

    def parameters(self) -> list[nn.Parameter]:
        return [self.theta]

    def reset(self) -> None:
        with torch.no_grad():
            self.theta.copy_(self.init)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def row_rates(self) -> torch.Tensor:
        return torch.full((self.rows,), self.pattern.sparsity, device=self.theta.device)

    def step(self, progress: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The training mask (R, C) at ``progress`` (0 to 1) through the block's training, and the rows'
        (constant) pruning rates."""
        return pattern_soft_keep(self.theta, self.patterns, temperature(progress)), self.row_rates()

    def prepare_step(self, progress: float = 0.0) -> torch.Tensor:
        """Set up the next training forward (the expected keep mask at ``progress``); return the rates."""
        self.current_mask, rates = self.step(progress)
        return rates

    def masked_weight(self, w: torch.Tensor) -> torch.Tensor:
        assert self.current_mask is not None
        return w * self.current_mask.to(w.dtype)

    def end_steps(self) -> None:
        self.current_mask = None

    def keep(self) -> torch.Tensor:
        """The final keep mask (R, C): every group's most likely pattern."""
        with torch.no_grad():
            return pattern_hard_keep(self.theta, self.patterns)

    def moved(self) -> float:
        """Share of groups whose most likely pattern is no longer the metric's (the initial one)."""
        with torch.no_grad():
            return float((self.theta.argmax(-1) != self.init.argmax(-1)).float().mean())


MaskLogits = RateLogits | PatternLogits
"""What BESA learns for one linear, the logits its mask comes from: over candidate rates of its ranking, or over its
N:M patterns (not to be confused with ``besa.stages.allocation.Allocation``, which gives every block its rate)."""


def clip_stats(logits: RateLogits) -> dict[str, float]:
    """Mean / min / max of a layer's learned clipping strengths, upper and lower, for the report."""
    assert logits.clip is not None
    gamma = torch.sigmoid(logits.clip.detach())
    return {
        f"clip_{side}_{stat}": round(float(getattr(gamma[j], stat)()), 4)
        for j, side in enumerate(("hi", "lo"))
        for stat in ("mean", "min", "max")
    }


def stored_layout(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """An (out, in) matrix in the layout ``layer`` keeps its weight in (the inverse of ``weight_matrix``:
    ``Conv1D`` stores it transposed)."""
    return w.t() if isinstance(layer, Conv1D) else w


@contextmanager
def weight_replaced(layer: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """While active, ``layer.weight`` is ``weight`` (any tensor, one that carries gradients too) instead of its
    parameter, which comes back afterwards, untouched."""
    param = layer._parameters["weight"]
    layer._parameters["weight"] = weight  # not a Parameter: set in the dict, past nn.Module.__setattr__
    try:
        yield
    finally:
        layer._parameters["weight"] = param


def masked_forward(layer: nn.Module, logits: MaskLogits, *args: Any, **kwargs: Any) -> Any:
    """The training forward of an allocated linear: its weight under the step's mask (``prepare_step`` first).

    The layer's own forward runs with the masked weight in place of its parameter, so whatever the layer's class
    does around the product stays: an ``nn.Linear`` subclass's extra outputs (a router's scores and logits),
    ``Conv1D``'s transposed weight. (Its class's forward: the caller has put this function where the instance's
    ``forward`` was.)"""
    w = weight_matrix(layer).detach()
    if logits.clip is not None:  # joint: learned clipping, rounding passed straight through
        w = logits.quantized(w, ste=True).to(w.dtype)
    with weight_replaced(layer, stored_layout(layer, logits.masked_weight(w))):
        return type(layer).forward(layer, *args, **kwargs)
