"""Pure math of BESA's learnable sparsity allocation (no modules, hooks or devices).

Every row (or layer) owns logits ``theta`` over D candidate pruning rates ``c`` (ascending). Its distribution is
``beta = softmax(theta)`` and its sparsity the expectation ``alpha = beta . c``. Weights of a row are ranked once by
importance (rank 0 = least important). The forward pass prunes the ``floor(alpha * C)`` lowest ranks (hard mask); the
backward pass sees the keep-probability ``P_j = 1 - sum_d beta_d [j < floor(c_d * C)]`` (straight-through).
"""

from __future__ import annotations

import torch

__all__ = [
    "candidate_rates",
    "tilted_logits",
    "expected_rates",
    "hard_keep_by_rank",
    "soft_keep_by_rank",
    "straight_through",
    "to_columns",
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


def hard_keep_by_rank(counts: torch.Tensor, cols: int) -> torch.Tensor:
    """Keep mask in rank order: rank ``j`` of row ``r`` is kept iff ``j >= counts[r]``. Bool (R, C)."""
    return torch.arange(cols, device=counts.device).unsqueeze(0) >= counts.unsqueeze(1)


def soft_keep_by_rank(theta: torch.Tensor, rates: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """Keep-probability in rank order, (rows, C): ``1 - Pr_{d~beta}[rank < floor(c_d * C)]``.

    ``theta`` is (rows, D) or (1, D) (one distribution shared by every row). Built with one scatter-add and one
    cumulative sum, so the cost is O(rows * (D + C)).
    """
    beta = torch.softmax(theta, dim=-1)  # (G, D)
    cut = (rates * cols).floor().long().clamp_(0, cols)  # (D,) ranks below cut_d are pruned by candidate d
    mass_at_cut = beta.new_zeros(beta.shape[0], cols + 1).index_add_(1, cut, beta)  # (G, C+1)
    # Pr[cut > j] = sum of the mass at cuts j+1..C: a suffix sum
    prune_prob = mass_at_cut.flip(1).cumsum(1).flip(1)[:, 1:]  # (G, C)
    return (1.0 - prune_prob).expand(rows, cols)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard`` exactly, gradient of ``soft``."""
    return hard.to(soft.dtype) - soft.detach() + soft


def to_columns(by_rank: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Move a (R, C) tensor from rank order back to column order; ``order[r, j]`` = column of rank ``j``."""
    return torch.empty_like(by_rank).scatter(1, order, by_rank)


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
