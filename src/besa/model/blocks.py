"""Finding decoder blocks and prunable linears generically, and reading/writing their weights as (out, in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from besa.errors import BesaError
from besa.model.decorated_experts import fused_experts, projections
from besa.model.expert_stacks import stated_expert_count, unknown_slab
from besa.model.experts import block_expert_matrices, expert_slabs

__all__ = [
    "BlockWeight", "classify_block_weights", "find_blocks", "find_linears", "weight_matrix", "set_weight_matrix",
    "is_prunable_linear", "num_experts", "pruned_matrices", "unknown_weights",
]  # fmt: skip


def is_prunable_linear(module: nn.Module) -> bool:
    """``nn.Linear`` and GPT-2 style ``transformers.Conv1D`` layers."""
    return isinstance(module, (nn.Linear, Conv1D))


def _block_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def find_blocks(model: nn.Module, block_class: str | None = None) -> list[tuple[str, nn.Module]]:
    """Return the decoder blocks of ``model`` in execution order, as ``(qualified name, module)``.

    Blocks are the members of the longest ``nn.ModuleList`` whose entries are of a class named in the model's
    ``_no_split_modules`` (or ``block_class`` when given). No attribute path such as ``model.layers`` is assumed.
    """
    wanted = {block_class} if block_class else _block_class_names(model)
    best: list[tuple[str, nn.Module]] = []
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        members = [(f"{list_name}.{i}", m) for i, m in enumerate(module) if type(m).__name__ in wanted]
        if len(members) == len(module) and len(members) > len(best):
            best = members
    if not best:
        raise BesaError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{sorted(wanted) or 'any _no_split_modules class'}"
        )
    kind = {type(m).__name__ for _, m in best}
    first = best[0][0].rsplit(".", 1)[0]
    for list_name, module in model.named_modules():  # a second stack of the same blocks would go unpruned
        if (
            isinstance(module, nn.ModuleList) and list_name != first and len(module)
            and {type(m).__name__ for m in module} == kind
        ):  # fmt: skip
            raise BesaError(
                f"{type(model).__name__} holds two stacks of {sorted(kind)[0]} blocks ({first} and {list_name}); besa "
                "prunes one sequential stack of decoder blocks and would leave the other dense"
            )
    return best


_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def num_experts(config: Any) -> int | None:
    """The number of routed experts a model's config declares (``None`` for a dense model), whatever the
    attribute is called, nested configs (``text_config``, ``ffn_config``) included."""
    for holder in (config, getattr(config, "text_config", None), getattr(config, "ffn_config", None)):
        for key in _EXPERT_COUNTS:
            value = getattr(holder, key, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
    return None


def _is_router(matrix_shape: tuple[int, ...], experts: set[int]) -> bool:
    """Within a Mixture-of-Experts scope (``experts``: its expert counts, ``router_counts``), a matrix that makes
    one logit per expert (``[E, hidden]``, as an ``nn.Linear`` or a bare parameter), or one gate value per token
    (``[1, hidden]``, a shared expert's gate): routing, not computation."""
    return bool(experts) and len(matrix_shape) == 2 and (matrix_shape[0] == 1 or matrix_shape[0] in experts)


def router_counts(block: nn.Module, experts: int | None, fallback: bool = True) -> dict[str, set[int]]:
    """Module path -> the expert counts a router under it would have one output each for. Within a
    Mixture-of-Experts scope (the parent of a module that states an expert count, ``num_experts`` and the like:
    the MoE block holding the experts and their router) the counts stated there and ``experts`` (the config's);
    outside every scope none, so an attention projection that happens to have E outputs is no router. A block in
    which no module states a count falls back to ``experts`` everywhere if ``fallback`` (a model whose modules
    never state one); in a model whose other blocks do, it is a dense block and has no router."""
    stated = {path: c for path, m in block.named_modules() if (c := stated_expert_count(m))}
    scopes: dict[str, set[int]] = {}
    for path, count in stated.items():
        scopes.setdefault(path.rsplit(".", 1)[0] if "." in path else "", set()).add(count)
    default = {experts} if experts else set()
    if not scopes:
        return {path: default if fallback else set() for path, _ in block.named_modules()}
    found: dict[str, set[int]] = {}
    for path, _ in block.named_modules():
        counts = {c for scope, cs in scopes.items() if _under(path, scope) for c in cs}
        found[path] = counts | default if counts else set()
    return found


def _states_counts(model: nn.Module) -> bool:
    """Whether any module of ``model`` states an expert count (its MoE blocks can then be told from dense ones)."""
    return any(stated_expert_count(m) for m in model.modules())


def _under(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def find_linears(
    block: nn.Module, model: nn.Module | None = None, routers: bool = False
) -> dict[str, nn.Module]:
    """All prunable linears inside ``block`` by name relative to the block, excluding the model's output head and,
    unless ``routers``, the routers of a Mixture-of-Experts block (``classify_block_weights`` says which)."""
    head = (
        model.get_output_embeddings()
        if model is not None and hasattr(model, "get_output_embeddings")
        else None
    )
    counts = (
        router_counts(block, num_experts(getattr(model, "config", None)), not _states_counts(model))
        if model is not None
        else router_counts(block, None)
    )
    return {
        name: module
        for name, module in block.named_modules()
        if name
        and is_prunable_linear(module)
        and module is not head
        and (
            routers
            or hasattr(module, "expert")  # an expert's own matrix is no router
            or not _is_router(tuple(weight_matrix(module).shape), counts[name])
        )
    }


@dataclass(frozen=True)
class BlockWeight:
    """One weight (a parameter of two or more dimensions) of a decoder block, and what a run does with it.

    ``kind`` is ``pruned`` (a linear the methods prune), ``kept`` (left dense by a rule: ``rule`` says which) or
    ``unknown`` (a layout no method understands: the run stops before any work unless told to leave it dense).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    rule: str
    why: str = ""  # for an unknown weight, what besa saw (e.g. the product that multiplies an experts stack)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


_KEPT_MODULES = ((nn.modules.conv._ConvNd, "convolution"), (nn.Embedding, "embedding"))
_NORM = "norm"
"""A module whose class name says it is a norm (``RMSNorm``, ``LayerNorm``, a per-expert ``post_expert_norm``): its
weights scale activations elementwise, whatever their shape."""
_KEPT_NAMES = {"A_log": "state-space decay"}
"""Parameters kept by their conventional name: a state-space layer's log decay rates (Mamba, Jamba, gated delta
nets) are used elementwise in the recurrence, not multiplied with the activations as a weight matrix is."""


def classify_block_weights(model: nn.Module, routers: bool = False) -> list[BlockWeight]:
    """Every weight of two or more dimensions in the decoder blocks, classified (``BlockWeight``): the linears of
    ``find_linears`` and the fused experts of ``besa.model.experts`` (each expert's matrices) are pruned; routers (unless
    ``routers``, which prunes those built as linears), convolutions, embeddings, the experts' biases and state-space
    decays (``A_log``) are kept by rule;
    anything else is unknown. Reads shapes only, so a model on the meta device (``--stream``) works too."""
    experts = num_experts(getattr(model, "config", None))
    stated = _states_counts(model)
    found: list[BlockWeight] = []
    for block_name, block in find_blocks(model):
        counts = router_counts(block, experts, not stated)
        pruned = {id(layer.weight) for layer in find_linears(block, model, routers=routers).values()}
        fused = {id(getattr(m, n)): n for _, m in fused_experts(block) for n in projections(m)}
        slabs = {id(o._parameters[n]): unknown_slab(o, n) for _, o, n, _ in expert_slabs(block)}
        fused_bias = {
            id(getattr(m, f"{n}_bias")) for _, m in fused_experts(block) if m.has_bias for n in projections(m)
        }
        owner = {id(p): m for m in block.modules() for p in m.parameters(recurse=False)}
        done: set[int] = set()
        for name, param in block.named_parameters():
            if param.dim() < 2 or id(param) in done:
                continue
            done.add(id(param))
            why = ""
            module = owner[id(param)]
            shape = tuple(weight_matrix(module).shape) if is_prunable_linear(module) else tuple(param.shape)
            kept = next((rule for cls, rule in _KEPT_MODULES if isinstance(module, cls)), None)
            kept = kept or _KEPT_NAMES.get(name.rsplit(".", 1)[-1])
            kept = kept or (_NORM if "norm" in type(module).__name__.lower() else None)
            if id(param) in pruned:
                kind, rule = "pruned", "linear"
            elif id(param) in fused:  # each expert's matrix is pruned as a linear (besa.model.experts)
                kind, rule = "pruned", "experts"
            elif id(param) in fused_bias:
                kind, rule = "kept", "experts' bias"
            elif kept is not None:
                kind, rule = "kept", kept
            elif id(param) in slabs:  # one matrix per expert, multiplied as the probe forward showed
                seen = slabs[id(param)]
                kind, rule, why = (
                    ("pruned", "experts", "") if seen is None else ("unknown", "unknown layout", seen)
                )
            elif _is_router(shape, counts[name.rsplit(".", 1)[0] if "." in name else ""]):  # a bare parameter
                kind, rule = "kept", "router"
            else:
                kind, rule = "unknown", "unknown layout"
            found.append(BlockWeight(f"{block_name}.{name}", tuple(param.shape), kind, rule, why))
    return found


def pruned_matrices(model: nn.Module, routers: bool = True) -> dict[str, torch.Tensor]:
    """Every matrix the methods prune, by qualified name, as an (out, in) view: the linears of every block
    (``find_linears``; routers too unless ``routers`` is off) and each expert's matrices (``besa.model.experts``)."""
    found: dict[str, torch.Tensor] = {}
    for block_name, block in find_blocks(model):
        for name, layer in find_linears(block, model, routers=routers).items():
            found[f"{block_name}.{name}"] = weight_matrix(layer)
        found.update({f"{block_name}.{k}": w for k, w in block_expert_matrices(block).items()})
    return found


def unknown_weights(weights: list[BlockWeight]) -> list[BlockWeight]:
    """The weights no method knows how to prune."""
    return [w for w in weights if w.kind == "unknown"]


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view (``Conv1D`` stores it transposed)."""
    return layer.weight.data.t() if isinstance(layer, Conv1D) else layer.weight.data


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix into the layer's weight, in the weight's own dtype and layout."""
    weight_matrix(layer).copy_(w.to(layer.weight.dtype))
