"""Mixture-of-Experts experts as linears: every expert of a fused experts module pruned like a layer of its own.

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
- ``unfused_experts(block)``: for one block's step each fused weight becomes an ``nn.ModuleList`` of E
  ``ExpertLinear`` (a plain ``nn.Linear``, its (out, in) matrix copied out), named ``<...>.experts.down_proj.3``.
  Every method, hook and statistic then works unchanged: a linear's inputs are the routed tokens (``down_proj``'s
  are the expert's own gated activations). On leaving, the linears are stacked back into the original parameters
  (names, order, dtype, layout), before the block is checkpointed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from besa.errors import BesaError

__all__ = [
    "IMPLEMENTATION", "ExpertLinear", "besa_experts", "block_expert_matrices", "expert_matrices", "expert_slabs",
    "experts_as_linears", "fused_experts", "is_fused_experts", "learn_expert_layouts", "pooled_statistics", "probe_ids",
    "projections", "slab_matrices", "stated_expert_count", "unfused_experts", "unknown_slab", "uses_besa_experts",
]  # fmt: skip

IMPLEMENTATION = "besa"
_LAYOUT = ("has_gate", "is_transposed", "is_concatenated", "has_bias", "num_experts")


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


@contextmanager
def unfused_experts(block: nn.Module) -> Iterator[list[str]]:
    """While active, each fused weight of ``block``'s experts is an ``nn.ModuleList`` of ``ExpertLinear``; yields the
    relative names of those linears. On leaving, they are stacked back into the original parameters (pruned as
    they now are), with the original names, order, dtype, layout and ``requires_grad``. Experts no class records
    (``expert_slabs``) are unfused too, by ``_unfused_slabs``."""
    with _unfused_decorated(block) as names, _unfused_slabs(block) as more:
        yield names + more


@contextmanager
def experts_as_linears(model: nn.Module, input_ids: torch.Tensor | None = None) -> Iterator[None]:
    """While active, the whole ``model`` runs with every block's experts as linears (``unfused_experts``, the
    ``besa`` implementation), for work on a whole model outside the engine (``besa speedup``); the layout of stacks
    no class records is shown first (``learn_expert_layouts``, on ``input_ids`` if given)."""
    from besa.model.blocks import find_blocks  # modeling imports this module

    blocks = find_blocks(model)
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


# --- experts no class records -------------------------------------------------------------------------------------
# Some experts are plain parameters a model's own forward multiplies by hand: Llama 4's ``gate_up_proj`` [E, H, 2I]
# (one ``bmm`` over every expert), DBRX's 2-D ``w1``/``v1``/``w2`` [E*I, H] (``x.matmul(w1.view(E, I, H)[e].T)``),
# JetMoE's ``weight`` [E, out, in] (``F.linear(x_e, weight[e])``, in its MLP and its attention experts alike). No
# decorator says how they are laid out, so one forward shows it: every matrix product whose weight operand is one
# expert's slab of such a parameter (or, in a ``bmm``, the whole parameter) says which side is the input. For a
# block's step the slabs become ``ExpertLinear``s (``<owner>.<parameter>_experts.<e>``) and a ``TorchFunctionMode``
# sends each of those products to them, so hooks, masks and statistics see each expert's own tokens. A product
# besa does not follow (an ``einsum``, a gather, a copy of the parameter) leaves the parameter's layout unknown,
# which stops a run before any work; during a step it stops the step rather than compute with stale weights.

_MATMULS = frozenset(
    {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm,
     torch.Tensor.mm}
)  # fmt: skip
_COUNTS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
_LAYOUT_KEY = (
    "_besa_expert_layout"  # owner.__dict__: parameter name -> True when (out, in) is the slab transposed
)
_UNKNOWN_KEY = "_besa_expert_unknown"  # owner.__dict__: parameter name -> why its layout is not known


def stated_expert_count(module: nn.Module) -> int | None:
    """The expert count ``module`` itself states (``num_experts`` and the like, above 1), else ``None``."""
    for key in _COUNTS:
        value = getattr(module, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def _slab_shape(param: torch.Tensor, experts: int) -> tuple[int, int] | None:
    """One expert's stored matrix of ``param`` ([E, a, b] -> (a, b); [E*I, H] -> (I, H)), or ``None``."""
    if param.dim() == 3 and param.shape[0] == experts:
        return int(param.shape[1]), int(param.shape[2])
    if param.dim() == 2 and param.shape[0] % experts == 0 and param.shape[0] > experts:
        return int(param.shape[0]) // experts, int(param.shape[1])
    return None


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
            if count and id(param) not in decorated and _slab_shape(param, count) is not None:
                found.append((path, owner, name, count))
    return found


def _layouts(owner: nn.Module) -> dict[str, bool]:
    return owner.__dict__.get(_LAYOUT_KEY, {})


def unknown_slab(owner: nn.Module, name: str) -> str | None:
    """Why the layout of ``owner``'s expert parameter ``name`` is not known (``None`` when it is)."""
    if name in _layouts(owner):
        return None
    return owner.__dict__.get(_UNKNOWN_KEY, {}).get(name, "no forward has shown how it is multiplied yet")


def slab_matrices(owner: nn.Module, name: str, count: int) -> dict[int, torch.Tensor]:
    """Expert e -> its (out, in) matrix of ``owner``'s parameter ``name``, a view (or, while unfused, its
    ``ExpertLinear``'s weight). Before a forward has shown the layout, the stored slab as it is."""
    linears = owner._modules.get(f"{name}_experts")
    if linears is not None:
        return {e: lin.weight.data for e, lin in enumerate(linears)}
    param = owner._parameters[name]
    assert param is not None
    rows, cols = _slab_shape(param, count) or (0, 0)
    slabs = param.data.reshape(count, rows, cols)
    flip = _layouts(owner).get(name, False)
    return {e: slabs[e].t() if flip else slabs[e] for e in range(count)}


def _aliases(x: Any, storages: dict[int, Any]) -> Any:
    if torch.is_tensor(x) and x.layout == torch.strided and x.device.type != "meta":
        return storages.get(x.untyped_storage().data_ptr())
    return None


class _Slab:
    """One expert parameter as the interception sees it."""

    def __init__(self, qualified: str, owner: nn.Module, name: str, count: int) -> None:
        self.qualified, self.owner, self.name, self.count = qualified, owner, name, count
        self.param = owner._parameters[name]
        assert self.param is not None
        self.rows, self.cols = _slab_shape(self.param, count) or (0, 0)

    def expert_of(self, w: torch.Tensor) -> int | None:
        """The expert whose whole slab ``w`` is (as stored or transposed), else ``None``."""
        if w.dim() != 2 or w.numel() != self.rows * self.cols or not self.param.is_contiguous():
            return None
        offset = w.storage_offset() - self.param.storage_offset()
        e, rest = divmod(offset, self.rows * self.cols)
        stored = w.shape == (self.rows, self.cols) and w.stride() == (self.cols, 1)
        flipped = w.shape == (self.cols, self.rows) and w.stride() == (1, self.cols)
        return e if rest == 0 and 0 <= e < self.count and (stored or flipped) else None

    def whole(self, w: torch.Tensor) -> bool:
        """Whether ``w`` is the whole parameter as [E, rows, cols], as stored or with its matrices transposed."""
        return (
            w.dim() == 3 and w.shape[0] == self.count and w.storage_offset() == self.param.storage_offset()
            and self.param.is_contiguous() and w.stride(0) == self.rows * self.cols
            and (w.shape[1:], w.stride()[1:]) in {((self.rows, self.cols), (self.cols, 1)),
                                                  ((self.cols, self.rows), (1, self.cols))}
        )  # fmt: skip

    def flipped(self, func: Any, w: torch.Tensor) -> bool:
        """Whether this product's (out, in) matrix is the stored slab transposed: ``F.linear`` takes (out, in),
        every other product ``x @ w`` takes (in, out); a transposed view (unit stride first) turns it around."""
        as_stored = w.stride(-1) == 1
        return (not as_stored) if func is F.linear else as_stored


class _ExpertProducts(TorchFunctionMode):
    """Watches (``record``) or reroutes every matrix product whose weight operand is an expert parameter's slab."""

    def __init__(self, slabs: list[_Slab], record: bool) -> None:
        super().__init__()
        self.by_storage = {s.param.untyped_storage().data_ptr(): s for s in slabs}
        self.record = record
        self.seen: dict[_Slab, set[bool]] = {}
        self.escaped: dict[_Slab, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MATMULS and len(args) >= 2 and not _aliases(args[0], self.by_storage):
            slab = _aliases(args[1], self.by_storage)
            if slab is not None:
                w = args[1]
                e = slab.expert_of(w)
                if e is not None or slab.whole(w):
                    if self.record:
                        probe = w if e is not None else w[0]
                        self.seen.setdefault(slab, set()).add(slab.flipped(func, probe))
                        return func(*args, **kwargs)
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    return _rerouted(slab, e, args[0], w, bias)
        out = func(*args, **kwargs)
        touched = [s for s in map(lambda a: _aliases(a, self.by_storage), (*args, *kwargs.values())) if s]
        if touched and torch.is_tensor(out) and out.layout == torch.strided and out.device.type != "meta":
            if out.untyped_storage().data_ptr() != touched[0].param.untyped_storage().data_ptr():
                self._escape(touched[0], func)
        return out

    def _escape(self, slab: _Slab, func: Any) -> None:
        what = f"{slab.qualified} is used by {getattr(func, '__name__', func)}, not as one expert's matrix"
        if not self.record:
            raise BesaError(f"{what}: besa cannot follow this experts forward (nothing was written)")
        self.escaped.setdefault(slab, what)


def _rerouted(slab: _Slab, e: int | None, x: torch.Tensor, w: torch.Tensor, bias: Any) -> torch.Tensor:
    """The product, computed by the experts' ``ExpertLinear``s: expert ``e``'s on ``x``, or for the whole
    parameter each expert's on its rows of ``x`` [E, T, in], skipping rows that are exactly zero (tokens the router
    did not send there: their output is zero either way, and no statistic should count them)."""
    linears = slab.owner._modules[f"{slab.name}_experts"]
    if e is not None:
        y = linears[e](x) if x.shape[:-1].numel() else x.new_zeros(*x.shape[:-1], linears[e].out_features)
        return y if bias is None else y + bias
    if x.dim() != 3 or x.shape[0] != slab.count or bias is not None:
        raise BesaError(f"{slab.qualified}: a product over every expert of input shape {list(x.shape)} is not one "
                        "besa can split by expert")  # fmt: skip
    outs = []
    for k, lin in enumerate(linears):
        rows = (x[k] != 0).any(-1).nonzero().squeeze(-1)
        y = torch.zeros(x.shape[1], lin.out_features, dtype=x.dtype, device=x.device)
        outs.append(y.index_copy(0, rows, lin(x[k, rows])) if rows.numel() else y)
    return torch.stack(outs)


def probe_ids(model: nn.Module) -> torch.Tensor:
    """A short token sequence for ``learn_expert_layouts`` (any tokens do: only how the experts are multiplied is
    watched), on the device of the model's input embedding."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0) or 2
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = embed.weight.device if embed is not None else torch.device("cpu")
    return (torch.arange(1, 17, device=device) * 7919 % vocab).unsqueeze(0)


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
    slabs = [_Slab(*f) for f in found]
    mode = _ExpertProducts(slabs, record=True)
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
            slab.owner.__dict__.setdefault(_LAYOUT_KEY, {})[slab.name] = sides.pop()
        else:
            slab.owner.__dict__.setdefault(_UNKNOWN_KEY, {})[slab.name] = why


def _intercepted(block: nn.Module) -> list[_Slab]:
    return [_Slab(p, o, n, c) for p, o, n, c in expert_slabs(block) if f"{n}_experts" in o._modules]


def _enter(block: nn.Module, args: Any) -> None:
    mode = _ExpertProducts(_intercepted(block), record=False)
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
            if name not in _layouts(owner):
                continue  # unknown layouts were refused or left dense on purpose before any work
            flip = _layouts(owner)[name]
            param = owner._parameters[name]
            assert param is not None
            rows, cols = _slab_shape(param, count) or (0, 0)
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
