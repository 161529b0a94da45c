"""What a run produced, block by block: a method's ``prune_block`` returns a ``BlockResult``; the run keeps them in
one ``RunRecord``, which feeds the checkpoints (JSON and tensors per block), the report and ``--save-quantized``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["QuantGrids", "BlockResult", "RunRecord"]

QuantGrids = tuple[torch.Tensor, torch.Tensor]
"""(scale, zero point) of a quantized layer, each (out, groups)."""


@dataclass
class BlockResult:
    """What pruning one block produced, keyed by the linears' qualified names."""

    rates: dict[str, float] = field(default_factory=dict)
    """Every pruned linear's sparsity rate, the share of its weights the mask zeroes (BESA: the share its learned row
    counts add up to)."""
    grids: dict[str, QuantGrids] = field(default_factory=dict)
    """Every quantized linear's (scale, zero), on the CPU in float32."""
    quant_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every quantized linear's JSON-able facts (mode, learned clipping)."""
    facts: dict[str, Any] | None = None
    """The method's own JSON-able facts about the block (BESA: learned rates, losses, fallbacks)."""
    refit: dict[str, Any] | None = None
    """The blockwise weight reconstruction's facts (losses before/after, held-out loss per epoch), if it ran."""
    left_dense: dict[str, str] = field(default_factory=dict)
    """Linears the run left dense although they were to be pruned, and why (``Pruner.run_block``)."""
    expert_tokens: dict[str, int] = field(default_factory=dict)
    """Every expert linear's count of calibration tokens routed to it."""
    fallback: dict[str, str] = field(default_factory=dict)
    """Expert linears pruned by the fallback rule instead of the method, and why."""

    def merge(self, other: BlockResult) -> None:
        """Take ``other``'s per-linear entries (rates, grids, facts of the fallback) into this result."""
        self.rates.update(other.rates)
        self.grids.update(other.grids)
        self.quant_info.update(other.quant_info)
        self.fallback.update(other.fallback)

    def add_grids(self, name: str, grids: QuantGrids, info: dict[str, Any]) -> None:
        h, z = grids
        self.grids[name] = (h.detach().float().cpu(), z.detach().float().cpu())
        self.quant_info[name] = info


class RunRecord:
    """Every finished block's ``BlockResult``, in pruning order (blocks loaded from a checkpoint included)."""

    def __init__(self) -> None:
        self.blocks: dict[str, BlockResult] = {}

    def add(self, block: str, result: BlockResult) -> None:
        self.blocks[block] = result

    def _merged(self, field: str) -> dict[str, Any]:
        """One per-linear field of every block's result, merged (linear names are unique over the blocks)."""
        return {k: v for r in self.blocks.values() for k, v in getattr(r, field).items()}

    @property
    def rates(self) -> dict[str, float]:
        return self._merged("rates")

    @property
    def grids(self) -> dict[str, QuantGrids]:
        return self._merged("grids")

    @property
    def quant_info(self) -> dict[str, dict[str, Any]]:
        return self._merged("quant_info")

    @property
    def refit(self) -> dict[str, dict[str, Any]]:
        """The refit facts of every block that was refitted."""
        return {b: r.refit for b, r in self.blocks.items() if r.refit is not None}

    @property
    def left_dense(self) -> dict[str, str]:
        """Every linear left dense although it was to be pruned, and why."""
        return self._merged("left_dense")

    @property
    def expert_tokens(self) -> dict[str, int]:
        """Every expert linear's count of routed calibration tokens."""
        return self._merged("expert_tokens")

    @property
    def fallback(self) -> dict[str, str]:
        """Every expert linear pruned by the fallback rule, and why."""
        return self._merged("fallback")

    @property
    def facts(self) -> dict[str, dict[str, Any]]:
        """The method's facts of every block that has some."""
        return {b: r.facts for b, r in self.blocks.items() if r.facts is not None}

    # -- checkpoints: what a block's checkpoint keeps, and taking it back ------------------------------------
    def block_json(self, block: str) -> dict[str, Any]:
        r = self.blocks.get(block, BlockResult())
        return {
            "layer_targets": r.rates,  # the run folder's name for them
            "quant_info": r.quant_info, "facts": r.facts, "refit": r.refit,
            "left_dense": r.left_dense, "expert_tokens": r.expert_tokens, "fallback": r.fallback,
        }  # fmt: skip

    def restore_json(self, block: str, record: dict[str, Any]) -> None:
        r = self.blocks.setdefault(block, BlockResult())
        r.rates.update(record.get("layer_targets", {}))
        r.quant_info.update(record.get("quant_info", {}))
        r.facts = record.get("facts")
        r.refit = record.get("refit")
        r.left_dense.update(record.get("left_dense", {}))
        r.expert_tokens.update(record.get("expert_tokens", {}))
        r.fallback.update(record.get("fallback", {}))

    def block_tensors(self, block: str) -> dict[str, torch.Tensor]:
        r = self.blocks.get(block, BlockResult())
        out = {}
        for name, (h, z) in r.grids.items():
            out[f"{name}::scale"], out[f"{name}::zero"] = h, z
        return out

    def restore_tensors(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        r = self.blocks.setdefault(block, BlockResult())
        for key, value in tensors.items():
            name, kind = key.rsplit("::", 1)
            h, z = r.grids.get(name, (None, None))
            r.grids[name] = (value, z) if kind == "scale" else (h, value)  # type: ignore[assignment]
