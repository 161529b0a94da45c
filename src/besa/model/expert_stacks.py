"""Experts no class records: how one forward multiplies them, watched or rerouted by a ``TorchFunctionMode``.

Some experts are plain parameters a model's own forward multiplies by hand: Llama 4's ``gate_up_proj`` [E, H, 2I]
(one ``bmm`` over every expert), DBRX's 2-D ``w1``/``v1``/``w2`` [E*I, H] (``x.matmul(w1.view(E, I, H)[e].T)``),
JetMoE's ``weight`` [E, out, in] (``F.linear(x_e, weight[e])``, in its MLP and its attention experts alike). No
decorator says how they are laid out, so one forward shows it: every matrix product whose weight operand is one
expert's slab of such a parameter (or, in a ``bmm``, the whole parameter) says which side is the input. For a
block's step the slabs become ``ExpertLinear``s (``<owner>.<parameter>_experts.<e>``) and a ``TorchFunctionMode``
sends each of those products to them, so hooks, masks and statistics see each expert's own tokens. A product
besa does not follow (an ``einsum``, a gather, a copy of the parameter) leaves the parameter's layout unknown,
which stops a run before any work; during a step it stops the step rather than compute with stale weights.

Which parameters are such stacks (``expert_slabs``), the probe forward (``learn_expert_layouts``) and the
unfusing into ``ExpertLinear``s are ``besa.model.experts``'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from besa.errors import BesaError

__all__ = [
    "LAYOUT_KEY",
    "UNKNOWN_KEY",
    "ExpertProducts",
    "Slab",
    "probe_ids",
    "slab_layouts",
    "slab_matrices",
    "slab_shape",
    "stated_expert_count",
    "unknown_slab",
]

_MATMULS = frozenset(
    {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm,
     torch.Tensor.mm}
)  # fmt: skip
_COUNTS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
LAYOUT_KEY = (
    "_besa_expert_layout"  # owner.__dict__: parameter name -> True when (out, in) is the slab transposed
)
UNKNOWN_KEY = "_besa_expert_unknown"  # owner.__dict__: parameter name -> why its layout is not known


def stated_expert_count(module: nn.Module) -> int | None:
    """The expert count ``module`` itself states (``num_experts`` and the like, above 1), else ``None``."""
    for key in _COUNTS:
        value = getattr(module, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def slab_shape(param: torch.Tensor, experts: int) -> tuple[int, int] | None:
    """One expert's stored matrix of ``param`` ([E, a, b] -> (a, b); [E*I, H] -> (I, H)), or ``None``."""
    if param.dim() == 3 and param.shape[0] == experts:
        return int(param.shape[1]), int(param.shape[2])
    if param.dim() == 2 and param.shape[0] % experts == 0 and param.shape[0] > experts:
        return int(param.shape[0]) // experts, int(param.shape[1])
    return None


def slab_layouts(owner: nn.Module) -> dict[str, bool]:
    return owner.__dict__.get(LAYOUT_KEY, {})


def unknown_slab(owner: nn.Module, name: str) -> str | None:
    """Why the layout of ``owner``'s expert parameter ``name`` is not known (``None`` when it is)."""
    if name in slab_layouts(owner):
        return None
    return owner.__dict__.get(UNKNOWN_KEY, {}).get(name, "no forward has shown how it is multiplied yet")


def slab_matrices(owner: nn.Module, name: str, count: int) -> dict[int, torch.Tensor]:
    """Expert e -> its (out, in) matrix of ``owner``'s parameter ``name``, a view (or, while unfused, its
    ``ExpertLinear``'s weight). Before a forward has shown the layout, the stored slab as it is."""
    linears = owner._modules.get(f"{name}_experts")
    if linears is not None:
        return {e: lin.weight.data for e, lin in enumerate(linears)}
    param = owner._parameters[name]
    assert param is not None
    rows, cols = slab_shape(param, count) or (0, 0)
    slabs = param.data.reshape(count, rows, cols)
    flip = slab_layouts(owner).get(name, False)
    return {e: slabs[e].t() if flip else slabs[e] for e in range(count)}


def _aliases(x: Any, storages: dict[int, Any]) -> Any:
    if torch.is_tensor(x) and x.layout == torch.strided and x.device.type != "meta":
        return storages.get(x.untyped_storage().data_ptr())
    return None


class Slab:
    """One expert parameter as the interception sees it."""

    def __init__(self, qualified: str, owner: nn.Module, name: str, count: int) -> None:
        self.qualified, self.owner, self.name, self.count = qualified, owner, name, count
        self.param = owner._parameters[name]
        assert self.param is not None
        self.rows, self.cols = slab_shape(self.param, count) or (0, 0)

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


class ExpertProducts(TorchFunctionMode):
    """Watches (``record``) or reroutes every matrix product whose weight operand is an expert parameter's slab."""

    def __init__(self, slabs: list[Slab], record: bool) -> None:
        super().__init__()
        self.by_storage = {s.param.untyped_storage().data_ptr(): s for s in slabs}
        self.record = record
        self.seen: dict[Slab, set[bool]] = {}
        self.escaped: dict[Slab, str] = {}

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

    def _escape(self, slab: Slab, func: Any) -> None:
        what = f"{slab.qualified} is used by {getattr(func, '__name__', func)}, not as one expert's matrix"
        if not self.record:
            raise BesaError(f"{what}: besa cannot follow this experts forward (nothing was written)")
        self.escaped.setdefault(slab, what)


def _rerouted(slab: Slab, e: int | None, x: torch.Tensor, w: torch.Tensor, bias: Any) -> torch.Tensor:
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
