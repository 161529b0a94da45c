"""The steppers of masked training (``train_masked``): each runs backward and one Adam step with the weights' exact
zeros fixed. ``DenseAdam`` is ``torch.optim.Adam`` with the zeros' gradients masked (the blockwise refit's);
``KeptAdam`` is Adam over the surviving weights only, each tensor stepped as soon as its gradient is complete.

The whole-model KL stage trains every block's linears at once, where ``torch.optim.Adam`` would hold, beside the
weights, a gradient and two moments of every entry, pruned ones included: four copies of the blocks (1.2 GiB for
SmolLM2-135M). ``KeptAdam`` keeps its two moments for the kept entries only (half the entries at 50% and 2:4), and
steps each tensor from a hook the moment backward has finished its gradient, which is then dropped: no more than
a few gradients exist at once. Its update is ``torch.optim.Adam``'s (default betas and eps, no weight decay) on the
kept entries; a pruned entry is never written, so it stays exactly 0. Which entries are kept is held as 1 bit each
(``pack_bits``), and a ``snapshot`` of the kept values (the best epoch's, a whole model's kept weights) goes to an
anonymous temporary file (``SpilledTensors``) instead of memory.

Under torchrun the gradients are averaged over the processes before any step (an expert one process routed no
token to must still wait for the others), so there every gradient is kept until backward ends.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch

from besa.engine import distributed
from besa.errors import BesaError

__all__ = [
    "BETAS",
    "EPS",
    "Stepper",
    "DenseAdam",
    "adam_update",
    "KeptAdam",
    "SpilledTensors",
    "pack_bits",
    "unpack_bits",
]

BETAS = (0.9, 0.999)
EPS = 1e-8
"""``torch.optim.Adam``'s defaults."""


class DenseAdam:
    """``torch.optim.Adam`` on ``params`` (its parameter ``groups``) with their exact zeros fixed: a zero gets no
    gradient and is zeroed again after every step. The blockwise refit's stepper (``KeptAdam`` is the KL stage's)."""

    def __init__(self, params: Sequence[torch.Tensor], groups: list[dict[str, Any]]) -> None:
        self.params = list(params)
        self.masks = [p.detach() != 0 for p in self.params]
        self.opt = torch.optim.Adam(groups)

    def step(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` and one Adam step of every tensor."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for (
            p
        ) in self.params:  # an expert no token of this batch was routed to: a zero gradient, on every rank
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.mean_grads(self.params)
        for p, keep in zip(self.params, self.masks, strict=True):
            p.grad.mul_(keep)
        self.opt.step()
        with torch.no_grad():
            for p, keep in zip(self.params, self.masks, strict=True):
                p.mul_(keep)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, values: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, values, strict=True):
                p.copy_(value)


class Stepper(Protocol):
    """How ``train_masked`` steps: ``step(loss)`` (backward and one update), ``snapshot()`` and ``restore``."""

    def step(self, loss: torch.Tensor) -> None: ...
    def snapshot(self) -> Iterable[torch.Tensor]: ...
    def restore(self, values: Iterable[torch.Tensor]) -> None: ...


def adam_update(
    value: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float
) -> None:
    """One Adam step of ``value`` in place from ``grad``, its moments ``m`` and ``v`` updated in place; ``step``
    counts from 1. ``torch.optim.Adam``'s formula: bias-corrected moments, ``eps`` added after the square root."""
    b1, b2 = BETAS
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = v.sqrt().div_(math.sqrt(1 - b2**step)).add_(EPS)
    value.addcdiv_(m, denom, value=-lr / (1 - b1**step))


class KeptAdam:
    """Adam on the nonzero entries of ``params`` (their zeros as they are now stay zero), at ``lrs[i]`` for
    ``params[i]``. ``step(loss)`` runs backward and one update of every tensor (a tensor backward gave no gradient,
    such as an expert no token reached, steps on a zero gradient, as ``torch.optim.Adam`` does);
    ``snapshot``/``restore`` save and put back the kept values."""

    def __init__(self, params: Sequence[torch.Tensor], lrs: Sequence[float]) -> None:
        self.params = list(params)
        self.lrs = list(lrs)
        self.bits = [pack_bits(p.detach() != 0) for p in self.params]  # 1 bit per entry, not a bool's byte
        self.m = [torch.zeros(int(torch.count_nonzero(p.detach())), device=p.device) for p in self.params]
        self.v = [torch.zeros_like(m) for m in self.m]
        self.steps = 0

    def _keep(self, i: int) -> torch.Tensor:
        return unpack_bits(self.bits[i], self.params[i].shape)

    def _update(self, i: int, grad: torch.Tensor | None) -> None:
        p, keep = self.params[i], self._keep(i)
        g = grad[keep].float() if grad is not None else torch.zeros_like(self.m[i])
        with torch.no_grad():
            kept = p.data[keep].float()
            adam_update(kept, g, self.m[i], self.v[i], self.steps, self.lrs[i])
            p.data.masked_scatter_(keep, kept.to(p.dtype))

    def step(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` and one Adam update of every tensor; no gradient is left behind."""
        self.steps += 1
        done = [False] * len(self.params)
        streaming = not distributed.world().active
        hooks = []
        if streaming:
            for i, p in enumerate(self.params):
                hooks.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self._arrived(i, p, done)))
        try:
            loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        if not streaming:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.mean_grads(self.params)
        for i, p in enumerate(self.params):
            if not done[i]:
                self._update(i, p.grad)
                p.grad = None

    def _arrived(self, i: int, p: torch.Tensor, done: list[bool]) -> None:
        self._update(i, p.grad)
        p.grad = None
        done[i] = True

    def snapshot(self) -> SpilledTensors:
        """A copy of the kept values of every tensor, in a temporary file (a whole model's kept weights)."""
        return SpilledTensors(p.detach()[self._keep(i)] for i, p in enumerate(self.params))

    def restore(self, values: Iterable[torch.Tensor]) -> None:
        """Put back the kept values of a ``snapshot``."""
        with torch.no_grad():
            for i, kept in zip(range(len(self.params)), values, strict=True):
                self.params[i].data.masked_scatter_(self._keep(i), kept.to(self.params[i].device))


_BIT = 1 << torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as 1 bit per entry: uint8 (ceil(numel / 8),), first entry in the lowest bit."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``pack_bits``' inverse: the boolean tensor of ``shape``."""
    flat = (bits.unsqueeze(1) & _BIT.to(bits.device)).bool().reshape(-1)
    return flat[: math.prod(shape)].reshape(shape)


class SpilledTensors:
    """Tensors written one at a time to an anonymous temporary file (``tempfile.TemporaryFile``: no name, gone when
    this object or the process is), and read back one at a time, on the CPU, by iterating."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.specs: list[tuple[torch.Size, torch.dtype]] = []
        try:
            self.file = tempfile.TemporaryFile()
            for t in tensors:
                t = t.detach().to("cpu").contiguous()
                self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
                self.specs.append((t.shape, t.dtype))
            self.file.flush()
        except OSError as exc:  # a full or read-only temporary folder: one line, not a traceback
            raise BesaError(
                f"cannot keep the best epoch's weights in a temporary file in {tempfile.gettempdir()!r} "
                f"(set TMPDIR to a folder with room): {exc.strerror or exc}"
            ) from None

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.file.seek(0)
        for shape, dtype in self.specs:
            t = torch.empty(shape, dtype=dtype)
            if t.numel() and self.file.readinto(t.reshape(-1).view(torch.uint8).numpy().data) != t.nbytes:
                raise OSError("a spilled tensor's temporary file was cut short")
            yield t
