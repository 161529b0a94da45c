"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with the dampened inverse Hessian of the layer
inputs, processed in column blocks with lazy updates, the surviving weights updated to compensate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from besa.config import MethodConfig, NMPattern
from besa.errors import BesaError
from besa.methods.base import LayerStats, LayerwisePruner, QuantGrids
from besa.methods.masks import nm_prune_mask, prune_mask_by_rank
from besa.modeling import set_weight_matrix, weight_matrix
from besa.quant import QuantSpec, fake_quantize, quant_params
from besa.registry import register_method

__all__ = ["SparseGPTConfig", "SparseGPTPruner", "HessianStats", "sparsegpt_prune", "inverse_hessian_factor"]


@dataclass
class SparseGPTConfig(MethodConfig):
    """SparseGPT settings.

    Args:
        blocksize: columns per lazy-update block (must be a multiple of M for N:M patterns).
        percdamp: dampening added to the Hessian diagonal, as a fraction of its mean.
    """

    blocksize: int = field(default=128, metadata={"help": "SparseGPT: columns per lazy-update block"})
    percdamp: float = field(
        default=0.01, metadata={"help": "SparseGPT: Hessian dampening, fraction of mean diag"}
    )

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise BesaError(f"--blocksize must be positive, got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise BesaError(f"--percdamp must be in (0, 1), got {self.percdamp}")


class HessianStats(LayerStats):
    """Running H = 2/N * sum_t x_t x_t^T over the N calibration tokens (float32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


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


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: QuantSpec | None = None,
    row_counts: torch.Tensor | None = None,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Prune weight ``w`` (out, in) given the input Hessian (in, in); return ``(new weight, prune mask, grids)``.

    Unstructured: each column block prunes, by rank of w^2 / [H^-1]_jj^2 over the whole block, its exact share of
    ``round(sparsity * out * in)`` weights, so the layer total is exact. N:M: the ``n`` lowest of every ``m`` columns
    in each row. The error of every pruned column is spread over the not-yet-processed columns (OBS update).

    ``row_counts`` (R,) fixes how many weights each row loses instead (an allocation learned elsewhere, e.g. by
    BESA): each column block prunes its proportional share of every row's count, lowest saliency first.

    With ``quant`` the kept weights are also quantized column by column (GPTQ-style, joint with the pruning): a
    group's grid is fitted when the sweep enters it, to the group's weights as updated so far (pruned ones counted
    as zero), and each column's rounding error is spread like the pruning error. ``grids`` is then
    ``(scale, zero)``, each (out, groups); ``None`` without ``quant``. ``clip`` (gamma_hi, gamma_lo), each
    (out, groups), shrinks each group's range before its grid is fitted (clipping learned elsewhere, e.g. by BESA).
    """
    rows, cols = w.shape
    weight = w.float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    hinv = inverse_hessian_factor(h, percdamp)
    if pattern is not None:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    prune = torch.zeros_like(weight, dtype=torch.bool)
    if quant is not None:
        groups = quant.groups(cols)
        width = quant.group_size or cols
        scale = torch.zeros(rows, groups, device=weight.device)
        zero = torch.zeros(rows, groups, device=weight.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = weight[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        if row_counts is not None:
            share = (row_counts.to(w1.device) * i2 + cols // 2) // cols - (
                row_counts.to(w1.device) * i1 + cols // 2
            ) // cols
            mask1 = prune_mask_by_rank(w1.square() / d.square(), share)
        elif pattern is None:
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            order = torch.argsort((w1.square() / d.square()).flatten(), stable=True)
            mask1 = torch.zeros(w1.numel(), dtype=torch.bool, device=w1.device)
            mask1[order[:k]] = True
            mask1 = mask1.reshape(w1.shape)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask1[:, group] = nm_prune_mask(w1[:, group].square() / d[group].square(), pattern)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0)
            if quant is not None:
                c = i1 + i
                g = c // width
                if c % width == 0:  # entering group g: fit its grid to the current weights, pruned ones as 0
                    ahead = torch.cat([w1[:, i:].masked_fill(mask1[:, i:], 0), weight[:, i2:]], dim=1)[
                        :, :width
                    ]
                    gammas = (
                        (clip[0][:, g : g + 1], clip[1][:, g : g + 1]) if clip is not None else (1.0, 1.0)
                    )
                    h, z = quant_params(ahead, QuantSpec(quant.bits, 0), *gammas)
                    scale[:, g], zero[:, g] = h[:, 0], z[:, 0]
                q = fake_quantize(
                    q.unsqueeze(1), scale[:, g : g + 1], zero[:, g : g + 1], QuantSpec(quant.bits, 0)
                )
                q = q.squeeze(1)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        weight[:, i1:i2] = q1
        prune[:, i1:i2] = mask1
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    weight.masked_fill_(prune, 0)
    return weight, prune, (scale, zero) if quant is not None else None


@register_method("sparsegpt", SparseGPTConfig, "OBS with the inverse Hessian, surviving weights updated")
class SparseGPTPruner(LayerwisePruner):
    """Prune with SparseGPT's second-order update of the remaining weights."""

    def make_stats(self, layer: nn.Module) -> LayerStats:
        w = weight_matrix(layer)
        return HessianStats(w.shape[1], w.device)

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None) -> QuantGrids | None:
        assert isinstance(stats, HessianStats)
        cfg = self.method_config
        assert isinstance(cfg, SparseGPTConfig)
        joint = self.quant if self.config.quant_mode == "joint" else None  # the OBS sweep quantizes too
        new_w, _, grids = sparsegpt_prune(
            weight_matrix(layer),
            stats.hessian,
            self.sparsity,
            self.pattern,
            cfg.blocksize,
            cfg.percdamp,
            joint,
        )
        set_weight_matrix(layer, new_w)
        return grids
