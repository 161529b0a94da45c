"""Experts classes transformers decorates: finding them, each expert's matrices, and the ``besa``
implementation they run while besa works.

transformers 5 stores the experts of a block as fused 3-D parameters (``gate_up_proj`` [E, 2I, H] or its
transpose, ``down_proj`` [E, H, I]) in classes decorated with ``use_experts_implementation``
(``transformers/integrations/moe.py``). The decorator records the layout on the instance (``is_transposed``,
``is_concatenated``, ``has_gate``, ``has_bias``, ``has_post_expert_norm``) and dispatches the forward through
``ExpertsInterface`` by ``config._experts_implementation``. That is what this module builds on, generically (no
model class is named):

- ``uses_besa_experts(model)``: while active, every fused experts module of the model runs ``besa_experts``, a
  registered implementation that loops over the experts and runs each on exactly the tokens its router sends it,
  the bias added apart, as the classes' own eager forward does (bit for bit); the library's batched kernels round
  differently, and a flipped top-k choice would turn that into a visible change, so the whole engine (dense
  targets, pruned forwards, propagation) runs one implementation.

Unfusing them into linears, one per expert, is ``besa.model.experts``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMPLEMENTATION", "besa_experts", "expert_matrices", "fused_experts", "is_fused_experts", "projections",
    "uses_besa_experts",
]  # fmt: skip

IMPLEMENTATION = "besa"
_LAYOUT = ("has_gate", "is_transposed", "is_concatenated", "has_bias", "num_experts")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts class decorated by ``use_experts_implementation`` (its layout recorded)."""
    return all(hasattr(module, a) for a in _LAYOUT) and hasattr(
        getattr(module, "config", None), "_experts_implementation"
    )


def fused_experts(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fused experts module below ``module``, by relative name."""
    return [(name, m) for name, m in module.named_modules() if is_fused_experts(m)]


def projections(experts: nn.Module) -> list[str]:
    """The names of the fused weights, in calling order: ``gate_up_proj`` (``up_proj`` without a gate), ``down_proj``."""
    return ["gate_up_proj" if experts.has_gate else "up_proj", "down_proj"]


def expert_matrices(experts: nn.Module) -> dict[str, torch.Tensor]:
    """``"<projection>.<e>"`` -> expert e's (out, in) matrix of that projection, a view of the fused parameter (or the
    weight of its ``ExpertLinear`` while unfused). Rows keep their stored order, gate and up concatenated or
    interleaved as the class's gate expects."""
    found: dict[str, torch.Tensor] = {}
    for name in projections(experts):
        stored = getattr(experts, name)
        for e in range(experts.num_experts):
            if isinstance(stored, nn.ModuleList):
                found[f"{name}.{e}"] = stored[e].weight.data
            else:
                found[f"{name}.{e}"] = stored.data[e].t() if experts.is_transposed else stored.data[e]
    return found


def _project(experts: nn.Module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` times expert ``e``'s matrix of ``name``, then its bias, added apart as the eager forward adds it."""
    stored = getattr(experts, name)
    if isinstance(stored, nn.ModuleList):
        y = stored[e](x)  # a linear: hooks and BESA's masked forward see this call
    else:
        y = x @ stored[e] if experts.is_transposed else F.linear(x, stored[e])
    return y + getattr(experts, f"{name}_bias")[e] if experts.has_bias else y


def besa_experts(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``besa`` experts implementation: each expert on the tokens routed to it, weighted and summed back.

    With ``besa_pooled`` set on the module (``--expert-stats pooled``) every expert also runs on every token, so
    its linears' statistics come from all of them; the output still takes only the routed tokens' rows."""
    out = torch.zeros_like(hidden_states)
    first, down = projections(self)
    pooled = getattr(self, "besa_pooled", False)
    for e in range(self.num_experts):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0 and not pooled:
            continue
        h = _project(self, first, e, hidden_states if pooled else hidden_states[token])
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _project(self, down, e, h)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y[token] if pooled else y
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, besa_experts)


@contextmanager
def uses_besa_experts(model: nn.Module) -> Iterator[None]:
    """While active, every fused experts module of ``model`` runs ``besa_experts``; each gets a shallow copy of its
    config naming it (the model's own config, and what ``save_pretrained`` writes, stay as they were)."""
    found = fused_experts(model)
    if found:
        _register()
    saved = [(m, m.config) for _, m in found]
    try:
        for module, config in saved:
            mine = copy.copy(config)
            mine._experts_implementation_internal = IMPLEMENTATION
            module.config = mine
        yield
    finally:
        for module, config in saved:
            module.config = config
