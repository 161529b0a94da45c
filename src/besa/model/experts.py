"""Mixture-of-Experts experts as linears: every expert of a block pruned like a layer of its own.

- ``unfused_experts(block)``: for one block's step each fused weight of the classes transformers decorates
  (``besa.model.decorated_experts``) becomes an ``nn.ModuleList`` of E ``ExpertLinear`` (a plain
  ``nn.Linear``, its (out, in) matrix copied out), named ``<...>.experts.down_proj.3``. Every method, hook and
  statistic then works unchanged: a linear's inputs are the routed tokens (``down_proj``'s are the expert's
  own gated activations). On leaving, the linears are stacked back into the original parameters (names, order,
  dtype, layout), before the block is checkpointed. The stacks no class records (``expert_slabs``) are unfused
  the same way, as ``<owner>.<parameter>_experts.<e>``, once one forward has shown their layout
  (``learn_expert_layouts``; ``besa.model.expert_stacks`` watches and reroutes their products).
- ``experts_as_linears(model, blocks)``: the same for a whole model, outside the engine.
- ``block_expert_matrices(block)``: every expert matrix of a block by a name of its own, as an (out, in) view.
- ``pooled_statistics(block)``: every expert runs on every token, for statistics pooled over all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from besa.model.decorated_experts import expert_matrices, fused_experts, projections, uses_besa_experts
from besa.model.expert_stacks import (
    LAYOUT_KEY,
    UNKNOWN_KEY,
    ExpertProducts,
    Slab,
    probe_ids,
    slab_layouts,
    slab_matrices,
    slab_shape,
    stated_expert_count,
    unknown_slab,
)

__all__ = [
    "ExpertLinear", "block_expert_matrices", "expert_slabs", "experts_as_linears", "learn_expert_layouts",
    "pooled_statistics", "unfused_experts",
]  # fmt: skip


class ExpertLinear(nn.Linear):
    """Expert ``expert``'s matrix of the fused parameter ``source``, as a linear of its own (out, in)."""

    def __init__(self, weight: torch.Tensor, source: str, expert: int) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None
        self.source, self.expert = source, expert

    def extra_repr(self) -> str:
        return f"{self.source}[{self.expert}]: " + super().extra_repr()


@contextmanager
def pooled_statistics(block: nn.Module, on: bool = True) -> Iterator[None]:
    """While active (and ``on``), every expert of ``block`` runs on every token (``besa_experts``)."""
    found = [m for _, m in fused_experts(block)] if on else []
    for module in found:
        module.besa_pooled = True
    try:
        yield
    finally:
        for module in found:
            module.besa_pooled = False


@contextmanager
def unfused_experts(block: nn.Module) -> Iterator[list[str]]:
    """While active, each fused weight of ``block``'s experts is an ``nn.ModuleList`` of ``ExpertLinear``; yields the
    relative names of those linears. On leaving, they are stacked back into the original parameters (pruned as
    they now are), with the original names, order, dtype, layout and ``requires_grad``. Experts no class records
    (``expert_slabs``) are unfused too, by ``_unfused_slabs``."""
    with _unfused_decorated(block) as names, _unfused_slabs(block) as more:
        yield names + more


@contextmanager
def experts_as_linears(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], input_ids: torch.Tensor | None = None
) -> Iterator[None]:
    """While active, the whole ``model`` runs with the experts of its ``blocks`` (``besa.model.blocks.find_blocks``)
    as linears (``unfused_experts``, the ``besa`` implementation), for work on a whole model outside the engine
    (``besa speedup``); the layout of stacks no class records is shown first (``learn_expert_layouts``, on
    ``input_ids`` if given)."""
    learn_expert_layouts(model, blocks, input_ids)
    with ExitStack() as stack:
        stack.enter_context(uses_besa_experts(model))
        for _, block in blocks:
            stack.enter_context(unfused_experts(block))
        yield


def block_expert_matrices(block: nn.Module, unshown: bool = False) -> dict[str, torch.Tensor]:
    """Every expert matrix of ``block`` by a relative name of its own, as an (out, in) view: the decorated classes'
    (``<experts>.<projection>.<e>``) and the stacks no class records (``<owner>.<parameter>_experts.<e>``) whose
    layout a forward has shown (``learn_expert_layouts``); with ``unshown``, the others too, as stored (for
    estimates made without a forward, such as ``besa plan``)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, experts in fused_experts(block):
        found.update({f"{prefix}.{key}" if prefix else key: w for key, w in expert_matrices(experts).items()})
    for path, owner, name, count in expert_slabs(block):
        if not unshown and unknown_slab(owner, name) is not None:
            continue
        stem = f"{path}.{name}_experts" if path else f"{name}_experts"
        found.update({f"{stem}.{e}": w for e, w in slab_matrices(owner, name, count).items()})
    return found


@contextmanager
def _unfused_decorated(block: nn.Module) -> Iterator[list[str]]:
    undo: list[tuple[nn.Module, list[str], dict[str, bool]]] = []
    names: list[str] = []
    try:
        for prefix, experts in fused_experts(block):
            order, grads = list(experts._parameters), {}
            for name in projections(experts):
                fused = experts._parameters[name]
                assert fused is not None
                grads[name] = fused.requires_grad
                linears = nn.ModuleList(
                    ExpertLinear(_copy_matrix(fused.data[e], experts.is_transposed), name, e)
                    for e in range(experts.num_experts)
                )
                del experts._parameters[name], fused  # the fused copy goes now, not at the end of the step
                setattr(experts, name, linears)
                names += [
                    f"{prefix}.{name}.{e}" if prefix else f"{name}.{e}" for e in range(experts.num_experts)
                ]
            undo.append((experts, order, grads))
        yield names
    finally:
        for experts, order, grads in reversed(undo):
            _refuse(experts, order, grads)


def _copy_matrix(stored: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Expert ``e``'s (out, in) matrix as a copy of its own; a transposed layout stays a transposed view of an
    (in, out) copy, so a product with it is the same GEMM the fused forward runs (bit for bit)."""
    return stored.detach().clone().t() if transposed else stored.detach().clone()


def _refuse(experts: nn.Module, order: list[str], grads: dict[str, bool]) -> None:
    for name, requires_grad in grads.items():
        linears: Any = getattr(experts, name)
        delattr(experts, name)
        rows = [lin.weight.detach().t() if experts.is_transposed else lin.weight.detach() for lin in linears]
        experts.register_parameter(name, nn.Parameter(torch.stack(rows), requires_grad=requires_grad))
    params = dict(experts._parameters)
    experts._parameters.clear()
    experts._parameters.update((k, params[k]) for k in order)


# --- experts no class records (their layouts and products: besa.model.expert_stacks) ------------------------


def expert_slabs(block: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """Parameters of ``block`` that hold one matrix per expert outside any decorated experts class and outside any
    linear: ``(owner's relative name, owner, parameter name, expert count)``. The count is the nearest enclosing
    module's (``num_experts``, ``num_local_experts``, ``moe_num_experts``, ``n_routed_experts``): a parameter no
    module gives a count stays unknown to besa."""
    decorated = {id(p) for _, m in fused_experts(block) for p in m.parameters()}
    counts: dict[str, int | None] = {}
    found = []
    for path, owner in block.named_modules():
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        counts[path] = stated_expert_count(owner) or (counts.get(parent) if path else None)
        if isinstance(owner, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)) or hasattr(owner, "nf"):
            continue  # a linear (Conv1D has ``nf``), an embedding or a convolution: not an experts tensor
        for name, param in owner.named_parameters(recurse=False):
            count = counts[path]
            if count and id(param) not in decorated and slab_shape(param, count) is not None:
                found.append((path, owner, name, count))
    return found


def learn_expert_layouts(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], input_ids: torch.Tensor | None = None
) -> None:
    """Run ``model`` once on ``input_ids`` (``probe_ids`` if not given), watching every expert parameter no class
    records (``expert_slabs``), and keep on its owner how each is multiplied (or why it could not be told). A
    no-op, and no forward, when there are none."""
    found = [(f"{b}.{p}.{n}" if p else f"{b}.{n}", o, n, c) for b, block in blocks
             for p, o, n, c in expert_slabs(block) if unknown_slab(o, n) is not None]  # fmt: skip
    if not found:
        return
    slabs = [Slab(*f) for f in found]
    mode = ExpertProducts(slabs, record=True)
    failed = None
    try:
        with torch.no_grad(), mode:
            model(input_ids=input_ids if input_ids is not None else probe_ids(model))
    except Exception as exc:  # the layouts stay unknown, which stops the run with this reason
        failed = (
            f"a short forward to see how it is multiplied failed ({type(exc).__name__}: {exc})".splitlines()[
                0
            ]
        )
    for slab in slabs:
        sides = mode.seen.get(slab, set())
        why = failed or mode.escaped.get(slab) or (
            "its forward multiplies it both ways" if len(sides) > 1 else None
        ) or (None if sides else "the forward never multiplied it as experts' matrices")  # fmt: skip
        if why is None:
            slab.owner.__dict__.setdefault(LAYOUT_KEY, {})[slab.name] = sides.pop()
        else:
            slab.owner.__dict__.setdefault(UNKNOWN_KEY, {})[slab.name] = why


def _intercepted(block: nn.Module) -> list[Slab]:
    return [Slab(p, o, n, c) for p, o, n, c in expert_slabs(block) if f"{n}_experts" in o._modules]


def _enter(block: nn.Module, args: Any) -> None:
    mode = ExpertProducts(_intercepted(block), record=False)
    block.__dict__.setdefault("_besa_modes", []).append(mode)
    mode.__enter__()


def _leave(block: nn.Module, args: Any, output: Any) -> None:
    block.__dict__["_besa_modes"].pop().__exit__(None, None, None)


@contextmanager
def _unfused_slabs(block: nn.Module) -> Iterator[list[str]]:
    """``unfused_experts`` for the experts no class records: each slab copied into an ``ExpertLinear`` and every
    forward of the block (and of a deep copy of it) rerouted to them; on leaving, copied back."""
    done: list[tuple[nn.Module, str, bool]] = []
    names: list[str] = []
    hooks = []
    try:
        for path, owner, name, count in expert_slabs(block):
            if name not in slab_layouts(owner):
                continue  # unknown layouts were refused or left dense on purpose before any work
            flip = slab_layouts(owner)[name]
            param = owner._parameters[name]
            assert param is not None
            rows, cols = slab_shape(param, count) or (0, 0)
            slabs = param.detach().reshape(count, rows, cols)
            owner.add_module(f"{name}_experts", nn.ModuleList(
                ExpertLinear(_copy_matrix(slabs[e], flip), name, e) for e in range(count)
            ))  # fmt: skip
            done.append((owner, name, flip))
            names += [f"{path}.{name}_experts.{e}" if path else f"{name}_experts.{e}" for e in range(count)]
        if done:
            hooks = [
                block.register_forward_pre_hook(_enter),
                block.register_forward_hook(_leave, always_call=True),
            ]
        yield names
    finally:
        for hook in hooks:
            hook.remove()
        for owner, name, flip in reversed(done):
            linears: Any = owner._modules.pop(f"{name}_experts")
            param = owner._parameters[name]
            assert param is not None
            rows = [lin.weight.detach().t() if flip else lin.weight.detach() for lin in linears]
            with torch.no_grad():
                param.copy_(torch.stack(rows).reshape(param.shape))
