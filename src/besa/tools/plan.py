"""``besa plan``: the memory a pruning run will need, from the model's config alone (no weights are read).

The model is built on the meta device (shapes, no storage), its blocks and linears found as the engine finds them,
and every stage's peak is a sum of tensor sizes in pure functions below. Figures are the tensors the run keeps
(weights, activations, statistics, a method's own state, optimizer state); Python, torch and the libraries add
about half a GiB of process memory on a CPU, not counted. What a method holds and runs of its own while it prunes
a block, its pruner says (``Pruner.method_cost``, ``besa.methods.cost``); the rest is the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from besa.methods.cost import ADAM_COPIES, BlockShape
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.model.experts import block_expert_matrices
from besa.model.loading import resolve_dtype

if TYPE_CHECKING:
    from besa.methods.base import Pruner
    from besa.settings.commands import PlanConfig

__all__ = ["ModelShape", "Plan", "model_shape", "plan_run", "format_plan", "largest_block", "block_step"]

# The KL stage's backward keeps, per token, each block's input; the block backward is in recomputes about this many
# hidden-size vectors per token (the inputs of the linears, norms and activation function; not the attention
# matrices, which SDPA does not keep).
KL_SAVED_PER_TOKEN_BLOCK = 16

# The KL stage's Adam keeps moments of the kept weights only: planned at half of them (50% and 2:4).
KL_KEPT = 0.5

# The logits of a chunk of positions live in about this many float32 copies at once (the logits, their
# log-normaliser's work, the coarsened tail's, and their gradient).
KL_LOGIT_COPIES = 4


@dataclass
class ModelShape:
    """What the plan needs to know about a model: every block's linears as (out, in), and the sizes of the rest."""

    architecture: str
    hidden: int
    blocks: list[dict[str, tuple[int, int]]]
    block_params: list[int]
    outside_params: int
    groups: list[list[list[str]]] = field(default_factory=list)  # per block: linears fed the same input
    vocab: int = 0  # rows of the output head (the logits per token)

    @property
    def total_params(self) -> int:
        return self.outside_params + sum(self.block_params)


def model_shape(config: Any) -> ModelShape:
    """Build ``config``'s model on the meta device and read its shapes (generic: any decoder ``besa`` prunes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shape_of(model)


def shape_of(model: nn.Module) -> ModelShape:
    """The shapes of a built model (meta or real)."""
    named = find_blocks(model)
    inside = {id(p) for _, b in named for p in b.parameters()}
    outside = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in inside)
    blocks, params, groups = [], [], []
    for _, block in named:
        linears = find_linears(block, model)
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in linears.items()}
        # every expert's matrices are pruned as linears
        shapes.update({key: tuple(w.shape) for key, w in block_expert_matrices(block, unshown=True).items()})
        blocks.append(shapes)
        params.append(sum(p.numel() for p in block.parameters()))
        groups.append(_input_groups(shapes))
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else getattr(model.config, "vocab_size", 0)
    return ModelShape(type(model).__name__, int(hidden), blocks, params, outside, groups, int(vocab))


def _input_groups(shapes: dict[str, tuple[int, int]]) -> list[list[str]]:
    """Linears that read the same input, by the engine's naming (q/k/v, gate/up): same parent and input width."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, (_out, inp) in shapes.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault((parent, inp), []).append(name)
    return list(groups.values())


@dataclass
class Plan:
    """Bytes of each part of a run, where they live (``host`` RAM or the compute ``device``), the peaks, and the
    block forwards the run costs."""

    rows: list[tuple[str, int, str]]
    peaks: dict[str, int]
    forwards: float
    notes: list[str]


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def activation_bytes(nsamples: int, seqlen: int, hidden: int, element: int, stores: int) -> int:
    """The calibration activations: ``stores`` copies of (N, T, H) (a block's inputs and outputs; two more with the
    dense stream)."""
    return stores * nsamples * seqlen * hidden * element


def kl_stage_bytes(
    shape: ModelShape, nsamples: int, seqlen: int, compute: int, batch: int, topk: int
) -> dict[str, int]:
    """The optional KL stage (``--kl-epochs``), after every block is pruned (``besa.stages.distill``): the whole
    model; ``KeptAdam``'s two float32 moments of the kept weights (``KL_KEPT`` of the blocks' linears) and their
    masks (a bit per weight; the best epoch's kept values go to a temporary file); one batch's block inputs, one
    block's recomputed activations and one chunk of logits; and the dense model's top-k targets of every window
    (int32 ids, float32 log-probabilities and the bucket)."""
    from besa.stages.distill import LOGIT_ELEMENTS

    trained = sum(o * i for block in shape.blocks for o, i in block.values())
    kept = int(trained * KL_KEPT)
    tokens = min(batch, nsamples) * seqlen
    return {
        "KL stage: the whole model": shape.total_params * compute,
        "KL stage: Adam's moments of the kept weights (half), their masks": kept * 8 + -(-trained // 8),
        "KL stage: one batch's block inputs, a block's activations, a chunk of logits": (
            tokens * shape.hidden * compute * (len(shape.blocks) + KL_SAVED_PER_TOKEN_BLOCK)
            + KL_LOGIT_COPIES * min(LOGIT_ELEMENTS, tokens * max(shape.vocab, 1)) * 4
        ),
        "KL stage: the dense targets": nsamples * seqlen * (4 * topk + 4 * (topk + 1)),
    }


def largest_block(shape: ModelShape) -> BlockShape:
    """The model's block with the most parameters, as a method sees it (``Pruner.method_cost``)."""
    i = max(range(len(shape.blocks)), key=lambda i: shape.block_params[i])
    return BlockShape(shape.blocks[i], shape.groups[i], shape.block_params[i])


def block_step(block: BlockShape, pruner: Pruner) -> tuple[dict[str, int], float]:
    """One block step of ``pruner``'s run: the working sets (bytes by label: the method's own, then the refit's
    Adam state) and the block forwards over the calibration set it costs (a backward counts as two): the statistics
    pass and the propagation, about three quarters of a block more when the groups of a block are calibrated one
    after the other (each group's pass is cut after the group), the method's own, the refit's training and its
    target; none when the blocks never run on the calibration windows."""
    cost = pruner.method_cost(block)
    work = dict(cost.work)
    refit = pruner.refit
    if refit is not None:
        work["refit: Adam state of the block"] = ADAM_COPIES * block.params * 4
    if not pruner.engine_uses_data:
        return work, 0.0
    forwards = 2.0 + (0.75 if pruner.within_block == "sequential" else 0.0) + cost.forwards
    if refit is not None:
        forwards += 3.0 * refit.epochs + 1.0
    return work, forwards


def plan_run(shape: ModelShape, cfg: PlanConfig, pruner: Pruner, stored: torch.dtype) -> Plan:
    """The memory plan of the run ``cfg`` describes, pruned by ``pruner`` (built from ``cfg.prune_config()`` and its
    method's defaults), of a model stored in ``stored``. On a CPU the host is the device: its peak is the weights +
    the activations + the largest working set of a block step. On CUDA the host keeps the model as stored (or,
    streamed, what lies outside the blocks) and the activations; the device one block, what lies outside the blocks
    (for the embedding pass), one forward batch and the working set. The KL stage (``--kl-epochs``) comes after the
    blocks (given, or the method's default: ``Pruner.kl_settings``): its peak is compared with theirs."""
    device = cfg.device.split(":")[0]
    compute = resolve_dtype(cfg.runtime.dtype, torch.device(device))
    work, forwards = block_step(largest_block(shape), pruner)
    rows, peaks = _block_rows(shape, cfg, pruner, compute, stored, work)
    notes = ["a block's stages run one after the other: a peak counts the largest working set, not their sum"]
    if pruner.kl_settings(cfg.stream).epochs:  # after the blocks: the whole model trains, the stores are gone
        _add_kl_stage(rows, peaks, shape, cfg, dtype_bytes(compute), dtype_bytes(stored))
        notes.append("the KL stage runs after the blocks: its peak is compared with theirs, not added")
    if device == "cpu":
        notes.append("--max-memory spills activations beyond it to disk")
    return Plan(rows, peaks, forwards * len(shape.blocks), notes)


def _block_rows(
    shape: ModelShape, cfg: PlanConfig, pruner: Pruner, compute: torch.dtype, stored: torch.dtype,
    work: dict[str, int],
) -> tuple[list[tuple[str, int, str]], dict[str, int]]:  # fmt: skip
    """The rows and peaks of the blocks' pruning: weights, activations, a forward batch, the working sets."""
    c, s = dtype_bytes(compute), dtype_bytes(stored)
    nsamples, seqlen = cfg.calibration.nsamples, cfg.calibration.seqlen
    uses_data, dense_stream = pruner.engine_uses_data, pruner.needs_dense_stream
    block = max(shape.block_params)
    acts = activation_bytes(nsamples, seqlen, shape.hidden, c, 4 if dense_stream else 2) if uses_data else 0
    largest_work = max(work.values()) if work else 0
    name_c = str(compute).replace("torch.", "")
    rows: list[tuple[str, int, str]] = []
    if cfg.device.split(":")[0] == "cpu":
        weights = shape.outside_params * s + block * c if cfg.stream else shape.total_params * c
        label = "outside the blocks as stored + one block" if cfg.stream else f"the whole model in {name_c}"
        rows.append((f"weights: {label}", weights, "host"))
        if uses_data:
            rows.append((_acts_label(nsamples, seqlen, dense_stream), acts, "host"))
        rows += [(k, v, "host") for k, v in work.items()]
        return rows, {"host": weights + acts + largest_work}
    host_weights = shape.outside_params * s if cfg.stream else shape.total_params * s
    rows.append(("weights as stored" + (": outside the blocks" if cfg.stream else ""), host_weights, "host"))
    if uses_data:
        rows.append((_acts_label(nsamples, seqlen, dense_stream), acts, "host"))
    on_device = shape.outside_params * c + block * c
    forward_batch = min(cfg.runtime.forward_batch, nsamples)
    batch = activation_bytes(forward_batch, seqlen, shape.hidden, c, 2) if uses_data else 0
    rows.append((f"one block + what lies outside the blocks, in {name_c}", on_device, "device"))
    rows.append((f"one forward batch ({forward_batch} x {seqlen}, in and out)", batch, "device"))
    rows += [(k, v, "device") for k, v in work.items()]
    return rows, {"host": host_weights + acts, "device": on_device + batch + largest_work}


def _add_kl_stage(
    rows: list[tuple[str, int, str]],
    peaks: dict[str, int],
    shape: ModelShape,
    cfg: PlanConfig,
    c: int,
    s: int,
) -> None:
    """The KL stage's rows, and its peaks where they exceed the blocks' (``c``, ``s``: bytes per computed and
    stored value)."""
    kl = kl_stage_bytes(shape, cfg.calibration.nsamples, cfg.calibration.seqlen, c, cfg.kl.batch, cfg.kl.topk)
    cpu = cfg.device.split(":")[0] == "cpu"
    rows += [(k, v, ("host" if cpu else "device") if "targets" not in k else "host") for k, v in kl.items()]
    on_where = sum(v for k, v in kl.items() if "targets" not in k)
    targets = kl["KL stage: the dense targets"]
    if cpu:
        peaks["host"] = max(peaks["host"], on_where + targets)
    else:
        peaks["device"] = max(peaks["device"], on_where)
        peaks["host"] = max(peaks["host"], shape.total_params * s + targets)


def _acts_label(nsamples: int, seqlen: int, dense_stream: bool) -> str:
    return (
        f"calibration activations ({nsamples} x {seqlen}{', and the dense stream' if dense_stream else ''})"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_plan(name: str, shape: ModelShape, plan: Plan, stored: torch.dtype) -> str:
    """The plan as the command prints it."""
    lines = [
        f"{name}: {shape.architecture}, {len(shape.blocks)} blocks, {shape.total_params / 1e9:.2f} B parameters "
        f"({shape.total_params * dtype_bytes(stored) / 2**30:.1f} GiB in {str(stored).replace('torch.', '')})",
    ]
    width = max(len(r) for r, _, _ in plan.rows) + 9
    lines += [f"  {f'[{where}] {label}':<{width}}  {_gib(n)}" for label, n, where in plan.rows]
    for where, n in plan.peaks.items():
        lines.append(f"  {f'peak, {where}':<{width}}  {_gib(n)}")
    lines.append(
        f"  work: about {plan.forwards:.0f} block forwards over the calibration set "
        f"({plan.forwards / len(shape.blocks):.2f} per block)"
    )
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
