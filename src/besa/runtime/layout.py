"""The bitmask layout the kernels read (``csrc/bitmask.cpp``): rows in groups of 8, columns in chunks of 16; per
(group, chunk, row) a 16-bit word whose bit j keeps column 16 chunk + j; the kept values group after group, chunk
after chunk, row after row, in float32 or bfloat16, padded with 16 zeros; and where each group's values start.
Interleaving a group's 8 rows chunk by chunk lets one product stream through the bytes in order and load each
chunk of the input once for 8 rows. Made from a dense weight (``pack``) or straight from a ``--save-format sparse``
folder's tensors (``from_saved``), without ever building the dense weight."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from besa.errors import BesaError

__all__ = ["GROUP", "PAD", "PackedWeight", "pack", "from_saved"]

PAD = 16
"""Zeros after the last group's values: a vector load of 16 values may reach past the end."""

GROUP = 8
"""Rows interleaved chunk by chunk; the last group of a weight is padded with empty rows."""


@dataclass
class PackedWeight:
    """A (rows, cols) weight as the kernels read it (see the module docstring): ``mask`` uint8 (groups, 16 *
    chunks), ``values`` 1-D, ``offsets`` int64 (groups + 1); ``kpad`` is the inputs' width padded to chunks."""

    mask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    rows: int
    cols: int

    @property
    def kpad(self) -> int:
        return self.mask.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """The bytes a product reads: mask, values and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.offsets))

    def dense(self) -> torch.Tensor:
        """The (rows, cols) weight, built back (for tests and for prefill without the kernels)."""
        groups, chunks = self.mask.shape[0], self.kpad // 16
        keep = _unpack_little(self.mask).reshape(groups, chunks, GROUP, 16)
        w = torch.zeros(groups, chunks, GROUP, 16, dtype=self.values.dtype)
        w[keep] = self.values[: self.nnz]  # the layout's order is this view's row-major order
        return w.permute(0, 2, 1, 3).reshape(groups * GROUP, self.kpad)[: self.rows, : self.cols]


def _unpack_little(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(mask.numpy(), axis=-1, bitorder="little").astype(bool))


def _padded_shape(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // GROUP), -(-cols // 16)


def pack(w: torch.Tensor, dtype: torch.dtype | None = None) -> PackedWeight:
    """The layout of a dense 2-D weight (its zeros dropped), values in ``dtype`` (float32 or bfloat16; default: the
    weight's own)."""
    dtype = dtype or w.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise BesaError(f"the sparse kernels hold float32 or bfloat16 values, not {dtype}")
    rows, cols = w.shape
    groups, chunks = _padded_shape(rows, cols)
    full = torch.zeros(groups * GROUP, chunks * 16, dtype=dtype)
    full[:rows, :cols] = w.detach().cpu().to(dtype)
    view = (
        full.reshape(groups, GROUP, chunks, 16).permute(0, 2, 1, 3).contiguous()
    )  # (group, chunk, row, col)
    keep = view != 0
    mask = torch.from_numpy(np.packbits(keep.reshape(groups, -1).numpy(), axis=-1, bitorder="little"))
    offsets = torch.zeros(groups + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(keep.reshape(groups, -1).sum(dim=1), 0)
    values = torch.cat([view[keep], torch.zeros(PAD, dtype=dtype)]).contiguous()
    return PackedWeight(mask.contiguous(), values, offsets, rows, cols)


_REVERSED = torch.tensor([int(f"{i:08b}"[::-1], 2) for i in range(256)], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def from_saved(bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> PackedWeight:
    """The layout of one weight of a ``--save-format sparse`` folder (``bitmask``: uint8 (rows, ceil(cols / 8)),
    most significant bit first; ``values``: the kept weights row-major), byte by byte: no dense weight, nor a
    dense mask, is ever built. The values move as blocks, one block per (row, chunk)."""
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise BesaError(
            f"corrupt sparse weight: bitmask {tuple(bitmask.shape)} for a ({rows}, {cols}) weight"
        )
    counts = _POPCOUNT[bitmask.long()]
    if int(counts.sum()) != values.numel():
        raise BesaError(
            f"corrupt sparse weight: its bitmask keeps {int(counts.sum())} values, {values.numel()} stored"
        )
    groups, chunks = _padded_shape(rows, cols)
    mask = torch.zeros(groups * GROUP, chunks * 2, dtype=torch.uint8)
    mask[:rows, : bitmask.shape[1]] = _REVERSED[
        bitmask.long()
    ]  # the same 8 columns a byte, least significant first
    mask = (
        mask.reshape(groups, GROUP, chunks, 2).permute(0, 2, 1, 3).reshape(groups, chunks * 16).contiguous()
    )
    per_chunk = torch.zeros(groups * GROUP, chunks * 2, dtype=torch.int64)
    per_chunk[:rows, : counts.shape[1]] = counts
    per_chunk = per_chunk.reshape(groups * GROUP, chunks, 2).sum(
        -1
    )  # values of each (row, chunk): one block each
    source = torch.cumsum(per_chunk.reshape(-1), 0) - per_chunk.reshape(-1)  # where blocks start, row-major
    interleaved = per_chunk.reshape(groups, GROUP, chunks).permute(0, 2, 1).reshape(-1)
    starts = torch.cumsum(interleaved, 0) - interleaved  # where they start in the layout's order
    target = (
        starts.reshape(groups, chunks, GROUP).permute(0, 2, 1).reshape(-1)
    )  # back to row-major block order
    block = torch.repeat_interleave(torch.arange(per_chunk.numel()), per_chunk.reshape(-1))
    where = target[block] + torch.arange(values.numel()) - source[block]
    dtype = values.dtype if values.dtype in (torch.float32, torch.bfloat16) else torch.float32
    flat = torch.zeros(values.numel() + PAD, dtype=dtype)
    flat[where] = values.reshape(-1).to(dtype)
    offsets = torch.zeros(groups + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(per_chunk.reshape(groups, -1).sum(dim=1), 0)
    return PackedWeight(mask, flat, offsets, rows, cols)
