"""BESA's settings (``--method besa``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from besa.errors import BesaError
from besa.settings.config import MethodConfig

__all__ = [
    "BesaConfig", "METRICS", "REFIT_EPOCHS", "NM_REFIT_EPOCHS", "NM_KL_EPOCHS", "KL_REL_LR", "REFIT_REL_LR", "REL_LR_FROM", "PRUNED_INPUT_FROM",
    "ADMM_FROM", "NM_EPOCHS",
    "refit_target_at", "refit_rel_lr_at", "weight_update_at",
]  # fmt: skip

METRICS = ("wanda", "magnitude", "sparsegpt", "admm")
"""The importances BESA can rank by: those of the selection stage (``besa.stages.selection.SCORERS``), and ``admm``,
the saliency ADMM with gradual pruning chose its own mask by at the block's target (``besa.stages.admm``)."""

REFIT_EPOCHS = 2
"""BESA's refit epochs (8 scored better at 50% but cost over 5 x SparseGPT's time)."""
NM_REFIT_EPOCHS = 2
"""BESA's refit epochs with ``--pattern N:M``: the pruned-input refit after ADMM's patterns and solve, at the rate
``REFIT_REL_LR``. At 2:4 on SmolLM2's PTB valid (tuning protocol) it scored 206.11 against 222.81 for ADMM alone,
and on the held-out Gemma-3-270M it leads ADMM alone on every text (WikiText-2 / PTB / Python docs excess ratios 0.75
/ 0.76 / 0.81 against 0.84 / 0.88 / 0.86; BENCHMARKS.md, section ``unseen``). The absolute rate scored better on
SmolLM2 (197.61) but lost to SparseGPT on Gemma (1.02 / 0.96 / 1.13). ``--refit-epochs 0`` turns it off."""
NM_KL_EPOCHS = 1
"""BESA's KL epochs with ``--pattern N:M`` (``besa.stages.distill``: after the blocks, masks fixed, the whole pruned
model's kept weights trained toward the dense model's next-token distribution), at the rate ``KL_REL_LR``. At 2:4 on
SmolLM2's PTB valid (tuning protocol) two epochs scored 166.03 against 206.11 without the stage, the largest step any
stage made there; one epoch is their first (held-out KL 0.761 -> 0.652, then 0.630), and two cost 5.97x SparseGPT's
prune time on the benchmark protocol, over issue 37's 5x. One epoch on the benchmark protocol (run21): WikiText-2 /
PTB test excess ratios 0.52 / 0.49 at 2:4 and 0.50 / 0.55 at 4:8 against 0.69 / 0.69 and 0.66 / 0.73 without it, at
4.37x / 4.34x SparseGPT's prune time and peaks of 1793 / 1834 MiB; on the
held-out Gemma-3-270M at 2:4 0.54 / 0.64 / 0.62 (WikiText-2 / PTB / Python docs) against 0.75 / 0.76 / 0.81
(benchmarks/NOTES.md, issue 37). Not run by default with ``--stream`` or ``--wbits`` (``Pruner.kl_settings``)."""
KL_REL_LR = 4e-4
"""BESA's KL rate relative to each linear's kept weights' RMS (``--kl-rel-lr``) for N:M patterns: SmolLM2's 1e-4 over
its median kept RMS at 2:4 (0.25), so that it carries to models whose weights are smaller (Gemma-3-270M's are five
times so). On SmolLM2's PTB valid at 2:4 it scored 166.03 against 164.90 for the absolute 1e-4."""
REFIT_REL_LR = 1.2e-3
"""BESA's refit rate relative to each linear's surviving weights' RMS (``--refit-rel-lr``) for N:M patterns and from
``REL_LR_FROM``: SmolLM2's 3e-4 over its median surviving RMS at 2:4 (0.25). Gemma-3-270M's kept weights are five
times smaller (RMS 0.052), so the absolute 3e-4 overshot there: the held-out loss rose after the first epoch in 16 of
18 blocks (benchmarks/NOTES.md, issue 37)."""
REL_LR_FROM = 0.7
"""Target sparsity from which BESA's refit (toward the dense block on its pruned input, ``PRUNED_INPUT_FROM``) runs at
the relative rate ``REFIT_REL_LR`` instead of the absolute ``--refit-lr``. On SmolLM2's PTB valid (tuning protocol)
at 80% 943.97 against 1004.37; at 70% 348.98 against 349.44 and 361.67 against 361.73 on a second calibration seed (a
tie: there 1.2e-3 of the surviving RMS is close to 3e-4 by construction). On the held-out Gemma-3-270M at 70% it leads
the absolute rate on every text (WikiText-2 / PTB / Python docs excess ratios 0.41 / 0.53 / 0.42 against 0.43 / 0.54
/ 0.47; BENCHMARKS.md, section ``unseen``). Below it the refit keeps the absolute rate until the relative one is
measured there."""
PRUNED_INPUT_FROM = 0.7
"""Target sparsity from which BESA's refit fits each block to the dense block's function on its own (pruned) input
(``pruned-input``) instead of to the dense model's output (``dense-stream``). Undoing the errors of the blocks before
fits the calibration text: from 70% on PTB valid the dense-stream refit lost to no refit on three calibration seeds
and the pruned-input refit won on all three (benchmarks/NOTES.md, issue 37)."""


def refit_target_at(sparsity: float, nm: bool) -> str:
    """BESA's refit target when ``--refit-target`` is not given, for a run at ``sparsity``: ``pruned-input`` from
    ``PRUNED_INPUT_FROM`` and for every N:M pattern (``NM_REFIT_EPOCHS``), ``dense-stream`` otherwise."""
    return "pruned-input" if nm or sparsity >= PRUNED_INPUT_FROM - 1e-9 else "dense-stream"


def refit_rel_lr_at(sparsity: float, nm: bool) -> float:
    """BESA's refit rate relative to each linear's weights when ``--refit-rel-lr`` is not given, for a run at
    ``sparsity``: ``REFIT_REL_LR`` from ``REL_LR_FROM`` and for every N:M pattern, 0 (the absolute ``--refit-lr``)
    otherwise."""
    return REFIT_REL_LR if nm or sparsity >= REL_LR_FROM - 1e-9 else 0.0


ADMM_FROM = 0.7
"""Target sparsity from which BESA's default weight update (unstructured, not quantizing jointly) is ADMM with gradual
pruning inside the learned row counts instead of the OBS sweep: at 70% on PTB valid (tuning protocol, with the
pruned-input refit) 349.44 against 410.18 (benchmarks/NOTES.md, issue 37). Below it the OBS sweep stays the default
until ADMM is measured further there. N:M patterns are ADMM's too (``NM_EPOCHS``)."""


def weight_update_at(sparsity: float, nm: bool, joint_quant: bool) -> str:
    """BESA's weight update when ``--weight-update`` is not given, for runs that do not quantize jointly (ADMM's
    iterations have no grid): ``admm`` for N:M patterns and for unstructured runs from ``ADMM_FROM``; ``obs``
    otherwise."""
    return "admm" if not joint_quant and (nm or sparsity >= ADMM_FROM - 1e-9) else "obs"


NM_EPOCHS = 0
"""BESA's learning epochs with ``--pattern N:M`` when ``--epochs`` is not given: none. At 2:4 on PTB valid (32 x 512,
seed 0, the pruned-input refit after each) ADMM's own patterns and solve score 197.61; BESA's pattern learning started
from them 214.92, and from the OBS saliency 231.28 (benchmarks/NOTES.md, issue 37): learning scores the patterns on
the frozen weights and moves away from a mask ADMM chose with the update in view. So by default an N:M run keeps
ADMM's patterns (the weight update's own choice); ``--epochs 1`` learns them."""


@dataclass
class BesaConfig(MethodConfig):
    """BESA settings.

    Args:
        metric: importance used to rank the weights of each row once per block: wanda, magnitude, sparsegpt
            (SparseGPT's OBS saliency), admm (the saliency ADMM's own mask at the block's target or N:M pattern
            is chosen by, so the learning starts from ADMM's mask), or ``auto`` (the default): ``admm`` with
            ``--pattern N:M`` (learned from it with ``--epochs 1``, 2:4 scored 214.92 on PTB valid against 231.28
            from the OBS saliency), ``wanda`` otherwise (measured on PTB valid: benchmarks/NOTES.md).
        granularity: ``row`` (one learned rate per output row, the paper's setting) or ``layer``.
        candidates: number of candidate pruning rates D.
        rate_window: candidates span [target - w, target + w] (clipped to [0, max_rate]); bounds how far one
            row's or layer's rate may move from the target, so no row is emptied.
        max_rate: highest pruning rate any row may reach.
        lam: weight of the sparsity penalty lam * (expected block sparsity - target)^2.
        target: ``pruned-input`` (dense block on the pruned model's input, the paper's main setting) or
            ``dense-stream`` (the dense model's own block output).
        optimizer: ``adamw`` (default: measured best on PTB valid) or ``prodigy`` (prodigyopt, the paper's).
        lr: learning rate (AdamW: 0.05, Prodigy: 1.0 when not given); 0 learns nothing (the metric's own
            allocation or N:M mask, the control that isolates what the learning is worth).
        d_coef: Prodigy's coefficient on its estimated step size.
        epochs: passes over the calibration windows per block; 0 learns nothing: every layer is pruned at the
            block's rate (or to the N:M pattern) by the weight update's own choice (``obs``: SparseGPT's sweep,
            ``admm``: ADMM's gradual pruning) or by the metric's ranking (``none``). ``None`` (not given): 1, and
            ``NM_EPOCHS`` (0) with ``--pattern N:M``.
        batch_size: calibration sequences per optimizer step (the stored activations are re-cut to this size;
            the calibration and propagation passes use the engine's ``forward_batch``).
        clip_lr: AdamW learning rate of the clipping logits when they are learned (``--wbits`` with joint mode),
            whatever ``optimizer`` trains the sparsity logits (0.01 chosen on PTB valid at 4 bits).
        weight_update: ``none`` keeps the surviving weights as they are (the paper). ``obs`` keeps the learned
            number of pruned weights of every row but lets SparseGPT's OBS sweep choose them within the row and
            update the survivors to compensate (an extension, not in the paper). With ``--wbits`` and
            ``--quant-mode joint`` the clipping is learned with the allocation as usual, and the OBS sweep quantizes
            on grids clipped by it. ``obs`` is the default (measured better on PTB valid at 4 and 3 bits, at 70%, and
            with the refit at 50%: benchmarks/NOTES.md); ``auto`` is kept for older recipes and means ``obs``.
            ``admm`` keeps the learned counts too but chooses the weights within each row by ADMM with gradual
            pruning, which solves the survivors as it goes (``besa.stages.admm``; not with ``--quant-mode joint``).
            ``None`` (not given): ``admm`` for N:M and for unstructured runs from 70%, without joint
            quantization, ``obs`` otherwise (``weight_update_at``).
        lsq_iters: with the OBS or ADMM update, conjugate-gradient steps that then solve each layer's kept weights for its
            final mask in least squares (``besa.stages.update.masked_least_squares``; 0: the sweep's own weights).
            Not with ``--wbits`` in joint mode (the sweep's weights are on their grids).
        nm_sharpness: with ``--pattern N:M`` BESA learns, for every group of M weights, a distribution over the
            C(M, N) ways to keep M - N of them, started at ``softmax(nm_sharpness * sum of the kept log-scores)``
            of the ranking metric (higher: closer to the metric's own mask, slower to move away from it).
        retries: after a NaN/inf loss the block is trained again from the start with a 10x smaller step, up to
            this many times; then it falls back to the metric's uniform mask (recorded in the report).
    """

    metric: str = field(
        default="auto",
        metadata={"help": "BESA: importance ranking: wanda, magnitude, sparsegpt, admm, auto (admm for N:M)"},
    )
    granularity: str = field(default="row", metadata={"help": "BESA: learn a rate per row or per layer"})
    candidates: int = field(default=100, metadata={"help": "BESA: number of candidate pruning rates"})
    rate_window: float = field(default=0.2, metadata={"help": "BESA: candidate rates span target +- this"})
    max_rate: float = field(default=0.99, metadata={"help": "BESA: highest pruning rate of any row"})
    lam: float = field(default=20.0, metadata={"help": "BESA: weight of the sparsity penalty"})
    target: str = field(default="pruned-input", metadata={"help": "BESA: pruned-input or dense-stream"})
    optimizer: str = field(default="adamw", metadata={"help": "BESA: adamw or prodigy (the paper's)"})
    lr: float | None = field(default=None, metadata={"help": "BESA: learning rate (adamw 0.05, prodigy 1.0)"})
    d_coef: float = field(default=5.0, metadata={"help": "BESA: Prodigy d_coef"})
    epochs: int | None = field(
        default=None,
        metadata={
            "help": "BESA: epochs over the calibration set per block (0: learn nothing; default 1, 0 for N:M)"
        },
    )
    batch_size: int = field(default=1, metadata={"help": "BESA: calibration sequences per optimizer step"})
    clip_lr: float = field(
        default=0.01,
        metadata={"help": "BESA with --wbits: AdamW learning rate of the clipping logits"},
    )
    weight_update: str | None = field(
        default=None,
        metadata={
            "help": "BESA: obs (SparseGPT's update of the survivors, learned row counts), admm (ADMM with gradual "
            "pruning within the learned counts) or none (the paper: weights frozen); default: admm from 70%% "
            "sparsity and for N:M (no joint quantization), obs otherwise"
        },
    )
    lsq_iters: int = field(
        default=20,
        metadata={
            "help": "SparseGPT/BESA OBS: conjugate-gradient steps re-solving the kept weights (0: off)"
        },
    )
    nm_sharpness: float = field(
        default=1.0,
        metadata={
            "help": "BESA with --pattern: how sharply the learned N:M pattern starts at the metric's own"
        },
    )
    retries: int = field(
        default=1,
        metadata={"help": "BESA: retries with a 10x smaller step after a NaN/inf loss, then uniform"},
    )

    def resolved_metric(self, nm: bool) -> str:
        """The importance a run ranks by: ``metric``, with ``auto`` made ``admm`` for N:M (where learning from it
        measured best on PTB valid) and ``wanda`` otherwise."""
        if self.metric != "auto":
            return self.metric
        return "admm" if nm else "wanda"

    def resolved_epochs(self, nm: bool) -> int:
        """The learning epochs of a run: ``epochs``, or when not given 1, and ``NM_EPOCHS`` for N:M."""
        if self.epochs is not None:
            return self.epochs
        return NM_EPOCHS if nm else 1

    def __post_init__(self) -> None:
        choices = {
            "metric": (*METRICS, "auto"),
            "granularity": ("row", "layer"),
            "target": ("pruned-input", "dense-stream"),
            "optimizer": ("prodigy", "adamw"),
            "weight_update": ("auto", "none", "obs", "admm", None),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BesaError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(a for a in allowed if a is not None)}, got {getattr(self, name)!r}"
                )
        if self.candidates < 2:
            raise BesaError(f"--candidates must be at least 2, got {self.candidates}")
        if not 0 < self.rate_window <= 1:
            raise BesaError(f"--rate-window must be in (0, 1], got {self.rate_window}")
        if not 0 < self.max_rate <= 1:
            raise BesaError(f"--max-rate must be in (0, 1], got {self.max_rate}")
        if self.batch_size < 1:
            raise BesaError(f"--batch-size must be positive, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 0:
            raise BesaError(f"--epochs must be non-negative, got {self.epochs}")
        if self.lsq_iters < 0:
            raise BesaError(f"--lsq-iters must be non-negative, got {self.lsq_iters}")
        if self.retries < 0:
            raise BesaError(f"--retries must be non-negative, got {self.retries}")
        if self.lr is not None and not self.lr >= 0:
            raise BesaError(f"--lr must be non-negative, got {self.lr}")
        if not self.clip_lr > 0:
            raise BesaError(f"--clip-lr must be positive, got {self.clip_lr}")
        if not self.nm_sharpness > 0:
            raise BesaError(f"--nm-sharpness must be positive, got {self.nm_sharpness}")
        if self.lam < 0:
            raise BesaError(f"--lam must be non-negative, got {self.lam}")
