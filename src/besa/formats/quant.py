"""Weight-only, asymmetric, uniform fake quantization by groups of input columns, with learnable clipping.

For a weight (out, in) cut into groups of ``group_size`` consecutive input columns (the last group narrower when
they do not divide ``in``; or one group per row), each
(row, group) gets a step ``h`` and an integer zero point ``z`` from its (clipped) range:

    max' = gamma_hi * max(W_g, 0),  min' = gamma_lo * min(W_g, 0)
    h = (max' - min') / (2^B - 1),  z = round(-min' / h)
    Q(W) = (clamp(round(W / h) + z, 0, 2^B - 1) - z) * h

The range always contains 0, so 0 is on every grid (code ``z``) and pruned weights stay exactly zero. The clipping
strengths ``gamma = sigmoid(logit)`` are OmniQuant's learnable weight clipping; ``round`` passes gradients straight
through where learning needs it. All functions are pure: (tensors in) -> (tensors out).
"""

from __future__ import annotations

import torch

from besa.settings.values import QuantSpec

__all__ = [
    "QuantSpec",
    "group_view",
    "quant_params",
    "group_range",
    "grid_from_range",
    "fake_quantize",
    "quantize_codes",
    "dequantize_codes",
    "round_ste",
    "CLIP_INIT_LOGIT",
]

CLIP_INIT_LOGIT = 4.0
"""Initial clipping logit: sigmoid(4) = 0.982, OmniQuant's start just inside the full range."""


def group_view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), zero-padded on the right when the groups do not divide ``in``.

    Padding with zeros changes no group's range, as every range contains 0 anyway.
    """
    rows, cols = w.shape
    groups = spec.groups(cols)
    width = -(-cols // groups) if spec.group_size == 0 else spec.group_size
    if groups * width != cols:
        w = torch.nn.functional.pad(w, (0, groups * width - cols))
    return w.reshape(rows, groups, width)


def _ungroup(g: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``group_view``: (out, groups, group_size) -> (out, in), padding dropped."""
    return g.reshape(g.shape[0], -1)[:, :cols]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def quant_params(
    w: torch.Tensor,
    spec: QuantSpec,
    gamma_hi: torch.Tensor | float = 1.0,
    gamma_lo: torch.Tensor | float = 1.0,
    ste: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``h`` and zero point ``z`` (float, integral values) of every (row, group): each (out, groups).

    ``gamma_*`` scale the group maximum / minimum (broadcast to (out, groups)); with ``ste`` the rounding of ``z``
    passes gradients through, so ``h`` and ``z`` are differentiable in the gammas.
    """
    hi, lo = group_range(w, spec)
    return grid_from_range(hi, lo, spec, gamma_hi, gamma_lo, ste)


def group_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """max(W_g, 0) and min(W_g, 0) of every (row, group), each (out, groups), float32."""
    g = group_view(w.float(), spec)
    return g.amax(dim=-1).clamp_min(0), g.amin(dim=-1).clamp_max(0)


def grid_from_range(
    hi: torch.Tensor,
    lo: torch.Tensor,
    spec: QuantSpec,
    gamma_hi: torch.Tensor | float = 1.0,
    gamma_lo: torch.Tensor | float = 1.0,
    ste: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point from a group range clipped by ``gamma``: see ``quant_params``."""
    hi = hi * gamma_hi
    lo = lo * gamma_lo
    h = ((hi - lo) / spec.qmax).clamp(min=1e-8)
    z = -lo / h
    z = round_ste(z) if ste else torch.round(z)
    return h, z.clamp(0, spec.qmax)


def fake_quantize(
    w: torch.Tensor, h: torch.Tensor, z: torch.Tensor, spec: QuantSpec, ste: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``w`` (out, in) on the grids (h, z) (out, groups); float32 result of ``w``'s shape."""
    g = group_view(w.float(), spec)
    rounded = round_ste(g / h.unsqueeze(-1)) if ste else torch.round(g / h.unsqueeze(-1))
    q = torch.clamp(rounded + z.unsqueeze(-1), 0, spec.qmax)
    return _ungroup((q - z.unsqueeze(-1)) * h.unsqueeze(-1), w.shape[1])


def quantize_codes(w: torch.Tensor, h: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (uint8, (out, in)) of a weight that already lies on its grids: ``w = (codes - z) * h``."""
    g = group_view(w.float(), spec)
    q = torch.round(g / h.unsqueeze(-1)) + z.unsqueeze(-1)
    return _ungroup(q.clamp(0, spec.qmax).to(torch.uint8), w.shape[1])


def dequantize_codes(codes: torch.Tensor, h: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(codes - z) * h`` by groups, float32 (out, in): the inverse of ``quantize_codes``."""
    g = group_view(codes.float(), spec)
    return _ungroup((g - z.unsqueeze(-1)) * h.unsqueeze(-1), codes.shape[1])
