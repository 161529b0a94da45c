"""Rotation ``--rotate pca``: before anything is pruned, turn the residual stream of the dense model by one orthogonal
matrix Q chosen from the calibration data, folded into the weights so the saved model keeps its architecture and
needs no change to run (as SliceGPT, QuaRot and DenoiseRotator fold theirs).

In a pre-norm decoder every block reads the stream through an RMS norm and writes back by adding a linear's output.
An RMS norm without its scale commutes with a rotation (||x Q|| = ||x||), so once every norm's scale is moved into
the linears that read it, the model computes the same function with the stream turned: the embedding becomes E Q,
every linear that reads a norm W Q, every linear that writes to the stream Q^T W (and its bias b Q), the output head
W Q (untied from the embedding when they were shared). Q is the principal axes of the normalised stream entering the
blocks (``pca_basis``), so the inputs the linears see are decorrelated and their energy concentrated in fewer
coordinates: more weights meet inputs that are nearly always small.

What reads the stream is found by tracing one short forward (which linear's input is which norm's output), never by
module names; the stream's writers are the block's other linears of the stream's width. An architecture where this
does not hold (a norm after a writer, as Gemma's sandwich norms; experts stored as 3-d tensors) is caught by
comparing the model's logits before and after on that forward, and refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from besa.errors import BesaError

__all__ = [
    "StreamMap",
    "is_rms_norm",
    "norm_scale",
    "unit_norm",
    "trace_stream",
    "normalised_covariance",
    "pca_basis",
    "fold_rotation",
    "rotate_model",
]

PROBE = 1e3
"""A constant input this large makes an RMS norm's eps negligible, so the norm returns its per-channel scale."""


def is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMS norm (any model's own class, found by its name) with a 1-d scale."""
    weight = getattr(module, "weight", None)
    return (
        "rmsnorm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1
    )


@torch.no_grad()
def norm_scale(norm: nn.Module) -> torch.Tensor:
    """The per-channel factor an RMS norm multiplies its normalised input by (``weight``, or ``1 + weight`` as
    Gemma's), read from the norm itself on a constant input."""
    weight = norm.weight
    probe = torch.full((1, weight.shape[0]), PROBE, dtype=weight.dtype, device=weight.device)
    return norm(probe)[0].float()


@torch.no_grad()
def unit_norm(norm: nn.Module) -> None:
    """Make ``norm`` scale-free (its output the normalised input): weight 1, or 0 where the norm adds 1 itself."""
    weight = norm.weight
    for value in (1.0, 0.0):
        weight.fill_(value)
        if torch.allclose(norm_scale(norm), torch.ones_like(weight, dtype=torch.float32), atol=1e-5):
            return
    raise BesaError(
        f"--rotate: cannot make the norm {type(norm).__name__} scale-free (neither weight 1 nor 0)"
    )


@dataclass
class StreamMap:
    """Who touches the residual stream: each norm (by module name) with the linears that read its output, and the
    linears inside the blocks that write to it."""

    readers: dict[str, list[str]] = field(default_factory=dict)
    writers: list[str] = field(default_factory=list)


@torch.no_grad()
def trace_stream(model: nn.Module, blocks: Iterable[str], probe_ids: torch.Tensor) -> StreamMap:
    """One forward of ``probe_ids`` with hooks: a linear reads norm N when its input is N's output tensor itself. The
    writers are the other linears inside ``blocks`` (qualified names) whose output has the stream's width."""
    hidden = model.get_input_embeddings().weight.shape[1]
    outputs: dict[tuple, str] = {}
    kept: list[
        torch.Tensor
    ] = []  # holds the traced tensors so that their memory is not reused during the trace
    fed: dict[str, tuple] = {}

    def key(
        t: torch.Tensor,
    ) -> tuple:  # a tensor or a full view of it (the head's input may be sliced with [:, -0:])
        return (t.data_ptr(), tuple(t.shape), t.stride())

    handles = []
    for name, module in model.named_modules():
        if is_rms_norm(module):

            def after_norm(_m, _args, out, name=name):
                if isinstance(out, torch.Tensor) and out.shape[-1] == hidden:
                    outputs[key(out)] = name
                    kept.append(out)

            handles.append(module.register_forward_hook(after_norm))
        elif isinstance(module, nn.Linear):

            def before_linear(_m, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    fed.setdefault(name, key(args[0]))
                    kept.append(args[0])

            handles.append(module.register_forward_pre_hook(before_linear))
    try:
        model(probe_ids)
    finally:
        for handle in handles:
            handle.remove()
    stream = StreamMap()
    for linear, tensor in fed.items():
        if tensor in outputs:
            stream.readers.setdefault(outputs[tensor], []).append(linear)
    read = {n for names in stream.readers.values() for n in names}
    prefixes = tuple(f"{b}." for b in blocks)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefixes) and name not in read:
            if module.out_features == hidden:
                stream.writers.append(name)
    return stream


def normalised_covariance(hidden: torch.Tensor) -> torch.Tensor:
    """Sum of x x^T over the tokens of ``hidden`` (..., d), each row first divided by its RMS (what an RMS norm
    passes on before its scale), in float64."""
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    x = x / x.square().mean(-1, keepdim=True).add(1e-12).sqrt()
    return x.t() @ x


def pca_basis(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, variances): Q (d, d) orthogonal, the eigenvectors of ``covariance`` as columns, largest eigenvalue first,
    each signed so that its largest entry is positive (the same Q for the same data on every machine), and the
    eigenvalues in that order."""
    values, vectors = torch.linalg.eigh(covariance.double())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    peak = vectors.abs().argmax(0)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs), values


@torch.no_grad()
def fold_rotation(
    model: nn.Module, blocks: Iterable[str], q: torch.Tensor, probe_ids: torch.Tensor, rtol: float = 1e-3
) -> dict[str, int]:
    """Turn ``model``'s residual stream by ``q`` (d, d), folded into its weights in place; return what was changed
    (norms made scale-free, readers, writers, whether the head was untied). Raises ``BesaError`` when the model's
    logits on ``probe_ids`` move by more than ``rtol`` of their scale: its architecture does not let the rotation
    fold (the model is then left half-turned: the run stops before anything is pruned or written)."""
    blocks = list(blocks)
    before = model(probe_ids).logits.double()
    stream = trace_stream(model, blocks, probe_ids)
    if not stream.readers or not stream.writers:
        raise BesaError(
            "--rotate: found no RMS norm read by a linear and written back by one; not a pre-norm model"
        )
    modules = dict(model.named_modules())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = head is not None and head.weight is embedding.weight
    if (
        untied
    ):  # the head gets its own copy: it will hold the final norm's scale and the rotation on its input
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    qd = q.double()
    for norm_name, readers in stream.readers.items():
        scale = norm_scale(modules[norm_name]).double()
        unit_norm(modules[norm_name])
        for reader in readers:
            w = modules[reader].weight
            w.copy_(((w.double() * scale) @ qd).to(w.dtype))
    for writer in stream.writers:
        module = modules[writer]
        module.weight.copy_((qd.t() @ module.weight.double()).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_((module.bias.double() @ qd).to(module.bias.dtype))
    embedding.weight.copy_((embedding.weight.double() @ qd).to(embedding.weight.dtype))
    after = model(probe_ids).logits.double()
    error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if not error <= rtol:
        raise BesaError(
            f"--rotate: this architecture does not fold a rotation of its residual stream (the logits moved by "
            f"{error:.2g} of their scale; a norm after a writer, or weights that are not linear layers)"
        )
    return {
        "norms": len(stream.readers),
        "readers": sum(len(r) for r in stream.readers.values()),
        "writers": len(stream.writers),
        "untied_head": int(untied),
        "max_logit_change": error,  # type: ignore[dict-item]
    }


def rotate_model(
    model: nn.Module, calib_ids: torch.Tensor, device: torch.device, forward_batch: int, progress: bool
) -> dict[str, float]:
    """``--rotate pca``: the normalised stream entering every block on the calibration windows (one dense pass,
    block by block; summed over the processes of a torchrun), its principal axes as Q, folded into ``model``."""
    from besa.engine import distributed
    from besa.engine.pipeline import run_sequential
    from besa.model.blocks import find_blocks

    names = [name for name, _ in find_blocks(model)]
    width = model.get_input_embeddings().weight.shape[1]
    covariance = torch.zeros(width, width, dtype=torch.float64)

    def measure(work) -> None:  # statistics only: the block stays dense
        for batch in work.inputs:
            covariance.add_(normalised_covariance(batch.to(torch.float64)).cpu())

    run_sequential(model, calib_ids, measure, device, forward_batch, progress)
    covariance = distributed.sum_(covariance)
    q, values = pca_basis(covariance)
    facts = fold_rotation(model, names, q.to(torch.float32), calib_ids[:1, :32])
    top = values[: max(1, width // 10)].sum() / values.sum()
    return {**facts, "variance_in_top_tenth": round(float(top), 4)}
