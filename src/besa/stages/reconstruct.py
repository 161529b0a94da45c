"""Weight update ``refit``: after a block is pruned, train its surviving weights to reconstruct the block's target
outputs over the calibration windows (blockwise reconstruction; Shin et al., EMNLP 2024; EBFT, 2024).

The masks stay fixed: a pruned weight gets no gradient and is zeroed again after every step, so it stays exactly 0
and the counted sparsity is unchanged. The last ``holdout`` calibration windows are never trained on: their loss is
measured before training and after every epoch, training stops when it no longer falls, and the weights of the best
epoch are kept (never worse on the held-out windows than the pruned block it started from).

What "reconstruct" measures is ``RefitSpec.loss``, a name in ``LOSSES``: the squared error over the whole output
(``block_loss``), or each token's error relative to its own norm (``token_loss``). They differ where a model puts
massive activations on a few tokens: in SmolLM2-135M the first token of each window holds 70-98% of the squared
norm of the outputs of blocks 12 to 28 (of 30), and the whole-output error counts a relative error on such a token
at its norm's scale, dozens of times an ordinary token's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from besa.engine import distributed
from besa.engine.work import BlockWork
from besa.stages.adam import DenseAdam, Stepper

__all__ = [
    "LOSSES",
    "RefitSpec",
    "TrainSchedule",
    "anchor_penalty",
    "block_loss",
    "token_loss",
    "split_holdout",
    "surviving_rms",
    "train_masked",
    "refit_block",
]


@dataclass(frozen=True)
class RefitSpec:
    """How a block's surviving weights are trained (``PruneConfig.refit_*``)."""

    epochs: int
    lr: float
    batch_size: int = 4
    holdout: int = 4
    patience: int = 1
    anchor: float = 0.0
    loss: str = "mse"
    rel_lr: float = 0.0

    def schedule(self, seed: int) -> TrainSchedule:
        """The training of ``train_masked``, shuffled by ``seed``."""
        return TrainSchedule(
            self.epochs, self.lr, self.batch_size, self.patience, seed, self.anchor, self.rel_lr
        )


@dataclass(frozen=True)
class TrainSchedule:
    """How ``train_masked`` trains: ``epochs`` over the training windows, Adam's ``lr``, ``batch_size`` windows per
    step, ``patience`` epochs without a better held-out loss before it stops, the ``seed`` of the shuffling, the
    weight of ``anchor_penalty`` added to every step's loss (0: none), and ``rel_lr``: when > 0, each tensor's
    rate is this fraction of ``surviving_rms`` of it instead of ``lr``."""

    epochs: int
    lr: float
    batch_size: int
    patience: int = 1
    seed: int = 0
    anchor: float = 0.0
    rel_lr: float = 0.0

    def param_groups(self, params: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """Adam's parameter groups for ``params`` as they are before training: one group at ``lr``, or with
        ``rel_lr`` > 0 one group per tensor at its own rate."""
        if self.rel_lr > 0:
            return [{"params": [p], "lr": self.rel_lr * surviving_rms(p)} for p in params]
        return [{"params": list(params), "lr": self.lr}]

    def rates(self, params: Sequence[torch.Tensor]) -> list[float]:
        """Each tensor's rate, as ``param_groups`` gives it."""
        return [self.rel_lr * surviving_rms(p) if self.rel_lr > 0 else self.lr for p in params]


def surviving_rms(weight: torch.Tensor) -> float:
    """Root mean square of the nonzero entries of ``weight`` (0 when none): the scale of what a refit may move.

    Adam's step is about its rate in every coordinate, whatever the weights' size: a rate fixed in absolute terms
    moves Gemma-3-270M's linears (surviving RMS about 0.05 at 2:4) five times as far, relative to their size, as
    SmolLM2-135M's (about 0.25)."""
    kept = weight.detach()[weight.detach() != 0].float()
    return float(kept.square().mean().sqrt()) if kept.numel() else 0.0


def block_loss(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the block output relative to the target's mean square, (B, T, H) -> ()."""
    target = target.float()
    return (output.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)


def token_loss(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of each token's squared error relative to its target's squared norm, (B, T, H) -> ().

    Every token weighs the same, whatever its norm: what the next block's normalisation sees of each token is
    its direction, not its scale."""
    target = target.float()
    error = (output.float() - target).square().sum(-1)
    return (error / target.square().sum(-1).clamp_min(1e-12)).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": block_loss,
    "token": token_loss,
}
"""The refit's losses by ``--refit-loss`` name: (target, output) -> ()."""


def anchor_penalty(
    params: Sequence[torch.Tensor], start: Sequence[torch.Tensor], start_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """How far ``params`` moved from ``start``: sum of squared changes over the sum of squares of ``start``
    (``start_norm``, when the caller has it already), () (0 where they have not moved). Added to the training loss
    it holds the weights near where training began."""
    moved = sum((p.float() - s.float()).square().sum() for p, s in zip(params, start, strict=True))
    if start_norm is None:
        start_norm = sum(s.float().square().sum() for s in start)
    return moved / start_norm.clamp_min(1e-12)


def split_holdout(n: int, holdout: int) -> tuple[slice, slice]:
    """(train, held-out) slices of ``n`` windows: the last ``holdout`` are held out (none if fewer than 2 remain)."""
    holdout = holdout if n - holdout >= 2 else 0
    return slice(0, n - holdout), slice(n - holdout, n)


def _loss_over(
    work: BlockWork, inputs: torch.Tensor, targets: torch.Tensor, batch: int, loss: Callable
) -> float:
    """Mean ``loss`` of the block over ``inputs`` (N, T, H) against ``targets``, no gradients."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            out = work.forward(inputs[i : i + batch])
            total += float(loss(targets[i : i + batch].to(out.device), out)) * min(batch, inputs.shape[0] - i)
    return total / max(inputs.shape[0], 1)


def train_masked(
    params: Sequence[torch.Tensor],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n_train: int,
    evaluate: Callable[[], float] | None,
    schedule: TrainSchedule,
    bar: Any = None,
    stepper: Stepper | None = None,
) -> dict[str, Any]:
    """Adam on ``params`` with their exact zeros fixed, as ``schedule`` says: ``batch_loss(indices)`` of a shuffled
    batch of the ``n_train`` training windows per step; ``evaluate()`` (the held-out loss, or ``None``: no early
    stop) before training and after every epoch. Training stops once it has not improved for more than
    ``schedule.patience`` epochs and the best epoch's values are put back. ``stepper`` (made before training, so its
    zeros are the pruned weights; ``DenseAdam`` with ``schedule.param_groups`` when not given) runs each step. With
    ``schedule.anchor`` > 0, each step adds ``anchor`` x ``anchor_penalty`` (the move away from the starting values)
    to the loss. Returns ``held_out`` (the losses measured) and ``epochs`` (run).

    A weight that is exactly zero (pruned, or zero in the dense model) stays exactly zero, so the counted sparsity
    cannot change. Gradients are averaged over a torchrun run's processes.
    """
    stepper = stepper if stepper is not None else DenseAdam(params, schedule.param_groups(params))
    for p in params:
        p.requires_grad_(True)
    epochs, batch_size, patience = schedule.epochs, schedule.batch_size, schedule.patience
    held_out = [evaluate()] if evaluate else []
    best = stepper.snapshot() if evaluate else None  # None: the values as they are now are the best
    best_loss, waited, run = (held_out[0] if evaluate else math.inf), 0, 0
    start = [p.detach().clone() for p in params] if schedule.anchor > 0 else []
    start_norm = sum(s.float().square().sum() for s in start) if start else None  # once, not at every step
    gen = torch.Generator().manual_seed(schedule.seed)
    with torch.enable_grad():
        for _epoch in range(epochs):
            order = torch.randperm(n_train, generator=gen)
            for i in range(0, n_train, batch_size):
                loss = batch_loss(order[i : i + batch_size])
                if start:
                    loss = loss + schedule.anchor * anchor_penalty(params, start, start_norm)
                stepper.step(loss)
            run += 1
            if bar is not None:
                bar.update()
            if evaluate is None:
                continue
            loss_now = evaluate()
            held_out.append(loss_now)
            if bar is not None:
                bar.set_postfix(held_out=f"{loss_now:.4g}")
            if loss_now < best_loss:
                best_loss, waited = loss_now, 0
                best = None  # the old copy goes before the new one is made (two copies would be the peak)
                if run < epochs:  # after the last epoch the values themselves are the best: no copy
                    best = stepper.snapshot()
            else:
                waited += 1
                if waited > patience:
                    break
    if best is not None:
        stepper.restore(best)
    return {"held_out": held_out, "epochs": run}


def refit_block(
    work: BlockWork,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    spec: RefitSpec,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the surviving weights of ``work``'s linears (Adam, masks fixed) so the block maps ``inputs`` to
    ``targets``; return the facts: the held-out loss before training and after every epoch, each epoch's mean
    training loss (of its batches, as they trained: the training windows get no pass of their own), epochs run."""
    x_all, y_all = torch.cat(list(inputs)), torch.cat(list(targets))
    ranks = distributed.world().size  # data parallel: each rank holds out its share of the held-out windows
    train, held = split_holdout(x_all.shape[0], -(-spec.holdout // ranks))
    x, y, xh, yh = x_all[train], y_all[train], x_all[held], y_all[held]
    # every linear's weight and where it may change: a weight that is exactly zero stays so (pruned, or zero in
    # the dense model: either way the counted sparsity cannot change)
    params = [layer.weight for layer in work.linears.values()]
    requires = [p.requires_grad for p in work.module.parameters()]
    work.module.requires_grad_(False)
    loss = LOSSES[spec.loss]

    seen: list[float] = []  # each step's training loss, as it trained (no pass of its own)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        out = work.forward(x[idx])
        value = loss(y[idx].to(out.device), out)
        seen.append(float(value.detach()))
        return value

    def loss_over(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        return distributed.mean_value(_loss_over(work, inputs, targets, spec.batch_size, loss))

    evaluate = (lambda: loss_over(xh, yh)) if xh.shape[0] else None
    facts: dict[str, Any] = {"held_out_windows": int(xh.shape[0]) * ranks}
    bar = tqdm(
        total=spec.epochs, desc=f"({work.index + 1}/{work.num_blocks}) Refitting", leave=False,
        disable=None if work.progress else True,
    )  # fmt: skip
    try:
        facts.update(train_masked(params, batch_loss, x.shape[0], evaluate, spec.schedule(seed), bar))
    finally:
        bar.close()
        for p, r in zip(work.module.parameters(), requires, strict=True):
            p.requires_grad_(r)
            p.grad = None
    steps = -(-x.shape[0] // spec.batch_size)
    facts["train"] = [
        distributed.mean_value(sum(seen[i : i + steps]) / steps) for i in range(0, len(seen), steps)
    ]
    return facts
