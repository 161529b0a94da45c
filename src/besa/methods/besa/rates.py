"""Pure math of BESA's learnable sparsity allocation (no modules, hooks or devices).

Every row (or layer) owns logits ``theta`` over D candidate pruning rates ``c`` (ascending). Its distribution is
``beta = softmax(theta)`` and its sparsity the expectation ``alpha = beta . c``. Weights of a row are ranked once by
importance (rank 0 = least important). The forward pass prunes the ``floor(alpha * C)`` lowest ranks (hard mask); the
backward pass sees the keep-probability ``P_j = 1 - sum_d beta_d [j < floor(c_d * C)]`` (straight-through).

Everything that does not depend on ``theta`` (each weight's rank, and from it the first candidate that prunes it) is
computed once per block, so a training step costs one softmax, one suffix sum and one gather per layer.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "candidate_rates",
    "tilted_logits",
    "expected_rates",
    "column_ranks",
    "candidate_index",
    "keep_probability",
    "hard_keep",
    "straight_through",
    "round_to_budget",
]


def candidate_rates(count: int, low: float, high: float) -> torch.Tensor:
    """``count`` candidate pruning rates spaced evenly over [low, high], ascending (float32)."""
    if count < 2:
        raise ValueError("need at least two candidate rates")
    return torch.linspace(low, high, count, dtype=torch.float32)


def tilted_logits(rates: torch.Tensor, target: float, iters: int = 100) -> torch.Tensor:
    """Logits ``tau * rates`` whose softmax has expectation ``target`` (the flattest such distribution).

    ``tau`` is found by bisection; with a window centred on the target it is 0 (uniform).
    """
    lo_rate, hi_rate = float(rates.min()), float(rates.max())
    if not lo_rate <= target <= hi_rate:
        raise ValueError(f"target {target} outside the candidate range [{lo_rate}, {hi_rate}]")
    scale = 1.0 / max(hi_rate - lo_rate, 1e-6)
    lo, hi = -500.0 * scale, 500.0 * scale
    for _ in range(iters):
        mid = (lo + hi) / 2
        mean = float(torch.softmax(mid * rates.double(), 0) @ rates.double())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return ((lo + hi) / 2 * rates).float()


def expected_rates(theta: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Expected pruning rate ``softmax(theta) . rates`` of every row of ``theta`` (G, D) -> (G,)."""
    return torch.softmax(theta, dim=-1) @ rates


def column_ranks(order: torch.Tensor) -> torch.Tensor:
    """Inverse of a per-row ranking: ``order[r, j]`` is the column of rank ``j``; returns the rank of every column."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def candidate_index(rates: torch.Tensor, cols: int) -> torch.Tensor:
    """For every rank ``j`` (C,), the first candidate ``d`` whose cut ``floor(c_d * C)`` exceeds ``j``.

    Candidate ``d`` prunes the ranks below its cut, so rank ``j`` is pruned by exactly the candidates from this index on
    (rates ascending). ``D`` means no candidate prunes it.
    """
    cut = (rates * cols).floor().long().clamp_(0, cols)  # (D,)
    return torch.searchsorted(cut, torch.arange(cols, device=rates.device), right=True)


def keep_probability(beta: torch.Tensor, cand_of_col: torch.Tensor) -> torch.Tensor:
    """Soft keep mask (R, C): ``1 - Pr_{d~beta}[d prunes the weight]`` for each weight.

    ``beta`` is (R, D), or (1, D) shared by all rows; ``cand_of_col`` (R, C) is ``candidate_index`` at each weight's
    rank. One suffix sum over the D candidates and one gather: O(R * (D + C)).
    """
    suffix = keep_suffix(beta)  # (G, D+1)
    index = cand_of_col.long()  # stored narrow by the caller to save memory; gather wants int64
    if beta.shape[0] == 1:
        return 1.0 - suffix[0][index]
    return 1.0 - suffix.gather(1, index)


def hard_keep(col_rank: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Hard keep mask (R, C): a weight is pruned iff its rank in its row is below that row's count."""
    return col_rank >= counts.unsqueeze(1).to(col_rank.device)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.to(soft.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def keep_suffix(beta: torch.Tensor) -> torch.Tensor:
    """(G, D+1) probability that a candidate from ``d`` on is drawn (the last column 0): ``keep_probability`` is
    ``1 - suffix`` gathered at each weight's candidate index."""
    return torch.cat([beta.flip(-1).cumsum(-1).flip(-1), beta.new_zeros(beta.shape[0], 1)], dim=-1)


class _MaskedWeight(torch.autograd.Function):
    """``w * hard_keep`` in the forward; in the backward the straight-through gradient of the soft keep
    probabilities, ``1 - suffix[cand_of_col]``, taken to ``suffix`` directly. Nothing the size of ``w`` is saved
    for the backward (the hard mask is recomputed there from the ranks and counts), where autograd of
    ``w * straight_through(hard, keep_probability(...))`` keeps a float mask and an int64 index per weight: the
    same values and gradients for about a third of the memory of a block's training step."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, suffix: torch.Tensor, col_rank: torch.Tensor, counts: torch.Tensor,
                cand_of_col: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(w, suffix, col_rank, counts, cand_of_col)
        return w * hard_keep(col_rank, counts).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, None, None, None]:
        w, suffix, col_rank, counts, cand_of_col = ctx.saved_tensors
        grad_w = grad * hard_keep(col_rank, counts).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_keep = (grad * w).to(suffix.dtype)  # d loss / d keep probability of every weight
        index = cand_of_col.long()
        grad_suffix = torch.zeros_like(suffix)
        if suffix.shape[0] == 1:  # as advanced indexing's backward accumulates
            grad_suffix[0].index_put_((index,), grad_keep, accumulate=True)
        else:  # as gather's backward
            grad_suffix.scatter_add_(1, index, grad_keep)
        return grad_w, grad_suffix.neg_(), None, None, None


def masked_weight(w: torch.Tensor, beta: torch.Tensor, col_rank: torch.Tensor, counts: torch.Tensor,
                  cand_of_col: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``w`` with the hard mask of ``counts`` applied, differentiable in ``beta`` through the soft keep
    probabilities (straight-through) and in ``w`` through the kept weights."""
    return _MaskedWeight.apply(w, keep_suffix(beta), col_rank, counts, cand_of_col)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard`` exactly, gradient of ``soft`` (the straight-through estimator)."""
    return _StraightThrough.apply(hard, soft)


def round_to_budget(
    rates: torch.Tensor, widths: torch.Tensor, budget: int, max_rate: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Integer prune counts per row that sum exactly to ``budget``, as close as possible to ``rates * widths``.

    All rows' rates are shifted by one common amount ``s`` (found by bisection, rates clipped to [0, max_rate]) so
    that the fractional counts add up to the budget; the remainder after flooring goes to the rows with the largest
    fractional parts. Returns ``(counts, s)``.
    """
    rates = rates.double()
    widths_f = widths.double()
    caps = (max_rate * widths_f).floor()
    if budget > caps.sum() or budget < 0:
        raise ValueError(f"budget {budget} is not reachable with rates capped at {max_rate}")

    def total(shift: float) -> torch.Tensor:
        return ((rates + shift).clamp(0, max_rate) * widths_f).clamp(max=caps).sum()

    lo, hi = -1.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
    shift = (lo + hi) / 2
    wanted = ((rates + shift).clamp(0, max_rate) * widths_f).clamp(max=caps)
    counts = wanted.floor()
    remainder = int(budget - counts.sum())
    if remainder > 0:
        frac = (wanted - counts).masked_fill(counts >= caps, -1.0)
        counts[torch.topk(frac, remainder).indices] += 1
    elif remainder < 0:
        frac = (wanted - counts).masked_fill(counts <= 0, 2.0)
        counts[torch.topk(frac, -remainder, largest=False).indices] -= 1
    return counts.long(), shift
