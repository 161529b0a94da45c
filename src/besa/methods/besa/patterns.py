"""Pure math of BESA for N:M sparsity: one learnable distribution per group of M weights over the C(M, N) ways to
keep M - N of them, started from the ranking metric.

Unlike the rate distributions of ``rates`` these are not trained straight-through: the training forward uses the
expected keep mask of the distributions sharpened by a temperature annealed from 1 to ``ANNEAL_END``, so it ends
close to the hard mask. Measured by hand on four random linears with correlated inputs (2:4, Adam, 300 steps,
lr 0.01-0.2): the hard forward with a straight-through gradient ended 10-70% above the output error of the
metric's own mask (many groups flip at once on a first-order signal); the annealed relaxation 5-30% below it.

Shapes: a weight (R, C) has G = C / M groups per row; the logits are (R, G, P) with P = C(M, N) patterns, and
``patterns`` (P, M) is True where a pattern keeps a weight.
"""

from __future__ import annotations

import itertools
from math import comb

import torch

from besa.settings.values import NMPattern

__all__ = [
    "ANNEAL_END",
    "keep_patterns",
    "pattern_prior",
    "pattern_hard_keep",
    "pattern_soft_keep",
    "temperature",
]

ANNEAL_END = 0.02
"""The temperature the training ends at (it starts at 1)."""


def keep_patterns(pattern: NMPattern) -> torch.Tensor:
    """Every way to keep ``m - n`` of ``m`` weights, (C(m, n), m) bool, in lexicographic order of the kept set."""
    kept = list(itertools.combinations(range(pattern.m), pattern.m - pattern.n))
    assert len(kept) == comb(pattern.m, pattern.n)
    out = torch.zeros(len(kept), pattern.m, dtype=torch.bool)
    for i, cols in enumerate(kept):
        out[i, list(cols)] = True
    return out


def pattern_prior(scores: torch.Tensor, patterns: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Initial logits (R, G, P): ``sharpness`` times the sum of the log-scores a pattern keeps.

    The softmax is then proportional to the product of the kept scores to the power ``sharpness`` (the same for
    any scale of the scores), and its most likely pattern keeps the ``m - n`` highest scores of the group, the
    metric's own N:M mask.
    """
    rows, cols = scores.shape
    m = patterns.shape[1]
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input width {cols} to be a multiple of {m}")
    logs = scores.float().clamp_min(torch.finfo(torch.float32).tiny).log().reshape(rows, cols // m, m)
    return sharpness * logs @ patterns.to(logs).t()


def pattern_hard_keep(theta: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """The most likely pattern of every group as a keep mask (R, G * M); ties go to the first pattern."""
    rows, groups, _ = theta.shape
    return patterns.to(theta.device)[theta.argmax(-1)].reshape(rows, groups * patterns.shape[1])


def temperature(progress: float) -> float:
    """The annealing schedule: 1 at the start of a block's training (``progress`` 0), ``ANNEAL_END`` at its end
    (``progress`` 1), geometric in between."""
    return ANNEAL_END ** min(max(progress, 0.0), 1.0)


def pattern_soft_keep(theta: torch.Tensor, patterns: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Every weight's probability of being kept (R, G * M) under ``softmax(theta / tau)``, differentiable."""
    rows, groups, _ = theta.shape
    probs = torch.softmax(theta / tau, dim=-1)
    return (probs @ patterns.to(probs)).reshape(rows, groups * patterns.shape[1])
