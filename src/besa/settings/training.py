"""The settings of the training stages after each block's pruning: the blockwise refit of the surviving weights
(``PruneConfig.refit``, ``besa.stages.reconstruct``) and the end-to-end KL stage (``PruneConfig.kl``,
``besa.stages.distill``). Each a small typed dataclass that checks its own values."""

from __future__ import annotations

from dataclasses import dataclass, field

from besa.errors import BesaError
from besa.settings.flat import Section
from besa.settings.values import check_choice

__all__ = ["KLSettings", "RefitSettings"]


@dataclass
class RefitSettings(Section):
    """Blockwise weight reconstruction after each block is pruned (``besa.stages.reconstruct``): the surviving
    weights of the block's linears are trained with Adam (``lr``, ``batch`` windows per step), masks fixed, to
    reproduce the ``target`` outputs for ``epochs`` (0: off; ``None``: the method's default,
    ``Pruner.refit_default``; a ``target`` of ``None`` likewise, ``Pruner.refit_target_default``); the last
    ``holdout`` windows, never trained on, decide when to stop.

    ``anchor`` > 0 adds a penalty on how far the weights move from where the refit starts. ``loss``: a name in
    ``besa.stages.reconstruct.LOSSES``, ``mse`` (the whole output's error) or ``token``.
    ``rel_lr`` > 0: each linear's rate is this fraction of its surviving weights' RMS (``None``: the method's own).

    ``target``: ``dense-stream`` (the block fed the pruned model's stream must give the dense model's output),
    ``dense`` (fed the dense stream, give the dense output) or ``pruned-input`` (fed the pruned stream, give what
    the dense block gives on it).
    """

    prefix = "refit_"

    epochs: int | None = field(
        default=None,
        metadata={
            "help": "train each pruned block's surviving weights to reconstruct its outputs for this many epochs "
            "(0: off; default: the method's own: BESA 2, the baselines 0)"
        },
    )
    lr: float = field(default=3e-4, metadata={"help": "refit: Adam learning rate"})
    target: str | None = field(
        default=None,
        metadata={
            "help": "refit: dense-stream (pruned stream in, dense model's block output out), dense (dense stream "
            "in and out) or pruned-input (pruned stream in, the dense block's output on it out); default: the "
            "method's own: BESA dense-stream below 70%% sparsity and pruned-input from 70%%, the baselines "
            "dense-stream"
        },
    )
    batch: int = field(default=4, metadata={"help": "refit: calibration windows per Adam step"})
    holdout: int = field(
        default=4, metadata={"help": "refit: last calibration windows held out for early stopping"}
    )
    anchor: float = field(
        default=0.0,
        metadata={
            "help": "refit: weight of a penalty on the surviving weights' move away from where the refit starts "
            "(squared change over squared norm; 0: off)"
        },
    )
    rel_lr: float | None = field(
        default=None,
        metadata={
            "help": "refit: Adam rate per linear, a fraction of its surviving weights' RMS (0: off; default: "
            "the method's own: BESA 1.2e-3 from 70% sparsity and for N:M patterns, 0 otherwise)"
        },
    )
    loss: str = field(
        default="mse",
        metadata={
            "help": "refit: mse (squared error over the whole block output, "
            "relative to its mean square) or token (each token's, relative to its own squared norm)"
        },
    )

    def __post_init__(self) -> None:
        check_choice("refit-loss", self.loss)
        if self.anchor < 0 or (self.rel_lr or 0.0) < 0:
            raise BesaError("--refit-anchor and --refit-rel-lr must be 0 or more")
        if self.epochs is not None and self.epochs < 0:
            raise BesaError(f"--refit-epochs must be 0 or more, got {self.epochs}")
        if self.target is not None:
            check_choice("refit-target", self.target)
        if not self.lr > 0 or self.batch < 1 or self.holdout < 0:
            raise BesaError(
                "--refit-lr must be positive, --refit-batch at least 1, --refit-holdout 0 or more"
            )


@dataclass
class KLSettings(Section):
    """The optional last stage (``besa.stages.distill``): with every mask fixed, the whole pruned model's surviving
    weights are trained (Adam at ``lr``, or with ``rel_lr`` > 0 at that fraction of each linear's surviving RMS;
    ``batch`` windows per step) toward the dense model's next-token distribution (its ``topk`` most likely tokens
    per position) on the calibration windows for ``epochs`` (0: off); the last ``holdout`` windows decide when to
    stop. It runs after the checkpointed blocks, so no run folder records it. ``epochs`` or ``rel_lr`` of ``None``:
    the method's default (``Pruner.kl_settings``)."""

    prefix = "kl_"

    epochs: int | None = field(
        default=None,
        metadata={
            "help": "last stage, masks fixed: train the whole pruned model's surviving weights toward the dense "
            "model's next-token distribution on the calibration windows (KL) for this many epochs (0: off; "
            "default: the method's own: BESA 1 for N:M patterns, 0 otherwise and with --stream or --wbits)"
        },
    )
    lr: float = field(default=1e-5, metadata={"help": "KL stage: Adam learning rate"})
    rel_lr: float | None = field(
        default=None,
        metadata={
            "help": "KL stage: Adam rate per linear, a fraction of its surviving weights' RMS, instead of --kl-lr "
            "(0: off; default: the method's own: BESA 4e-4 for N:M patterns, 0 otherwise)"
        },
    )
    topk: int = field(
        default=64, metadata={"help": "KL stage: the dense model's most likely tokens kept per position"}
    )
    batch: int = field(default=4, metadata={"help": "KL stage: calibration windows per Adam step"})
    holdout: int = field(
        default=4, metadata={"help": "KL stage: last calibration windows held out for early stopping"}
    )

    def __post_init__(self) -> None:
        bad = not self.lr > 0 or not (self.rel_lr or 0.0) >= 0 or self.topk < 1 or self.batch < 1
        if (self.epochs or 0) < 0 or self.holdout < 0 or bad:
            raise BesaError(
                "--kl-epochs must be 0 or more, --kl-lr positive, --kl-rel-lr 0 or more, --kl-topk and --kl-batch "
                "at least 1, --kl-holdout 0 or more"
            )
