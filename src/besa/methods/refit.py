"""What refit a run gets: the blockwise weight reconstruction's and the KL stage's settings with the method's defaults
filled in (``Pruner`` inherits ``RefitChoice``; a method overrides the ``*_default`` hooks), and the refit's report
section."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from besa.formats.quant import QuantSpec
from besa.settings.config import PruneConfig
from besa.settings.training import KLSettings
from besa.stages.reconstruct import RefitSpec

__all__ = ["RefitChoice"]

log = logging.getLogger(__name__)


class RefitChoice:
    """The refit settings of a run: ``--refit-*`` where given, else the method's defaults for this run."""

    config: PruneConfig
    quant: QuantSpec | None  # the run's weight quantization (``Pruner.quant``): no refit by default then
    default_refit_epochs: int = 0
    """Epochs of blockwise weight reconstruction when ``--refit-epochs`` is not given (0: none)."""

    def refit_default(self) -> int:
        """Refit epochs when ``--refit-epochs`` is not given (a method may make them depend on the run)."""
        return self.default_refit_epochs

    def refit_target_default(self) -> str:
        """The refit's target when ``--refit-target`` is not given (a method may make it depend on the run)."""
        return "dense-stream"

    def refit_rel_lr_default(self) -> float:
        """The refit's rate relative to each linear's weights when ``--refit-rel-lr`` is not given (0: off)."""
        return 0.0

    def kl_epochs_default(self) -> int:
        """KL epochs when ``--kl-epochs`` is not given (a method may make them depend on the run; 0: no stage)."""
        return 0

    def kl_rel_lr_default(self) -> float:
        """The KL stage's rate relative to each linear's weights when ``--kl-rel-lr`` is not given (0: off)."""
        return 0.0

    def kl_settings(self, streamed: bool = False) -> KLSettings:
        """The KL stage's settings for this run: ``--kl-*`` where given, else the method's defaults. By default a
        run that quantizes (the stage trains full-precision weights) or streams (it trains the whole model at once)
        has no stage, and a warning says so where the method would have run one."""
        kl = self.config.kl
        epochs = kl.epochs
        if epochs is None:
            epochs = self.kl_epochs_default()
            why = "--wbits (it trains full-precision weights)" if self.quant is not None else None
            why = "--stream (it trains the whole model at once)" if streamed else why
            if epochs and why:
                log.warning("the method's default KL stage (%d epoch%s) is left out with %s; --kl-epochs 0 says "
                            "so explicitly", epochs, "s" * (epochs != 1), why)  # fmt: skip
                epochs = 0
        rel_lr = kl.rel_lr if kl.rel_lr is not None else self.kl_rel_lr_default()
        return dataclasses.replace(kl, epochs=epochs, rel_lr=rel_lr)

    def resolved_defaults(self) -> dict[str, Any]:
        """Settings the method decides for this run when they are not given, as the run fingerprint names them
        (``besa.engine.fingerprint.run_fingerprint``): the refit's target and relative rate."""
        return {"config.refit_target": self.refit_target, "config.refit_rel_lr": self.refit_rel_lr}

    @property
    def refit_target(self) -> str:
        """What the refit fits each block to: ``--refit-target``, else the method's default."""
        return self.config.refit.target or self.refit_target_default()

    @property
    def refit_rel_lr(self) -> float:
        """``--refit-rel-lr``, else the method's default."""
        given = self.config.refit.rel_lr
        return given if given is not None else self.refit_rel_lr_default()

    @property
    def refit(self) -> RefitSpec | None:
        """The blockwise weight reconstruction that follows every block's pruning, or ``None``."""
        given = self.config.refit.epochs
        epochs = given if given is not None else (0 if self.quant is not None else self.refit_default())
        if epochs == 0:
            return None
        r = self.config.refit
        return RefitSpec(
            epochs, r.lr, r.batch, r.holdout, anchor=r.anchor, loss=r.loss, rel_lr=self.refit_rel_lr
        )

    def report_refit(self, blocks: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The ``refit`` section of the report (settings, every block's losses), or ``None`` without a refit."""
        spec = self.refit
        if spec is None:
            return None
        losses = (
            "block output MSE / mean square of the target; held_out[0] is before any training, then one per "
            "epoch; the weights of the best held-out epoch are kept; train: each epoch's mean over its batches, "
            "as they trained"
        )
        return {
            **dataclasses.asdict(spec),
            "target": self.refit_target,
            "losses": losses,
            "blocks": blocks,
        }
