"""BESA's learning loop for one block: fresh optimizers, the masked forward swapped in, straight-through steps."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from besa.engine import distributed
from besa.engine.activations import rebatch
from besa.engine.work import BlockWork
from besa.methods.besa.config import BesaConfig
from besa.methods.besa.layer import MaskLogits, NonFiniteLoss, masked_forward, reconstruction_loss

__all__ = ["make_optimizers", "masked", "train_block"]


def make_optimizers(
    cfg: BesaConfig, block_logits: dict[str, MaskLogits], scale: float = 1.0
) -> list[torch.optim.Optimizer]:
    """Fresh optimizers for one block: ``--optimizer`` over the sparsity logits and, when the clipping is
    learned, AdamW at ``--clip-lr`` over the clipping logits (its own optimizer, so the step is its own under
    Prodigy too, which refuses groups with different learning rates)."""
    lr = (cfg.lr if cfg.lr is not None else (5e-2 if cfg.optimizer == "adamw" else 1.0)) * scale
    thetas = [a.theta for a in block_logits.values()]
    if cfg.optimizer == "adamw":
        opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(thetas, lr=lr, weight_decay=0.0)]
    else:
        from prodigyopt import Prodigy

        opts = [Prodigy(thetas, lr=lr, d_coef=cfg.d_coef, weight_decay=0.0)]
    clips = [a.clip for a in block_logits.values() if a.clip is not None]
    if clips:
        opts.append(torch.optim.AdamW(clips, lr=cfg.clip_lr * scale, weight_decay=0.0))
    return opts


@contextmanager
def masked(block_logits: dict[str, MaskLogits]) -> Iterator[None]:
    """While active, every allocated linear runs with its current training mask (``masked_forward``)."""
    for logits in block_logits.values():
        logits.layer.forward = lambda *a, _l=logits.layer, _a=logits, **k: masked_forward(_l, _a, *a, **k)
    try:
        yield
    finally:
        for logits in block_logits.values():
            del logits.layer.forward


def train_block(
    cfg: BesaConfig,
    work: BlockWork,
    block_logits: dict[str, MaskLogits],
    targets: Sequence[torch.Tensor],
    block_sparsity: float,
    scale: float = 1.0,
) -> list[float]:
    """Train the mask logits over the calibration set toward ``block_sparsity`` sparsity; return the losses.

    Raises ``NonFiniteLoss`` on a NaN/inf loss or parameter.
    """
    total = sum(a.numel for a in block_logits.values())
    opts = make_optimizers(cfg, block_logits, scale)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if work.device.type == "cuda" and next(work.module.parameters()).dtype != torch.float32
        else torch.autocast("cpu", enabled=False)
    )
    losses: list[float] = []
    steps = cfg.epochs * -(-work.num_samples // cfg.batch_size)
    bar = tqdm(
        total=steps, desc=f"({work.index + 1}/{work.num_blocks}) Learning", leave=False,
        disable=None if work.progress else True,
    )  # fmt: skip
    with torch.enable_grad(), masked(block_logits):
        for _ in range(cfg.epochs):
            for hidden, target in zip(
                rebatch(work.inputs, cfg.batch_size), rebatch(targets, cfg.batch_size), strict=True
            ):
                block_rate = 0.0
                for logits in block_logits.values():
                    rates = logits.prepare_step(len(losses) / max(steps - 1, 1))
                    block_rate = block_rate + rates.mean() * (logits.numel / total)
                with autocast:
                    out = work.forward(hidden)
                rec = reconstruction_loss(target.to(work.device), out)
                loss = rec + cfg.lam * (block_rate - block_sparsity) ** 2
                if not torch.isfinite(loss):
                    bar.close()
                    raise NonFiniteLoss(len(losses), float(loss.detach()))
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.mean_grads(p for a in block_logits.values() for p in a.parameters())
                for opt in opts:
                    opt.step()
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(
                    loss=f"{float(rec.detach()):.4g}", sparsity=f"{float(block_rate.detach()):.4f}"
                )
    bar.close()
    for logits in block_logits.values():
        logits.end_steps()
        if not all(torch.isfinite(p).all() for p in logits.parameters()):
            raise NonFiniteLoss(len(losses), math.nan)
    return losses
