"""``besa plan``: the memory a pruning run will need, from the model's config alone (no weights are read).

The model is built on the meta device (shapes, no storage), its blocks and linears found as the engine finds them,
and every stage's peak is a sum of tensor sizes in pure functions below. Figures are the tensors the run keeps
(weights, activations, statistics, BESA's per-weight state, optimizer state); Python, torch and the libraries add
about half a GiB of process memory on a CPU, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.model.experts import block_expert_matrices

__all__ = [
    "ModelShape", "Plan", "model_shape", "plan_run", "format_plan", "BESA_BYTES_PER_WEIGHT",
    "BESA_BACKWARD_BYTES_PER_WEIGHT",
]  # fmt: skip

# BESA's state per weight of the block it trains: each weight's rank in its row (int32) and first pruning candidate
# (int16), and in a step the masked weight the forward keeps for the backward (float32).
BESA_BYTES_PER_WEIGHT = 4 + 2 + 4
# ... plus, for one linear at a time in the backward, its weight gradient, the keep gradient and the widened index.
BESA_BACKWARD_BYTES_PER_WEIGHT = 4 + 4 + 8
# Adam keeps a gradient and two moments per trained weight (the refit trains the block's weights).
ADAM_COPIES = 3
# The KL stage's backward keeps, per token and block, about this many hidden-size vectors (the inputs of the
# linears, norms and activation function; not the attention matrices, which SDPA does not keep).
KL_SAVED_PER_TOKEN_BLOCK = 16


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


LSQ_CHUNK = 1024
"""Rows per chunk of ``besa.stages.update.masked_least_squares`` (its default)."""


def hessian_bytes(
    shapes: dict[str, tuple[int, int]], groups: list[list[str]], sequential: bool, lsq: bool = False
) -> int:
    """SparseGPT/OBS statistics: one (in, in) sum per linear, kept in float64; all at once when parallel, one
    group's at a time when sequential (``groups`` may over-group: then this is an upper bound); plus the largest
    layer's working set: its float32 Hessian and inverse in the sweep, or (``lsq``, after the sweep) the
    least-squares solve's float32 Hessian and its six float32 copies of up to ``LSQ_CHUNK`` rows."""
    per = {n: inp * inp for n, (_o, inp) in shapes.items()}
    held = max(sum(per[n] for n in g) for g in groups) if sequential else sum(per.values())
    sweep = 2 * 4 * max(per.values())
    solve = max(4 * i * i + 6 * 4 * min(o, LSQ_CHUNK) * i for o, i in shapes.values()) if lsq else 0
    return 8 * held + max(sweep, solve)


def kl_stage_bytes(
    shape: ModelShape, nsamples: int, seqlen: int, compute: int, batch: int, topk: int
) -> dict[str, int]:
    """The optional KL stage (``--kl-epochs``), after every block is pruned: the whole model, Adam's state of the
    blocks' linears (float32), one batch's saved activations and logits (with their gradient and softmax), and the
    dense model's top-k targets of every window (int32 ids, float32 log-probabilities and the bucket)."""
    trained = sum(o * i for block in shape.blocks for o, i in block.values())
    tokens = min(batch, nsamples) * seqlen
    return {
        "KL stage: the whole model": shape.total_params * compute,
        "KL stage: Adam state of the blocks' linears": ADAM_COPIES * trained * 4,
        "KL stage: one batch's activations and logits": (
            tokens * shape.hidden * compute * KL_SAVED_PER_TOKEN_BLOCK * len(shape.blocks)
            + 3 * tokens * shape.vocab * 4
        ),
        "KL stage: the dense targets": nsamples * seqlen * (4 * topk + 4 * (topk + 1)),
    }


def block_forwards(method: str, epochs: int, refit_epochs: int, within_block: str) -> float:
    """Block forwards over the calibration set per block (a backward counts as two): the work of a run."""
    base = 2.0  # the statistics pass and the propagation
    if within_block == "sequential":
        base += 0.75  # each group's pass is cut after the group: about three quarters of a block more
    if method == "besa":
        base += 3.0 * epochs + 1.0  # training (forward + backward) and the dense target
    if refit_epochs:
        base += 3.0 * refit_epochs + 1.0
    return base


def plan_run(
    shape: ModelShape, method: str, nsamples: int, seqlen: int, compute: torch.dtype, stored: torch.dtype,
    stream: bool, device: str = "cpu", forward_batch: int = 8, epochs: int = 1, refit_epochs: int = 0,
    within_block: str = "parallel", weight_update: str | None = None, uses_data: bool = True,
    dense_stream: bool = False, kl_epochs: int = 0, kl_batch: int = 4, kl_topk: int = 64, lsq: bool = False,
) -> Plan:  # fmt: skip
    """The memory plan of one run. On a CPU the host is the device: its peak is the weights + the activations +
    the largest working set of a block step. On CUDA the host keeps the model as stored (or, streamed, what lies
    outside the blocks) and the activations; the device one block, what lies outside the blocks (for the
    embedding pass), one forward batch and the working set."""
    c, s = dtype_bytes(compute), dtype_bytes(stored)
    block = max(shape.block_params)
    largest = max(range(len(shape.blocks)), key=lambda i: shape.block_params[i])
    shapes, groups = shape.blocks[largest], shape.groups[largest]
    acts = activation_bytes(nsamples, seqlen, shape.hidden, c, 4 if dense_stream else 2) if uses_data else 0
    linear_weights = sum(o * i for o, i in shapes.values())
    work: dict[str, int] = {}
    if method in ("wanda", "magnitude"):
        work["scores of the largest linear (float32)"] = 4 * max(o * i for o, i in shapes.values())
    if method == "sparsegpt" or weight_update == "obs":
        work[
            "Hessians (float64 sums)" + (", one group at a time" if within_block == "sequential" else "")
        ] = hessian_bytes(shapes, groups, within_block == "sequential", lsq)
    if method == "besa":
        work["BESA's per-weight state"] = (
            BESA_BYTES_PER_WEIGHT * linear_weights
            + BESA_BACKWARD_BYTES_PER_WEIGHT * max(o * i for o, i in shapes.values())
        )
    if refit_epochs:
        work["refit: Adam state of the block"] = ADAM_COPIES * block * 4
    largest_work = max(work.values()) if work else 0
    name_c = str(compute).replace("torch.", "")
    rows: list[tuple[str, int, str]] = []
    if device == "cpu":
        weights = shape.outside_params * s + block * c if stream else shape.total_params * c
        label = "outside the blocks as stored + one block" if stream else f"the whole model in {name_c}"
        rows.append((f"weights: {label}", weights, "host"))
        if uses_data:
            rows.append((_acts_label(nsamples, seqlen, dense_stream), acts, "host"))
        rows += [(k, v, "host") for k, v in work.items()]
        peaks = {"host": weights + acts + largest_work}
    else:
        host_weights = shape.outside_params * s if stream else shape.total_params * s
        rows.append(("weights as stored" + (": outside the blocks" if stream else ""), host_weights, "host"))
        if uses_data:
            rows.append((_acts_label(nsamples, seqlen, dense_stream), acts, "host"))
        on_device = shape.outside_params * c + block * c
        batch = activation_bytes(min(forward_batch, nsamples), seqlen, shape.hidden, c, 2) if uses_data else 0
        rows.append((f"one block + what lies outside the blocks, in {name_c}", on_device, "device"))
        rows.append(
            (f"one forward batch ({min(forward_batch, nsamples)} x {seqlen}, in and out)", batch, "device")
        )
        rows += [(k, v, "device") for k, v in work.items()]
        peaks = {"host": host_weights + acts, "device": on_device + batch + largest_work}
    notes = ["a block's stages run one after the other: a peak counts the largest working set, not their sum"]
    if kl_epochs:  # after the blocks: the whole model trains on the device; the engine's stores are gone
        kl = kl_stage_bytes(shape, nsamples, seqlen, c, kl_batch, kl_topk)
        where = "host" if device == "cpu" else "device"
        rows += [(k, v, where if "targets" not in k else "host") for k, v in kl.items()]
        on_where = sum(v for k, v in kl.items() if "targets" not in k)
        targets = kl["KL stage: the dense targets"]
        if device == "cpu":
            peaks["host"] = max(peaks["host"], on_where + targets)
        else:
            peaks["device"] = max(peaks["device"], on_where)
            peaks["host"] = max(peaks["host"], shape.total_params * s + targets)
        notes.append("the KL stage runs after the blocks: its peak is compared with theirs, not added")
    if device == "cpu":
        notes.append("--max-memory spills activations beyond it to disk")
    forwards = block_forwards(method, epochs, refit_epochs, within_block) if uses_data else 0.0
    return Plan(rows, peaks, forwards * len(shape.blocks), notes)


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
