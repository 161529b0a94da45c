"""Weight update: what happens to the surviving weights of a layer once it is decided how many go.

``none`` keeps them as they are (magnitude, Wanda, the BESA paper). ``obs`` is SparseGPT's sweep (Frantar &
Alistarh, 2023): columns left to right in blocks with lazy updates, each pruned (and, with a quantizer, rounded)
column's error spread over the columns not yet processed through the inverse Hessian. The sweep is told *which*
weights to drop by a ``MaskChoice`` and *how* to round the kept ones by an optional ``SweepQuantizer``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from besa.formats.quant import QuantSpec, fake_quantize, quant_params
from besa.settings.values import NMPattern
from besa.stages.masks import nm_prune_mask, prune_mask_by_rank

__all__ = [
    "MaskChoice", "BlockShare", "RowShares", "NMGroups", "GivenMask", "uniform_choice", "SweepQuantizer",
    "SweepSettings", "inverse_hessian_factor", "dense_target_weight", "obs_sweep", "masked_least_squares"
]  # fmt: skip


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened Hessian (C, C); more damping if it is not PD."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    damp = percdamp * hessian.diagonal().mean()
    for _ in range(4):
        h = hessian.clone()
        h[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        damp = damp * 10
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even with 1000x the dampening")


def dense_target_weight(
    w: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor, percdamp: float
) -> torch.Tensor:
    """The weight that best maps the layer's pruned-stream inputs X to its dense outputs W D, in least squares,
    held to W where the inputs say little: ``argmin ||W D - W~ X||^2 + damp ||W~ - W||^2 = W (C + damp I)(H + damp
    I)^-1`` with C = 2/N D X^T (``CrossStats``), H = 2/N X X^T, damp as SparseGPT's (a fraction of H's mean
    diagonal). With D = X it is W itself.

    The residual W D - W~ X is (up to the damping) orthogonal to every W' X, so ||W D - W' X||^2 = ||W D - W~ X||^2
    + ||(W~ - W') X||^2: pruning W~ by the OBS sweep on H minimises the asymmetric objective (the dense model's
    outputs from the pruned model's inputs) as far as the sweep minimises its own.
    """
    h, c = hessian.double(), cross.double()
    diag = torch.arange(h.shape[0], device=h.device)
    damp = max(float(percdamp * h.diagonal().mean()), 1e-12)
    h[diag, diag] += damp
    c[diag, diag] += damp  # a ridge toward W, not 0: channels with little input keep their weights
    rhs = w.double() @ c  # (out, in)
    return torch.linalg.solve(h, rhs.t()).t().to(w.dtype)  # H is symmetric: (H^-1 rhs^T)^T = rhs H^-1


class MaskChoice:
    """Which weights of a column block the sweep prunes, chosen when the sweep enters the block (by the OBS
    saliency w^2 / [H^-1]_jj^2 of the weights as updated so far; the block is ``obs_sweep``'s mask block)."""

    group: int | None = None
    """N:M: the width M of groups chosen column group by column group inside the block instead."""

    def block_mask(self, saliency: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        """Prune mask (rows, i2 - i1) of columns ``i1:i2`` given their saliency."""
        return torch.zeros_like(saliency, dtype=torch.bool)

    def group_mask(self, saliency: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class BlockShare(MaskChoice):
    """SparseGPT's choice: each block prunes its exact share of ``round(sparsity * rows * cols)`` weights, the
    lowest saliency over the whole block (rows may end up with different counts)."""

    sparsity: float

    def block_mask(self, saliency: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        rows = saliency.shape[0]
        k = round(self.sparsity * rows * i2) - round(self.sparsity * rows * i1)
        order = torch.argsort(saliency.flatten(), stable=True)
        mask = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
        mask[order[:k]] = True
        return mask.reshape(saliency.shape)


@dataclass
class RowShares(MaskChoice):
    """A fixed number of pruned weights per row (an allocation learned elsewhere, e.g. by BESA): each block prunes
    its proportional share of every row's count, lowest saliency first."""

    counts: torch.Tensor
    cols: int

    def block_mask(self, saliency: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        counts, cols = self.counts.to(saliency.device), self.cols
        share = (counts * i2 + cols // 2) // cols - (counts * i1 + cols // 2) // cols
        return prune_mask_by_rank(saliency, share)


@dataclass
class NMGroups(MaskChoice):
    """N:M: the ``n`` lowest-saliency weights of every group of ``m`` columns, chosen when the sweep reaches it."""

    pattern: NMPattern

    def __post_init__(self) -> None:
        self.group = self.pattern.m

    def group_mask(self, saliency: torch.Tensor) -> torch.Tensor:
        return nm_prune_mask(saliency, self.pattern)


def uniform_choice(pattern: NMPattern | None, sparsity: float) -> MaskChoice:
    """Nothing allocated: ``n`` of every ``m`` with a pattern, else the layer's ``sparsity`` share (SparseGPT's)."""
    return NMGroups(pattern) if pattern is not None else BlockShare(sparsity)


@dataclass
class GivenMask(MaskChoice):
    """A mask decided before the sweep (``True`` = prune; e.g. N:M patterns learned by BESA): the sweep only
    spreads each pruned weight's error over the survivors."""

    prune: torch.Tensor

    def block_mask(self, saliency: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        return self.prune[:, i1:i2].to(saliency.device)


@dataclass
class SweepQuantizer:
    """GPTQ-style quantization inside the sweep: a group's grid is fitted when the sweep enters it, to the group's
    weights as updated so far (pruned ones counted as zero), and each column's rounding error is spread like the
    pruning error. ``clip`` (gamma_hi, gamma_lo), each (out, groups), shrinks each group's range first."""

    spec: QuantSpec
    clip: tuple[torch.Tensor, torch.Tensor] | None = None

    def start(self, weight: torch.Tensor) -> None:
        rows, cols = weight.shape
        self.width = self.spec.group_size or cols
        self.scale = torch.zeros(rows, self.spec.groups(cols), device=weight.device)
        self.zero = torch.zeros(rows, self.spec.groups(cols), device=weight.device)

    def enter_group(self, g: int, ahead: torch.Tensor) -> None:
        """Fit group ``g``'s grid to ``ahead`` (rows, >= width): the group's current weights, pruned ones as 0."""
        gammas = (
            (self.clip[0][:, g : g + 1], self.clip[1][:, g : g + 1]) if self.clip is not None else (1.0, 1.0)
        )
        h, z = quant_params(ahead[:, : self.width], QuantSpec(self.spec.bits, 0), *gammas)
        self.scale[:, g], self.zero[:, g] = h[:, 0], z[:, 0]

    def round(self, q: torch.Tensor, g: int) -> torch.Tensor:
        one = QuantSpec(self.spec.bits, 0)
        return fake_quantize(q.unsqueeze(1), self.scale[:, g : g + 1], self.zero[:, g : g + 1], one).squeeze(
            1
        )


@dataclass(frozen=True)
class SweepSettings:
    """How ``obs_sweep`` runs (SparseGPT's own settings, ``SparseGPTConfig``).

    Args:
        blocksize: columns per lazy-update block.
        percdamp: dampening added to the Hessian diagonal, as a fraction of its mean.
        mask_block: columns whose weights are chosen together (``None``: the lazy block).
        lsq_iters: conjugate-gradient steps of the least-squares solve of the kept weights after the sweep (0: none).
    """

    blocksize: int = 128
    percdamp: float = 0.01
    mask_block: int | None = None
    lsq_iters: int = 0


def obs_sweep(
    w: torch.Tensor,
    hessian: torch.Tensor,
    choice: MaskChoice,
    settings: SweepSettings | None = None,
    quantizer: SweepQuantizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune (and quantize) weight ``w`` (out, in) given its inputs' Hessian (in, in); return (new weight, mask).

    The error of every pruned or rounded column is spread over the not-yet-processed columns (OBS update), in lazy
    blocks of ``settings.blocksize`` columns (``settings``: ``SweepSettings()`` when not given). The choice picks
    the weights of ``mask_block`` columns at a time (default: the lazy block; sub-blocks start at each lazy block),
    from their saliency as updated by the columns before them: the smaller, the more the choice sees of the
    compensation so far. N:M choices go group by group instead. Pruned weights are exactly zero in the result. With
    a quantizer its grids are in ``quantizer.scale/.zero``. With ``lsq_iters`` and no quantizer (quantized weights
    must stay on their grids) the kept weights are then solved for the final mask in least squares
    (``masked_least_squares``, same damping).
    """
    settings = settings if settings is not None else SweepSettings()
    blocksize, percdamp, mask_block = settings.blocksize, settings.percdamp, settings.mask_block
    rows, cols = w.shape
    weight = w.float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    hinv = inverse_hessian_factor(h, percdamp)
    if choice.group is not None:
        blocksize = max(choice.group, blocksize - blocksize % choice.group)
    step = choice.group or min(blocksize if mask_block is None else mask_block, blocksize)
    if step < 1:
        raise ValueError(f"obs_sweep: mask_block must be positive, got {mask_block}")
    prune = torch.zeros_like(weight, dtype=torch.bool)
    if quantizer is not None:
        quantizer.start(weight)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = weight[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % step == 0:  # entering a group (N:M) or a mask block: choose its weights now
                cut = slice(i, min(i + step, i2 - i1))
                saliency = w1[:, cut].square() / d[cut].square()
                if choice.group is not None:
                    mask1[:, cut] = choice.group_mask(saliency)
                else:
                    mask1[:, cut] = choice.block_mask(saliency, i1 + cut.start, i1 + cut.stop)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0)
            if quantizer is not None:
                c = i1 + i
                g = c // quantizer.width
                if c % quantizer.width == 0:  # entering group g
                    quantizer.enter_group(
                        g, torch.cat([w1[:, i:].masked_fill(mask1[:, i:], 0), weight[:, i2:]], 1)
                    )
                q = quantizer.round(q, g)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        weight[:, i1:i2] = q1
        prune[:, i1:i2] = mask1
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    weight.masked_fill_(prune, 0)
    if settings.lsq_iters and quantizer is None:
        weight = masked_least_squares(w, hessian, prune, weight, settings.lsq_iters, percdamp)
    return weight, prune


def masked_least_squares(
    w: torch.Tensor,
    hessian: torch.Tensor,
    prune: torch.Tensor,
    start: torch.Tensor,
    iters: int,
    percdamp: float = 0.01,
    chunk: int = 1024,
) -> torch.Tensor:
    """The kept weights that best reproduce the layer's outputs on its inputs, for a fixed mask: each row solves
    ``min ||(w' - w) X||^2 + damp ||w' - w||^2`` with ``w'`` zero where ``prune`` is True (H = 2/N X X^T, damp as
    SparseGPT's: ``percdamp`` times H's mean diagonal), by ``iters`` steps of conjugate gradients preconditioned by
    H's diagonal, started from ``start`` (the OBS sweep's result), every row at once.

    The OBS sweep's update is exact for each pruned column when it is removed, but the columns swept before it are
    frozen by then, so the final weights are not the least-squares optimum of the final mask (ALPS, Meng et al.
    2024, refits the support the same way). Float32 arithmetic (on SmolLM2-like layers with outlier channels the
    same objective as float64 to 1e-8, at half the time); rows are solved ``chunk`` at a time to bound the memory
    to a few copies of (chunk, in). Pruned weights, and the weights of inputs that never fire, are exactly 0.
    """
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += percdamp * h.diagonal().mean()
    h[dead, dead] = 1
    precond = 1.0 / h.diagonal()
    tiny = torch.finfo(torch.float32).tiny
    out = torch.empty_like(start)
    for r1 in range(0, w.shape[0], chunk):
        rows = slice(r1, min(r1 + chunk, w.shape[0]))
        keep = (~prune[rows] & ~dead.unsqueeze(0)).float()
        x = start[rows].float() * keep
        r = ((w[rows].float() - x) @ h) * keep  # minus the gradient, on the support
        z = r * precond
        p, rz = z, (r * z).sum(1, keepdim=True)
        for _ in range(iters):
            q = (p @ h) * keep
            pq = (p * q).sum(1, keepdim=True)
            alpha = torch.where(pq > 0, rz / pq.clamp_min(tiny), torch.zeros_like(pq))  # converged rows stop
            x = x + alpha * p
            r = r - alpha * q
            z = r * precond
            rz_next = (r * z).sum(1, keepdim=True)
            p = z + torch.where(rz > 0, rz_next / rz.clamp_min(tiny), torch.zeros_like(rz)) * p
            rz = rz_next
        out[rows] = (x * keep).to(start.dtype)
    return out
