"""What a method tells ``besa plan`` (``besa.tools.plan``) about itself: ``Pruner.method_cost`` answers, for the
largest block of the model (``BlockShape``), the working sets the method holds while it prunes a block and the block
forwards of its own (``MethodCost``). The rest of a run's plan (weights, activations, the refit, the KL stage) is
the same for every method and counted by ``besa.tools.plan``.

Sizes are pure sums of tensor sizes; no torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ADAM_COPIES",
    "LSQ_CHUNK",
    "BlockShape",
    "MethodCost",
    "admm_bytes",
    "hessian_bytes",
    "obs_hessians",
]

ADAM_COPIES = 3
"""Adam keeps a gradient and two moments per trained weight (the refit and the KL stage train weights)."""

LSQ_CHUNK = 1024
"""Rows per chunk of ``besa.stages.update.masked_least_squares`` (its default)."""


@dataclass(frozen=True)
class BlockShape:
    """One block as the plan sees it: its linears as (out, in), the groups of linears fed the same input, and the
    number of parameters of the whole block."""

    linears: dict[str, tuple[int, int]]
    groups: list[list[str]]
    params: int

    @property
    def weights(self) -> int:
        """Weights of the block's linears."""
        return sum(o * i for o, i in self.linears.values())

    @property
    def largest(self) -> int:
        """Weights of the block's largest linear."""
        return max(o * i for o, i in self.linears.values())


@dataclass
class MethodCost:
    """What a method adds to a block step: ``work``, the bytes of each tensor it holds while pruning the block
    beyond the block's weights and activations, by the label ``besa plan`` prints (the stages of a step run one
    after the other: the peak counts the largest), and ``forwards``, the block forwards over the calibration set it
    runs beyond the statistics pass and the propagation (a backward counts as two)."""

    work: dict[str, int] = field(default_factory=dict)
    forwards: float = 0.0


def hessian_bytes(
    shapes: dict[str, tuple[int, int]], groups: list[list[str]], sequential: bool, lsq: bool = False
) -> int:
    """SparseGPT/OBS statistics: one (in, in) sum per linear, kept in float64; all at once when parallel, one
    group's at a time when sequential (``groups`` may over-group: then this is an upper bound); plus the largest
    layer's working set: its float32 Hessian and inverse in the sweep, or (``lsq``, after the sweep) the
    least-squares solve's float32 Hessian and its six float32 copies of up to ``LSQ_CHUNK`` rows."""
    per = {n: inp * inp for n, (_o, inp) in shapes.items()}
    held = max(sum(per[n] for n in g) for g in groups) if sequential else sum(per.values())
    sweep = 2 * 4 * max(per.values())
    solve = max(4 * i * i + 6 * 4 * min(o, LSQ_CHUNK) * i for o, i in shapes.values()) if lsq else 0
    return 8 * held + max(sweep, solve)


def obs_hessians(block: BlockShape, sequential: bool, lsq: bool) -> dict[str, int]:
    """The working set of an OBS weight update (``besa.stages.update.obs_sweep``) as a ``MethodCost.work`` entry."""
    label = "Hessians (float64 sums)" + (", one group at a time" if sequential else "")
    return {label: hessian_bytes(block.linears, block.groups, sequential, lsq)}


def admm_bytes(block: BlockShape) -> dict[str, int]:
    """ADMM's iterates (``besa.stages.admm.admm_prune``) as a ``MethodCost.work`` entry: five float32 copies of the
    largest weight (dense, target, iterate, dual, projection) and the normalised Hessian and its Cholesky factor."""
    widest = max(i for _o, i in block.linears.values())
    return {"ADMM iterates (float32)": 5 * 4 * block.largest + 2 * 4 * widest * widest}
