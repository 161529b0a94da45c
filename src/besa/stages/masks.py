"""Pure tensor math for building pruning masks by rank (never by threshold, so ties cannot change the count).

All masks here are boolean with ``True`` = prune (set to zero). Scores are "higher = more important".
"""

from __future__ import annotations

import torch

from besa.settings.values import NMPattern

__all__ = ["row_prune_counts", "prune_mask_by_rank", "nm_prune_mask", "select_prune_mask", "split_budget"]


def split_budget(total: int, parts: int) -> torch.Tensor:
    """Split an integer ``total`` into ``parts`` integers that differ by at most one (the larger ones first)."""
    base, extra = divmod(total, parts)
    counts = torch.full((parts,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def row_prune_counts(rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """Number of weights to prune in each row so that the whole matrix holds exactly ``round(s*rows*cols)`` zeros."""
    total = round(sparsity * rows * cols)
    return split_budget(total, rows)


def prune_mask_by_rank(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the ``counts[r]`` lowest-scoring entries of each row ``r`` of ``scores`` (R, C).

    Ties are broken by position (stable sort), so the count is exact whatever the scores.
    """
    rows, cols = scores.shape
    order = torch.argsort(scores, dim=1, stable=True)  # (R, C) ascending importance
    ranks_pruned = torch.arange(cols, device=scores.device).unsqueeze(0) < counts.to(scores.device).unsqueeze(
        1
    )
    return torch.zeros_like(ranks_pruned).scatter_(1, order, ranks_pruned)


def nm_prune_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Prune the ``n`` lowest-scoring entries in every group of ``m`` consecutive columns of ``scores`` (R, C)."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise ValueError(
            f"N:M pattern {pattern} needs the input width {cols} to be a multiple of {pattern.m}"
        )
    grouped = scores.reshape(rows, cols // pattern.m, pattern.m)
    order = torch.argsort(grouped, dim=-1, stable=True)  # (R, C/m, m)
    pruned_rank = torch.arange(pattern.m, device=scores.device) < pattern.n
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, pruned_rank.expand_as(order))
    return mask.reshape(rows, cols)


def select_prune_mask(scores: torch.Tensor, sparsity: float, pattern: NMPattern | None) -> torch.Tensor:
    """Per-output-row mask: N:M groups if ``pattern`` is given, else an exact unstructured count per row."""
    if pattern is not None:
        return nm_prune_mask(scores, pattern)
    return prune_mask_by_rank(scores, row_prune_counts(*scores.shape, sparsity))
