"""The bitmask layout the kernels read (``csrc/bitmask.cpp``): rows in groups of 8, columns in chunks of 16; per
(group, chunk, row) a 16-bit word whose bit j keeps column 16 chunk + j; the kept values group after group, chunk
after chunk, row after row, padded with 16 zeros; and where each group's values start. Interleaving a group's 8
rows chunk by chunk lets one product stream through the bytes in order and load each chunk of the input once for 8
rows. Values are float32 or bfloat16, or integer codes (8 bits, or 4 bits two a byte, each row's codes of a chunk
padded to whole bytes) with a scale and a zero point per row and group of columns, as ``--wbits`` quantizes:
``w = (code - zero) * scale``. Made from a dense weight (``pack``) or straight from a ``--save-format sparse``
folder's tensors (``from_saved``), without ever building the dense weight; codes from a float layout
(``quantize``) or from a folder's ``--save-quantized`` codes (``pack_codes``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from besa.errors import BesaError
from besa.formats.quant import QuantSpec, fake_quantize, quant_params, quantize_codes

__all__ = ["GROUP", "PAD", "PackedWeight", "pack", "from_saved", "pack_codes", "quantize"]

PAD = 16
"""Zeros after the last group's values: a vector load of 16 values may reach past the end."""

GROUP = 8
"""Rows interleaved chunk by chunk; the last group of a weight is padded with empty rows."""


@dataclass
class PackedWeight:
    """A (rows, cols) weight as the kernels read it (see the module docstring): ``mask`` uint8 (groups, 16 *
    chunks), ``values`` 1-D, ``offsets`` int64 (groups + 1); ``kpad`` is the inputs' width padded to chunks.
    ``bits`` 0: float values; 8 or 4: uint8 codes, with ``scales`` and ``zeros`` float32 (8 * groups, column
    groups) and ``group_chunks`` chunks of 16 columns per column group."""

    mask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    rows: int
    cols: int
    bits: int = 0
    scales: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    zeros: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    group_chunks: int = 1

    @property
    def kpad(self) -> int:
        return self.mask.shape[1]

    @property
    def nnz(self) -> int:
        """Kept weights."""
        return int(self.keep_view().sum())

    @property
    def codec(self) -> int:
        """The kernels' name for the values: 0 float32, 1 bfloat16, 2 int8 codes, 3 int4 codes."""
        if self.bits:
            return 2 if self.bits == 8 else 3
        return 0 if self.values.dtype == torch.float32 else 1

    @property
    def nbytes(self) -> int:
        """The bytes a product reads: mask, values, offsets (and scales and zero points)."""
        held = (self.mask, self.values, self.offsets, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in held)

    def kernel_args(self) -> tuple:
        """The layout as ``bitmask_linear`` and ``bitmask_unpack`` take it."""
        return (self.mask, self.values, self.offsets, self.rows, self.codec, self.scales, self.zeros,
                self.group_chunks)  # fmt: skip

    def keep(self) -> torch.Tensor:
        """Which weights are kept, bool (rows, cols)."""
        return self.keep_view().permute(0, 2, 1, 3).reshape(-1, self.kpad)[: self.rows, : self.cols]

    def keep_view(self) -> torch.Tensor:
        """Which weights are kept, bool (groups, chunks, 8, 16): the layout's order."""
        groups, chunks = self.mask.shape[0], self.kpad // 16
        return _unpack_little(self.mask).reshape(groups, chunks, GROUP, 16)

    def dense(self) -> torch.Tensor:
        """The (rows, cols) weight, built back (for tests and for prefill without the kernels); codes dequantized in
        float32, as ``besa.formats.quant.dequantize_codes`` does."""
        keep = self.keep_view()
        groups, chunks = keep.shape[:2]
        w = torch.zeros(
            groups, chunks, GROUP, 16, dtype=self.values.dtype if not self.bits else torch.float32
        )
        w[keep] = self._kept_values(keep)  # the layout's order is this view's row-major order
        return w.permute(0, 2, 1, 3).reshape(groups * GROUP, self.kpad)[: self.rows, : self.cols]

    def _kept_values(self, keep: torch.Tensor) -> torch.Tensor:
        if not self.bits:
            return self.values[: int(keep.sum())]
        counts = keep.sum(-1).reshape(-1)  # kept weights of each (group, chunk, row): one block each
        codes = self.values.long()
        if self.bits == 4:
            nibbles = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
            codes = nibbles[_nibble_positions(counts)]
        else:
            codes = codes[: int(counts.sum())]
        g, c, i, j = keep.nonzero(as_tuple=True)
        at = (g * GROUP + i, torch.div(c, self.group_chunks, rounding_mode="floor"))
        return (codes.float() - self.zeros[at]) * self.scales[at]


def _unpack_little(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(mask.numpy(), axis=-1, bitorder="little").astype(bool))


def _nibble_positions(counts: torch.Tensor) -> torch.Tensor:
    """Where each kept 4-bit code sits in the nibble stream, in the layout's order: block b (one per (group, chunk,
    row), holding ``counts[b]`` codes) starts at nibble 2 * (its first byte), each block padded to whole bytes."""
    units = (counts + 1) // 2
    first = torch.cumsum(units, 0) - units
    block = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    within = torch.arange(int(counts.sum())) - (torch.cumsum(counts, 0) - counts)[block]
    return 2 * first[block] + within


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


def pack_codes(codes: torch.Tensor, keep: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               spec: QuantSpec) -> PackedWeight:  # fmt: skip
    """The layout of integer codes: ``codes`` uint8 (rows, cols) on the grids ``scales``, ``zeros`` (rows, groups)
    of ``spec`` (8 or 4 bits, a group size that is a multiple of 16, or 0), ``keep`` bool (rows, cols)."""
    if spec.bits not in (4, 8):
        raise BesaError(f"the sparse kernels hold 8-bit or 4-bit codes, not {spec.bits}-bit")
    if spec.group_size % 16:
        raise BesaError(
            f"the sparse kernels need a quantization group size that is a multiple of 16, not {spec.group_size}"
        )
    rows, cols = codes.shape
    groups, chunks = _padded_shape(rows, cols)

    def view(t: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(groups * GROUP, chunks * 16, dtype=t.dtype)
        full[:rows, :cols] = t
        return full.reshape(groups, GROUP, chunks, 16).permute(0, 2, 1, 3).contiguous()

    kept = view(keep)
    stored = view(codes)[kept]
    counts = kept.sum(-1).reshape(groups, -1)  # per (group, chunk, row)
    if spec.bits == 4:  # each block's codes padded to whole bytes, two a byte, low nibble first
        units = (counts + 1) // 2
        nibbles = torch.zeros(2 * int(units.sum()), dtype=torch.uint8)
        nibbles[_nibble_positions(counts.reshape(-1))] = stored
        stored = nibbles[0::2] | (nibbles[1::2] << 4)
    else:
        units = counts
    mask = torch.from_numpy(np.packbits(kept.reshape(groups, -1).numpy(), axis=-1, bitorder="little"))
    offsets = torch.zeros(groups + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(units.sum(dim=1), 0)
    grid = torch.ones(groups * GROUP, scales.shape[1]), torch.zeros(groups * GROUP, scales.shape[1])
    grid[0][:rows], grid[1][:rows] = scales.float(), zeros.float()
    values = torch.cat([stored, torch.zeros(PAD, dtype=torch.uint8)]).contiguous()
    group_chunks = spec.group_size // 16 if spec.group_size else chunks
    return PackedWeight(mask.contiguous(), values, offsets, rows, cols, spec.bits, *grid, group_chunks)


def quantize(packed: PackedWeight, spec: QuantSpec) -> PackedWeight:
    """``packed``'s float values rounded to ``spec``'s integer codes (round to nearest on each (row, group)'s full
    range, which holds 0, so pruned weights stay exactly 0)."""
    w = packed.dense().float()
    scale, zero = quant_params(w, spec)
    codes = quantize_codes(fake_quantize(w, scale, zero, spec), scale, zero, spec)
    return pack_codes(codes, packed.keep(), scale, zero, spec)
