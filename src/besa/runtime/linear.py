"""``SparseLinear``: a pruned linear held in the bitmask layout (``besa.runtime.layout``), never as a dense weight.

A forward of a few tokens (decode) runs the bitmask kernel, which reads only the mask and the kept values; one of
many tokens (prefill) runs whichever is faster at that count, the kernel or the weight unpacked for one dense
product, split at ``crossover`` tokens (measured by ``measure_crossover``). Without the kernels every forward runs
the unpacked dense product: slower, the same numbers up to summation order."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from besa.runtime.kernels import kernels
from besa.runtime.layout import PackedWeight

__all__ = ["SparseLinear", "measure_crossover"]

# One unpacked weight per shape, reused by every linear of that shape: products run one at a time, and a fresh
# buffer of a few MiB would be page-faulted in at every product.
_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}


class SparseLinear(nn.Module):
    """``y = x W^T + b`` for a weight in the bitmask layout; ``crossover``: from this many tokens on, the weight is
    unpacked for one dense product instead (0: always the kernel)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, crossover: int = 0) -> None:
        super().__init__()
        self.packed = packed  # not buffers: ``model.to(dtype)`` must not convert the stored values
        self.in_features, self.out_features = packed.cols, packed.rows
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.crossover = crossover

    def extra_repr(self) -> str:
        kept = self.packed.nnz / max(self.packed.rows * self.packed.cols, 1)
        values = (
            f"int{self.packed.bits}"
            if self.packed.bits
            else str(self.packed.values.dtype).removeprefix("torch.")
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={kept:.3f}, values={values}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = kernels()
        p = self.packed
        if found.available and (self.crossover == 0 or x.numel() < self.crossover * self.in_features):
            return found.module.bitmask_linear(x, *p.kernel_args(), self.bias, found.isa)
        flat = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(flat.dtype)
        y = F.linear(flat, self.unpacked().to(flat.dtype), bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def unpacked(self) -> torch.Tensor:
        """The dense float32 weight, for one product of many tokens (the kernels' unpack, else the layout's own)."""
        found = kernels()
        if not found.available:
            return self.packed.dense().float()
        p = self.packed
        key = (p.rows, p.kpad)
        if _SCRATCH.get(key) is None:
            _SCRATCH[key] = torch.empty(p.rows, p.kpad)
        dense = found.module.bitmask_unpack(*p.kernel_args(), found.isa, _SCRATCH[key])
        return dense if p.kpad == p.cols else dense[:, : p.cols]

    def kernel(self, flat: torch.Tensor, isa: int) -> torch.Tensor:
        """The bitmask kernel on (tokens, in) inputs with instruction set ``isa`` (``besa.runtime.kernels``): float32
        (tokens, out), no bias."""
        p = self.packed
        return kernels().module.bitmask_linear(flat.float(), *p.kernel_args(), None, isa)


def _median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure_crossover(
    layer: SparseLinear,
    counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
    dtype: torch.dtype = torch.float32,
) -> int:
    """The fewest tokens at which unpacking the weight for a dense product beats the kernel on ``layer``, both on
    inputs of ``dtype`` as the model runs them, at torch's current thread count (0: the kernel wins at every count
    tried, or there is no kernel)."""
    found = kernels()
    if not found.available:
        return 0
    args = layer.packed.kernel_args()
    for count in counts:
        x = torch.randn(count, layer.in_features, dtype=dtype)
        sparse = _median_seconds(lambda x=x: found.module.bitmask_linear(x, *args, None, found.isa))
        dense = _median_seconds(lambda x=x: F.linear(x, layer.unpacked().to(dtype)))
        if dense < sparse:
            return count
    return 0
