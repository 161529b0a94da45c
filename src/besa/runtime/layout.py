"""The bitmask layout the kernels read (``csrc/bitmask.cpp``): per row, one bit per column, least significant bit
first, 16 columns per 2 bytes; the kept values row after row in float32 or bfloat16, padded with 16 zeros; and where
each row's values start. Made from a dense weight (``pack``) or straight from a ``--save-format sparse`` folder's
tensors (``from_saved``), without ever building the dense weight."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from besa.errors import BesaError

__all__ = ["PackedWeight", "pack", "from_saved"]

PAD = 16
"""Zeros after the last row's values: a vector load of 16 values may reach past the end."""


@dataclass
class PackedWeight:
    """A (rows, cols) weight as the kernels read it (see the module docstring); ``kpad`` is the inputs' width
    padded to the mask's columns."""

    mask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    rows: int
    cols: int

    @property
    def kpad(self) -> int:
        return self.mask.shape[1] * 8

    @property
    def nbytes(self) -> int:
        """The bytes a product reads: mask, values and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.offsets))

    def dense(self) -> torch.Tensor:
        """The (rows, cols) weight, built back (for tests and for prefill without the kernels)."""
        keep = _unpack_little(self.mask)[:, : self.cols]
        w = torch.zeros(self.rows, self.cols, dtype=self.values.dtype)
        w[keep] = self.values[: int(self.offsets[-1])]
        return w


def _unpack_little(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(mask.numpy(), axis=-1, bitorder="little").astype(bool))


def _packed(keep: torch.Tensor, values: torch.Tensor) -> PackedWeight:
    """The layout from a (rows, cols) bool ``keep`` and its kept values in row-major order."""
    rows, cols = keep.shape
    width = -(-cols // 16) * 16
    padded = torch.zeros(rows, width, dtype=torch.bool)
    padded[:, :cols] = keep
    mask = torch.from_numpy(np.packbits(padded.numpy(), axis=-1, bitorder="little"))
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(keep.sum(dim=1), 0)
    flat = torch.cat([values.reshape(-1), torch.zeros(PAD, dtype=values.dtype)]).contiguous()
    return PackedWeight(mask.contiguous(), flat, offsets, rows, cols)


def pack(w: torch.Tensor, dtype: torch.dtype | None = None) -> PackedWeight:
    """The layout of a dense 2-D weight (its zeros dropped), values in ``dtype`` (float32 or bfloat16; default: the
    weight's own)."""
    dtype = dtype or w.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise BesaError(f"the sparse kernels hold float32 or bfloat16 values, not {dtype}")
    w = w.detach().cpu().to(dtype)
    keep = w != 0
    return _packed(keep, w[keep])


_REVERSED = torch.tensor([int(f"{i:08b}"[::-1], 2) for i in range(256)], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def from_saved(bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> PackedWeight:
    """The layout of one weight of a ``--save-format sparse`` folder (``bitmask``: uint8 (rows, ceil(cols / 8)),
    most significant bit first; ``values``: the kept weights row-major), byte by byte: no dense weight, nor a
    dense mask, is ever built."""
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise BesaError(
            f"corrupt sparse weight: bitmask {tuple(bitmask.shape)} for a ({rows}, {cols}) weight"
        )
    counts = _POPCOUNT[bitmask.long()].sum(dim=1)
    if int(counts.sum()) != values.numel():
        raise BesaError(
            f"corrupt sparse weight: its bitmask keeps {int(counts.sum())} values, {values.numel()} stored"
        )
    mask = _REVERSED[bitmask.long()]  # the same 8 columns per byte, least significant bit first
    if mask.shape[1] % 2:  # 16 columns per 2 bytes
        mask = torch.cat([mask, torch.zeros(rows, 1, dtype=torch.uint8)], dim=1)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    dtype = values.dtype if values.dtype in (torch.float32, torch.bfloat16) else torch.float32
    flat = torch.cat([values.reshape(-1).to(dtype), torch.zeros(PAD, dtype=dtype)]).contiguous()
    return PackedWeight(mask.contiguous(), flat, offsets, rows, cols)
