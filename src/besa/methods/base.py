"""The method interface: a ``Pruner`` supplies the per-block step of the sequential engine."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from besa.config import MethodConfig, NMPattern, PruneConfig
from besa.modeling import set_weight_matrix, weight_matrix
from besa.pipeline import BlockWork
from besa.quant import QuantSpec, fake_quantize, quant_params
from besa.stages.allocation import Allocation, make_allocation
from besa.stages.selection import LayerStats

__all__ = ["Pruner", "LayerwisePruner", "LayerStats", "QuantGrids", "apply_prune_mask"]

QuantGrids = tuple[torch.Tensor, torch.Tensor]
"""(scale, zero point) of a quantized layer, each (out, groups)."""


class Pruner(ABC):
    """Base class of every pruning method; subclasses are registered with ``besa.registry.register_method``.

    A method prunes each block to the rate its ``allocation`` (``--allocation``) gives that block.
    ``uses_data = False`` (and an allocation that needs none) lets the engine skip the calibration data and the
    block forwards entirely.
    """

    uses_data: bool = True

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration windows (the method's statistics or the allocation's)."""
        return self.uses_data or self.allocation.needs_data

    @property
    def needs_dense_stream(self) -> bool:
        """Whether the engine must also carry the dense model's own activations (``BlockWork.dense_outputs``)."""
        return False

    def __init__(self, method_config: MethodConfig, config: PruneConfig) -> None:
        self.method_config = method_config
        self.config = config
        self.allocation: Allocation = make_allocation(
            config.allocation, self.sparsity, owl_m=config.owl_m, owl_lambda=config.owl_lambda
        )
        self.layer_targets: dict[str, float] = {}
        self.quant_grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """Per quantized linear (qualified name): its step and zero point, each (out, groups), on the CPU."""
        self.quant_info: dict[str, dict] = {}
        """Per quantized linear: JSON-able facts (learned clipping, mode) for the report."""

    @property
    def quant(self) -> QuantSpec | None:
        """The weight quantization of this run, or ``None`` (``wbits=16``)."""
        return self.config.quant

    def quantize_rtn(self, name: str, layer: nn.Module) -> None:
        """Round-to-nearest onto grids fitted to the layer's (pruned) weights; pruned zeros stay exactly zero."""
        spec = self.quant
        assert spec is not None
        w = weight_matrix(layer)
        h, z = quant_params(w, spec)
        set_weight_matrix(layer, fake_quantize(w, h, z, spec))
        self.record_grids(name, (h, z), {"mode": "rtn after pruning"})

    def record_grids(self, name: str, grids: QuantGrids, info: dict) -> None:
        """Keep a quantized layer's (scale, zero) for the checkpoint, the report and ``--save-quantized``."""
        h, z = grids
        self.quant_grids[name] = (h.detach().float().cpu(), z.detach().float().cpu())
        self.quant_info[name] = info

    def finish_layer(self, name: str, layer: nn.Module, grids: QuantGrids | None, mode: str) -> None:
        """After a layer is pruned: keep the grids it was quantized on, or round it to nearest now."""
        if self.quant is None:
            return
        if grids is None:
            self.quantize_rtn(name, layer)
        else:
            self.record_grids(name, grids, {"mode": mode})

    @property
    def sparsity(self) -> float:
        assert self.config.sparsity is not None
        return self.config.sparsity

    @property
    def pattern(self) -> NMPattern | None:
        return self.config.nm

    def prepare(self, model: nn.Module, calib_ids: torch.Tensor | None, device: torch.device, forward_batch: int,
                progress: bool) -> None:  # fmt: skip
        """Before the first block: let the allocation look at the dense model (OWL's statistics pass)."""
        if self.allocation.needs_data:
            assert calib_ids is not None
            self.allocation.prepare(model, calib_ids, device, forward_batch, progress)

    @abstractmethod
    def prune_block(self, work: BlockWork) -> None:
        """Prune the linears of ``work.module`` in place (weights of pruned positions set to exactly zero)."""

    def report_extra(self) -> dict:
        """Method-specific facts for ``besa_report.json`` (learned allocations, fallbacks, ...)."""
        return {}

    def report_allocation(self) -> dict:
        """The ``allocation`` section of the report: the allocation's name, options and block rates."""
        return self.allocation.report()

    def block_record(self, block_name: str) -> dict:
        """JSON-able facts about a finished block, kept in its checkpoint so a resumed run reports them too."""
        prefix = f"{block_name}."
        return {
            "layer_targets": {k: v for k, v in self.layer_targets.items() if k.startswith(prefix)},
            "quant_info": {k: v for k, v in self.quant_info.items() if k.startswith(prefix)},
        }

    def restore_block(self, block_name: str, record: dict) -> None:
        """Take back what ``block_record`` gave for a block loaded from a checkpoint."""
        self.layer_targets.update(record.get("layer_targets", {}))
        self.quant_info.update(record.get("quant_info", {}))

    def block_tensors(self, block_name: str) -> dict[str, torch.Tensor]:
        """Tensors about a finished block (the quantization grids) that its checkpoint must keep."""
        prefix = f"{block_name}."
        out = {}
        for name, (h, z) in self.quant_grids.items():
            if name.startswith(prefix):
                out[f"{name}::scale"], out[f"{name}::zero"] = h, z
        return out

    def restore_block_tensors(self, block_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``block_tensors`` gave."""
        for key, value in tensors.items():
            name, kind = key.rsplit("::", 1)
            h, z = self.quant_grids.get(name, (None, None))
            self.quant_grids[name] = (value, z) if kind == "scale" else (h, value)

    def report_quantization(self) -> dict | None:
        """The ``quantization`` section of the report, or ``None`` without quantization."""
        spec = self.quant
        if spec is None:
            return None
        return {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "scheme": "asymmetric uniform, weight-only; w = (code - zero) * scale per (row, group); 0 is on every grid",
            "layers": self.quant_info,
        }


class LayerwisePruner(Pruner):
    """A method that prunes each linear on its own from statistics of its inputs on the dense block.

    One calibration pass over the block feeds every layer's ``LayerStats``; then ``prune_layer`` runs per layer,
    followed by round-to-nearest quantization when the run quantizes and the method did not do it itself.
    """

    def make_stats(self, layer: nn.Module) -> LayerStats | None:
        """Statistics this method needs for ``layer``, or ``None`` if it needs no calibration data."""
        return None

    @abstractmethod
    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> QuantGrids | None:
        """Zero a ``rate`` share of the weights of ``layer`` (and update the others, if the method does).

        A method that also quantized the layer (``self.quant``) returns its (scale, zero) grids; ``None`` lets the
        engine round the pruned weights to nearest.
        """

    def prune_block(self, work: BlockWork) -> None:
        rate = self.allocation.block_rate(work.name)
        stats = {name: self.make_stats(layer) for name, layer in work.linears.items()}
        if any(s is not None for s in stats.values()):
            work.calibrate(stats)
        for name, layer in work.linears.items():
            grids = self.prune_layer(layer, stats.pop(name), rate)
            self.layer_targets[f"{work.name}.{name}"] = rate
            self.finish_layer(f"{work.name}.{name}", layer, grids, f"{self.config.method} joint")


def apply_prune_mask(layer: nn.Module, prune: torch.Tensor) -> None:
    """Set the weights of ``layer`` where ``prune`` (out, in) is True to exactly zero."""
    weight_matrix(layer).masked_fill_(prune.to(layer.weight.device), 0)
