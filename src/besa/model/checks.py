"""Checks of a loaded model before any work: an N:M pattern must divide every pruned width, experts must be laid
out in a way besa can follow, and every block weight is classified (pruned, kept by rule, unknown), with what
stays dense said up front."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from besa.errors import BesaError
from besa.model.blocks import (
    BlockWeight,
    classify_block_weights,
    find_blocks,
    pruned_matrices,
    unknown_weights,
)
from besa.model.data import is_text_file
from besa.model.experts import expert_slabs, learn_expert_layouts
from besa.model.loading import resolve_model
from besa.settings.values import NMPattern

__all__ = [
    "check_pattern_fits",
    "check_pooled_stats",
    "check_weights",
    "dense_weights_message",
    "inputs_read",
    "learn_experts",
]


def check_pattern_fits(model: nn.Module, nm: NMPattern | None, routers: bool) -> None:
    """Refuse an N:M pattern that does not divide the input width of a linear to prune."""
    if nm is None:
        return
    for name, w in pruned_matrices(model, routers=routers).items():
        width = w.shape[1]
        if width % nm.m:
            raise BesaError(f"--pattern {nm} does not divide the input width {width} of {name}")


def learn_experts(model: nn.Module, streamed: bool) -> list[str]:
    """Learn how the model's own forward multiplies experts no class records (one short forward,
    ``learn_expert_layouts``); return those stacks' names. A streamed model cannot run that forward: refused."""
    stacked = [f"{b}.{p}.{n}" for b, block in find_blocks(model) for p, _, n, _ in expert_slabs(block)]
    if streamed and stacked:
        raise BesaError(
            f"--stream cannot prune {stacked[0]}: experts the model's own forward multiplies show their layout in a "
            "forward of the whole model, which a streamed model cannot run; run without --stream"
        )
    if not streamed:
        learn_expert_layouts(model, find_blocks(model))
    return stacked


def check_pooled_stats(stacked: list[str]) -> None:
    """``--expert-stats pooled`` runs every expert on every token: only for experts transformers dispatches."""
    if stacked:
        raise BesaError(
            f"--expert-stats pooled runs every expert on every token, which besa can do only for experts transformers "
            f"dispatches (use_experts_implementation); {stacked[0]} is multiplied by the model's own forward: use "
            "--expert-stats routed"
        )


def check_weights(model: nn.Module, routers: bool, leave_unknown_dense: bool) -> list[BlockWeight]:
    """Classify every block weight before any work (``classify_block_weights``): stop at one no method can prune
    unless ``leave_unknown_dense``."""
    weights = classify_block_weights(model, routers=routers)
    unknown = unknown_weights(weights)
    if unknown and not leave_unknown_dense:
        first = unknown[0]
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        why = f" ({first.why})" if first.why else ""
        raise BesaError(
            f"block weight {first.name} {list(first.shape)} has a layout besa cannot prune yet{why}{more} (no method "
            "would touch it, so the run would report a sparsity it does not have); pass --leave-unknown-dense to "
            "keep such weights dense on purpose"
        )
    return weights


def dense_weights_message(weights: list[BlockWeight]) -> str | None:
    """The line a run says before its work about the block weights that stay dense (``None``: none do)."""
    dense = [w for w in weights if w.kind != "pruned"]
    if dense:
        total = sum(w.numel for w in weights)
        kept = sum(w.numel for w in dense)
        rules: dict[str, int] = {}
        for w in dense:
            rules[w.rule] = rules.get(w.rule, 0) + 1
        said = ", ".join(f"{n} {rule}{'s' * (n > 1)}" for rule, n in rules.items())
        return (
            f"besa prune: {len(dense)} block weights ({kept / total:.1%} of the blocks' weights) stay dense: {said} "
            f"(e.g. {dense[0].name}); the report lists them"
        )
    return None


def inputs_read(model: str | nn.Module, calib: str, reads_calibration: bool) -> dict[str, Path]:
    """What a run reads from disk (name -> path), which no place it writes may overlap. A missing model path
    fails here, before anything is loaded."""
    found: dict[str, Path] = {}
    if isinstance(model, str):
        source = resolve_model(model)
        if source.kind != "hub":
            found["the input model"] = Path(source.location)
    if reads_calibration and is_text_file(calib):
        found["the calibration file"] = Path(calib)
    return found
