"""Optional last stage ``--kl-epochs``: with every mask fixed, train the surviving weights of the whole pruned model
end to end so its next-token distribution matches the dense model's on the calibration windows (KL divergence).

The dense model's distribution is kept as its ``topk`` most likely tokens at every position plus one bucket for all
the other tokens, measured once before pruning; the pruned model's distribution is coarsened the same way and the
loss is the KL divergence between the two coarsened distributions: 0 for the dense model itself, and
``N * T * (topk + 1)`` numbers kept instead of the whole vocabulary. As in the
blockwise refit, a weight that is exactly zero stays exactly zero (``KeptAdam`` never writes it; the counted
sparsity is unchanged), and the last ``holdout`` windows are never trained on: their KL is measured before training
and after every epoch, training stops when it no longer falls, and the best epoch's weights are kept.

Memory is held to about the pruned model's own size: the output head runs over ``LOGIT_ELEMENTS`` logits at a time
(a vocabulary of 262k tokens makes the logits of 4 x 512 tokens 2 GiB), each chunk's gradient taken as soon as its
logits are made; each block's activations are recomputed in backward rather than kept (``checkpointed_blocks``);
``KeptAdam`` keeps Adam's moments of the kept weights only, steps each linear as its gradient arrives, and keeps
the best epoch's values in a temporary file. The head is split from the model by reading its input; a model
whose logits are more than its head's output (a soft cap, a scale) is found by comparing the two once, and there
the whole logits are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine import distributed
from besa.engine.activations import return_large_frees, trim_heap
from besa.model.blocks import find_blocks, find_linears
from besa.model.training import checkpointed_blocks, final_hidden, head_splits, model_logits
from besa.stages.adam import KeptAdam
from besa.stages.reconstruct import TrainSchedule, split_holdout, train_masked

if TYPE_CHECKING:
    from besa.settings.config import KLSettings

__all__ = [
    "PATIENCE",
    "LOGIT_ELEMENTS",
    "TeacherTargets",
    "topk_targets",
    "topk_kl",
    "teacher_targets",
    "distill",
]


_FLOOR = -80.0
"""Teacher log-probabilities are kept at or above this (e^-80 ~ 1e-35): a bucket of probability 0 then adds 0 to the
KL, not ``0 * inf``."""


PATIENCE = 1
"""Epochs without a lower held-out KL before the training stops."""


LOGIT_ELEMENTS = 1 << 23
"""Logits computed at once (32 MiB in float32): the head runs over this many over the vocabulary size positions,
rounded up (``_chunk``)."""


@dataclass
class TeacherTargets:
    """The dense model's next-token distribution at every position of the windows, coarsened: its top-k token ids
    (N, T, k) and the log-probabilities of those and of all the other tokens together (N, T, k + 1)."""

    ids: torch.Tensor
    log_q: torch.Tensor

    def __getitem__(self, index: Any) -> TeacherTargets:
        return TeacherTargets(self.ids[index], self.log_q[index])


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits -> the ``k`` most likely ids (int32, (..., k)) and the log-probabilities of those ``k`` and,
    last, of all the other tokens together ((..., k + 1); (..., V) when ``k >= V``: no other tokens)."""
    log_probs = logits.float().log_softmax(dim=-1)
    top, ids = log_probs.topk(min(k, logits.shape[-1]), dim=-1)
    if ids.shape[-1] < logits.shape[-1]:
        tail = log_probs.scatter(-1, ids, -math.inf).logsumexp(dim=-1, keepdim=True)
        top = torch.cat([top, tail], dim=-1)
    return ids.to(torch.int32), top.clamp_min(_FLOOR)


def topk_kl(logits: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(q || p)`` between the teacher ``q``, given on its top-k ``ids`` plus one bucket
    for every other token (``log_q``, from ``topk_targets``), and the student's ``softmax(logits)`` coarsened the
    same way. (..., V), (..., k), (..., k [+ 1]) -> (); 0 for the teacher's own logits, whatever ``k``.
    """
    logits = logits.float()
    norm = logits.logsumexp(dim=-1, keepdim=True)
    log_p = logits.gather(-1, ids.long()) - norm
    if log_q.shape[-1] > ids.shape[-1]:  # the bucket of all the other tokens
        tail = logits.scatter(-1, ids.long(), -math.inf).logsumexp(dim=-1, keepdim=True) - norm
        log_p = torch.cat([log_p, tail], dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _chunk(head: nn.Module) -> int:
    """Positions whose logits the head makes at once: ``LOGIT_ELEMENTS`` over the vocabulary size, rounded up.

    Up, so that a chunk's logits and their like are never under 32 MiB: glibc serves those from their own mappings
    and, when one under 32 MiB is freed, raises its mmap threshold to its size; from then on such tensors come from
    the heap, which keeps what they free. Measured on ``besa prune`` at 2:4 and 4:8 on SmolLM2-135M (49152 tokens,
    170 positions a chunk when rounded down): the dense targets' pass peaked at 2.1-2.4 GiB resident in three of five
    processes and 1.1 GiB in the others; rounded up (171), at 1.2-1.3 GiB in five of five."""
    return -(-LOGIT_ELEMENTS // head.weight.shape[0])


def _kl_sum(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return topk_kl(head(hidden), ids, log_q) * hidden.shape[0]


class _GradGiven(torch.autograd.Function):
    """``value``, whose gradient with respect to ``hidden`` is ``grad``, worked out already: backward hands
    ``hidden`` ``grad`` times the gradient that arrives."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * out, None, None


def _kl(
    model: nn.Module, split: bool, ids: torch.Tensor, t_ids: torch.Tensor, t_lq: torch.Tensor
) -> torch.Tensor:
    """``topk_kl`` of ``model`` on the windows ``ids`` (B, T); with ``split``, the head runs over a chunk of
    positions at a time. With gradients, each chunk's gradient with respect to the head's input is taken at once
    and its logits dropped (the head trains no weight here), so no chunk's logits are kept or made twice."""
    if not split:
        return topk_kl(model_logits(model, ids), t_ids, t_lq)
    head = model.get_output_embeddings()
    hidden, t_ids, t_lq = _rows(final_hidden(model, ids)), _rows(t_ids), _rows(t_lq)
    step, n, grad_on = _chunk(head), hidden.shape[0], torch.is_grad_enabled()
    scale = torch.ones((), device=hidden.device) / n  # what backward of ``total / n`` hands each chunk
    total, grads = hidden.new_zeros((), dtype=torch.float32), []
    for i in range(0, n, step):
        part = hidden[i : i + step].detach().requires_grad_(grad_on)
        with torch.set_grad_enabled(grad_on):
            kl_sum = _kl_sum(head, part, t_ids[i : i + step], t_lq[i : i + step])
        if grad_on:
            grads.extend(torch.autograd.grad(kl_sum, part, scale))
        total = total + kl_sum.detach()
    return _GradGiven.apply(hidden, total / n, torch.cat(grads)) if grad_on else total / n


@torch.no_grad()
def teacher_targets(
    model: nn.Module,
    windows: torch.Tensor,
    topk: int,
    device: torch.device,
    batch: int = 4,
    progress: bool = True,
) -> TeacherTargets:
    """The dense ``model``'s top-k targets on ``windows`` (N, T): one forward pass of the whole model on ``device``
    (the head over a chunk of positions at a time where it splits), the targets kept on the CPU."""
    was_training = model.training
    model.eval().to(device)
    ids, log_q = [], []
    try:
        split = head_splits(model, windows[:1].to(device))
        head = model.get_output_embeddings()
        step = _chunk(head) if split else 0
        for i in tqdm(
            range(0, windows.shape[0], batch), desc="Dense targets", disable=None if progress else True
        ):
            x = windows[i : i + batch].to(device)
            if not split:
                top = topk_targets(model_logits(model, x), topk)
            else:
                hidden = final_hidden(model, x)
                rows = _rows(hidden)
                parts = [topk_targets(head(rows[j : j + step]), topk) for j in range(0, rows.shape[0], step)]
                top = tuple(torch.cat(p).reshape(*hidden.shape[:2], -1) for p in zip(*parts, strict=True))
            ids.append(top[0].cpu())
            log_q.append(top[1].cpu())
    finally:
        model.to("cpu").train(was_training)
    return TeacherTargets(torch.cat(ids), torch.cat(log_q))


def _kl_over(
    model: nn.Module,
    split: bool,
    windows: torch.Tensor,
    targets: TeacherTargets,
    batch: int,
    device: torch.device,
) -> float:
    """Mean ``topk_kl`` of ``model`` over ``windows``, no gradients."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            t = targets[i : i + batch]
            kl = _kl(model, split, windows[i : i + batch].to(device), t.ids.to(device), t.log_q.to(device))
            total += float(kl) * min(batch, windows.shape[0] - i)
    return total / max(windows.shape[0], 1)


def distill(
    model: nn.Module,
    windows: torch.Tensor,
    targets: TeacherTargets,
    kl: KLSettings,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the surviving weights of every block's linears of ``model`` (Adam, masks fixed) toward ``targets`` on
    ``windows`` (N, T), as ``kl`` says (``epochs``; ``lr``, or per linear ``rel_lr`` of its surviving RMS;
    ``batch`` windows per step; the last ``holdout`` windows held out; ``topk`` is the targets' own); return the
    facts: the held-out KL before training and after every epoch, each epoch's mean training KL (of its batches,
    as they trained), epochs run.

    Only the blocks' linears train (embeddings, norms and the head stay as they are), by ``KeptAdam``; the model is
    on ``device`` while it trains and back on the CPU after.
    """
    ranks = distributed.world().size  # data parallel: each rank holds out its share of the held-out windows
    train, held = split_holdout(windows.shape[0], -(-kl.holdout // ranks))
    x, xh = windows[train], windows[held]
    t, th = targets[train], targets[held]
    params = [
        layer.weight for _, block in find_blocks(model) for layer in find_linears(block, model).values()
    ]
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().to(device)
    model.requires_grad_(False)
    split = head_splits(model, windows[:1].to(device))

    seen: list[float] = []  # every step's training KL, as it trained

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        ti = t[idx]
        loss = _kl(model, split, x[idx].to(device), ti.ids.to(device), ti.log_q.to(device))
        seen.append(float(loss.detach()))
        return loss

    def evaluate() -> float:
        return distributed.mean_value(_kl_over(model, split, xh, th, kl.batch, device))

    bar = tqdm(total=kl.epochs, desc="KL to the dense model", disable=None if progress else True)
    try:
        trim_heap()  # what the blocks freed goes back to the system, and from here on every large free at once:
        return_large_frees()  # the KL stage's peak is the run's (measured: 2.5 GiB -> 1.8 GiB on SmolLM2-135M)
        facts: dict[str, Any] = {"held_out_windows": int(xh.shape[0]) * ranks, "head_split": split}
        schedule = TrainSchedule(kl.epochs or 0, kl.lr, kl.batch, PATIENCE, seed, rel_lr=kl.rel_lr or 0.0)
        stepper = KeptAdam(params, schedule.rates(params))
        with checkpointed_blocks(model):
            facts.update(
                train_masked(
                    params, batch_loss, x.shape[0], evaluate if xh.shape[0] else None, schedule, bar, stepper
                )
            )
        del stepper
        steps = -(-x.shape[0] // kl.batch)
        facts["train"] = [
            distributed.mean_value(sum(seen[i : i + steps]) / steps) for i in range(0, len(seen), steps)
        ]
    finally:
        bar.close()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
            p.grad = None
        model.to("cpu").train(was_training)
    return facts
