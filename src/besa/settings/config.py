"""What a pruning run computes: ``PruneConfig``, made of the small typed sections of ``besa.settings.sections``,
and ``MethodConfig``, the base of every method's own settings.

The same dataclasses drive the Python API, the CLI (``besa.cli`` makes one flat flag per setting from the fields'
``help`` metadata, ``besa.settings.flat``) and the ``config`` section of ``besa_report.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from besa.errors import BesaError
from besa.settings.flat import flat_fields, from_flat, section, to_flat
from besa.settings.sections import (
    AllocationSettings,
    CalibrationSettings,
    ExpertSettings,
    QuantSettings,
    RuntimeSettings,
)
from besa.settings.training import KLSettings, RefitSettings
from besa.settings.values import NMPattern, check_choice, parse_pattern

__all__ = ["MethodConfig", "PruneConfig"]


@dataclass
class MethodConfig:
    """Base of every method's own settings. Subclasses are registered with ``besa.registry.register_method``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PruneConfig:
    """Settings shared by every pruning method: the method, how much it prunes, and its sections.

    Args:
        method: registered method name (``magnitude``, ``wanda``, ``sparsegpt``, ...).
        sparsity: fraction of weights set to zero in every pruned linear, in [0, 1). With an N:M pattern it
            defaults to N/M and must equal it if given.
        pattern: ``None`` for unstructured sparsity, or ``"N:M"``.
        within_block: how a layerwise method (Wanda, SparseGPT) or BESA's OBS update gathers its layers'
            statistics inside a block: ``parallel``, all from one pass over the dense block (as the papers do);
            ``sequential``, group by group in calling order (q/k/v, then o, gate/up, down), each after the groups
            before it are pruned (GPTQ's "true sequential"); ``None`` is the method's own default
            (``Pruner.default_within_block``).
        rotate: ``none``, or ``pca``: before pruning, the residual stream is turned by the principal axes of the
            calibration windows' stream, folded into the weights (``besa.stages.rotation``).
        calibration, runtime, quantization, allocation, experts, refit, kl: the sections.

    Build one from flat names (flags, recipe keys, ``besa.prune`` keywords) with ``PruneConfig.from_flat``; its
    ``to_dict`` is flat too.
    """

    method: str = field(default="wanda", metadata={"help": "pruning method"})
    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "target fraction of zeros per pruned linear, in [0, 1) (default: 0.5, or N/M with --pattern)"
        },
    )
    pattern: str | None = field(
        default=None, metadata={"help": "N:M semi-structured pattern, e.g. 2:4 or 4:8"}
    )
    calibration: CalibrationSettings = section(CalibrationSettings)
    runtime: RuntimeSettings = section(RuntimeSettings)
    quantization: QuantSettings = section(QuantSettings)
    allocation: AllocationSettings = section(AllocationSettings)
    experts: ExpertSettings = section(ExpertSettings)
    within_block: str | None = field(
        default=None,
        metadata={
            "help": "wanda, sparsegpt and BESA's OBS update: parallel (every layer's statistics from the dense block "
            "in one pass) or sequential (each group of layers sees the inputs left by the groups pruned before it); "
            "default: the method's own, sequential for sparsegpt, parallel for the others"
        },
    )
    rotate: str = field(
        default="none",
        metadata={
            "help": "before pruning, turn the residual stream by an orthogonal matrix folded into the weights: "
            "none, or pca (the principal axes of the calibration windows' stream; pre-norm models only)"
        },
    )
    refit: RefitSettings = section(RefitSettings)
    kl: KLSettings = section(KLSettings)

    def __post_init__(self) -> None:
        nm = parse_pattern(self.pattern)
        if nm is not None:
            if self.sparsity is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
                raise BesaError(
                    f"--sparsity {self.sparsity} contradicts --pattern {nm} (which means {nm.sparsity:g})"
                )
            self.sparsity = nm.sparsity
            self.pattern = str(nm)
        check_choice("rotate", self.rotate)
        if self.sparsity is None:
            self.sparsity = 0.5
        if not 0.0 <= self.sparsity < 1.0:
            raise BesaError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation.policy == "owl":
            if nm is not None:
                raise BesaError("--allocation owl varies the rate per block; an N:M --pattern fixes it")
            room = min(self.sparsity, 1 - self.sparsity) / 2  # the rates stay within target +- 2 lambda
            if not 0 <= self.allocation.owl_lambda <= room:
                raise BesaError(
                    f"--owl-lambda must be in [0, {room:.4g}] so every block's rate stays in [0, 1]"
                )
            if self.allocation.owl_m <= 0:
                raise BesaError(f"--owl-m must be positive, got {self.allocation.owl_m}")
        check_choice("within-block", self.within_block)
        if self.kl.epochs and self.quantization.wbits != 16:
            raise BesaError(
                "--kl-epochs trains full-precision weights: it cannot follow --wbits quantization"
            )

    @classmethod
    def from_flat(cls, **settings: Any) -> PruneConfig:
        """A config from flat names (``nsamples=64, refit_epochs=2``); an unknown name is a ``BesaError``."""
        known = {name for name, _ in cls.settings()}
        for key in settings:
            if key not in known:
                raise BesaError(f"unknown setting {key!r}")
        return from_flat(cls, settings)

    @classmethod
    def settings(cls) -> list[tuple[str, dataclasses.Field]]:
        """Every setting as (flat name, field), in order: the flags and recipe keys."""
        return flat_fields(cls)

    @property
    def nm(self) -> NMPattern | None:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat name (the report's ``config``, the recipe's ``prune``, the fingerprint)."""
        return to_flat(self)
