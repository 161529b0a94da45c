"""``SparseLinear``: a pruned linear held in the bitmask layout (``besa.runtime.layout``), never as a dense weight.

A forward runs one of three paths, by how many tokens it multiplies (its ``plan``, measured by ``measure_plan``):

- ``kernel``: the bitmask kernel, which reads only the mask and the kept values once for up to 8 tokens (decode);
- ``spmm``: the prefill kernel (AVX-512 CPUs), a multiply-add per kept weight and token where the dense product
  does one per weight: faster than dense from some sparsity and token count on;
- ``dense``: the weight unpacked into a reused buffer for one dense product.

Without the kernels every forward runs the unpacked dense product: slower, the same numbers up to summation order."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from besa.runtime.kernels import kernels
from besa.runtime.layout import PackedWeight

__all__ = ["PATHS", "Plan", "SparseLinear", "measure_crossover", "measure_plan"]

PATHS = ("kernel", "spmm", "dense")
SPMM_ISA = 2
"""The instruction set (``besa.runtime.kernels.ISA_NAMES``) from which the prefill kernel runs: AVX-512."""

Plan = tuple[tuple[int, str], ...]
"""``((from_tokens, path), ...)``, ascending: a forward of ``tokens`` runs the path of the last entry with
``from_tokens <= tokens``, and ``kernel`` below the first."""

# One unpacked weight per shape, reused by every linear of that shape: products run one at a time, and a fresh
# buffer of a few MiB would be page-faulted in at every product.
_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}


class SparseLinear(nn.Module):
    """``y = x W^T + b`` for a weight in the bitmask layout, each forward on the path its ``plan`` names for its
    token count. The constructor's ``crossover`` sets the plan "from this many tokens on, the weight unpacked for one
    dense product" (0: the kernel always); ``besa.load_sparse`` measures a plan instead."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, crossover: int = 0) -> None:
        super().__init__()
        self.packed = packed  # not buffers: ``model.to(dtype)`` must not convert the stored values
        self.in_features, self.out_features = packed.cols, packed.rows
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.plan: Plan = ()
        self.crossover = crossover

    @property
    def crossover(self) -> int:
        """Where the plan's first entry starts (0: an empty plan, the kernel at every count)."""
        return self.plan[0][0] if self.plan else 0

    @crossover.setter
    def crossover(self, tokens: int) -> None:
        self.plan = ((tokens, "dense"),) if tokens else ()

    def extra_repr(self) -> str:
        kept = self.packed.nnz / max(self.packed.rows * self.packed.cols, 1)
        values = (
            f"int{self.packed.bits}"
            if self.packed.bits
            else str(self.packed.values.dtype).removeprefix("torch.")
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={kept:.3f}, values={values}"

    def path(self, tokens: int) -> str:
        """The path a forward of ``tokens`` tokens runs (``dense`` without the kernels)."""
        found = kernels()
        if not found.available:
            return "dense"
        chosen = "kernel"
        for start, name in self.plan:
            if tokens < start:
                break
            chosen = name
        return "dense" if chosen == "spmm" and found.isa < SPMM_ISA else chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = kernels()
        p = self.packed
        if found.available and (not self.plan or x.numel() < self.plan[0][0] * self.in_features):
            return found.module.bitmask_linear(x, *p.kernel_args(), self.bias, found.isa)
        route = self.path(x.numel() // self.in_features)
        if route != "dense":
            call = found.module.bitmask_spmm if route == "spmm" else found.module.bitmask_linear
            return call(x, *p.kernel_args(), self.bias, found.isa)
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

    def spmm(self, flat: torch.Tensor, isa: int) -> torch.Tensor:
        """The prefill kernel on (tokens, in) inputs (``isa`` AVX-512 or better): float32 (tokens, out), no bias."""
        p = self.packed
        return kernels().module.bitmask_spmm(flat.float(), *p.kernel_args(), None, isa)


def _median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def fastest_paths(timings: dict[int, dict[str, float]]) -> Plan:
    """The plan of measured seconds ``{tokens: {path: seconds}}``: at each count the fastest path (the first of
    ``PATHS`` on a tie), from that count to the next; the kernel's leading counts left implicit."""
    plan: list[tuple[int, str]] = []
    for tokens in sorted(timings):
        seconds = timings[tokens]
        best = min((p for p in PATHS if p in seconds), key=lambda p: (seconds[p], PATHS.index(p)))
        if (plan[-1][1] if plan else "kernel") != best:
            plan.append((tokens, best))
    return tuple(plan)


def _timings(layer: SparseLinear, count: int, dtype: torch.dtype, paths: tuple[str, ...]) -> dict[str, float]:
    """Median seconds of each of ``paths`` on ``count`` random tokens of ``dtype`` through ``layer``."""
    found = kernels()
    args = layer.packed.kernel_args()
    x = torch.randn(count, layer.in_features, dtype=dtype)
    calls = {"kernel": found.module.bitmask_linear, "spmm": getattr(found.module, "bitmask_spmm", None)}
    seconds = {}
    for name in paths:
        if name == "dense":
            seconds[name] = _median_seconds(lambda: F.linear(x, layer.unpacked().to(dtype)))
        else:
            seconds[name] = _median_seconds(lambda call=calls[name]: call(x, *args, None, found.isa))
    return seconds


@torch.no_grad()
def measure_plan(
    layer: SparseLinear,
    counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
    dtype: torch.dtype = torch.float32,
) -> Plan:
    """``layer``'s plan: every path this CPU runs timed at each of ``counts`` tokens, on inputs of ``dtype`` as the
    model runs them, at torch's current thread count (``()``, the kernel everywhere, without the kernels)."""
    found = kernels()
    if not found.available:
        return ()
    paths = PATHS if found.isa >= SPMM_ISA else ("kernel", "dense")
    return fastest_paths({count: _timings(layer, count, dtype, paths) for count in counts})


def measure_crossover(
    layer: SparseLinear,
    counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
    dtype: torch.dtype = torch.float32,
) -> int:
    """The fewest tokens at which another path beats the kernel on ``layer`` (``measure_plan``; 0: the kernel wins
    at every count tried, or there is no kernel)."""
    plan = measure_plan(layer, counts, dtype)
    return plan[0][0] if plan else 0
