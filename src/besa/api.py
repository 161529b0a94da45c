"""The Python API: ``prune`` (keywords) around ``prune_with`` (dataclasses); ``evaluate`` lives in ``evaluation``."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine import distributed
from besa.engine.activations import MemoryBudget
from besa.engine.checkpoint import RunFolder, model_digest, tensor_digest
from besa.engine.pipeline import run_sequential
from besa.engine.record import RunRecord
from besa.engine.streaming import BlockStreamer, count_streamed, open_streamed, save_streamed
from besa.errors import BesaError
from besa.evaluation.perplexity import evaluate
from besa.fileio import write_error, write_json_atomic
from besa.formats.compressed import check_compressible
from besa.model.blocks import (
    BlockWeight,
    classify_block_weights,
    find_blocks,
    pruned_matrices,
    unknown_weights,
)
from besa.model.data import is_text_file, load_calibration_documents, resolve_bos, sample_windows, with_bos
from besa.model.experts import expert_slabs, learn_expert_layouts
from besa.model.loading import (
    check_seqlen,
    model_folder,
    prepare_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from besa.output.report import build_report
from besa.output.saving import REPORT_NAME, save_pruned
from besa.registry import get_method
from besa.settings.build import build_settings
from besa.settings.config import PruneConfig
from besa.settings.options import RunOptions
from besa.settings.recipe import Recipe, load_recipe, recipe_text
from besa.stages.distill import DistillSpec, distill, teacher_targets

__all__ = ["PruneResult", "prune", "prune_with", "evaluate"]

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned model (on the CPU), its tokenizer, the report, and the output folder if one was written.

    ``model`` is ``None`` after a streamed run (``stream=True``): the pruned model is the one written to ``out``.
    In a data-parallel run (``torchrun``) only rank 0 gets the report; the other ranks get an empty one.
    """

    model: nn.Module | None
    tokenizer: Any
    report: dict[str, Any]
    out: Path | None


def _check_pattern_fits(model: nn.Module, config: PruneConfig) -> None:
    nm = config.nm
    if nm is None:
        return
    for name, w in pruned_matrices(model, routers=config.prune_routers).items():
        width = w.shape[1]
        if width % nm.m:
            raise BesaError(f"--pattern {nm} does not divide the input width {width} of {name}")


def _check_weights(model: nn.Module, config: PruneConfig) -> list[BlockWeight]:
    """Classify every block weight before any work (``classify_block_weights``): stop at one no method can prune
    unless ``leave_unknown_dense``, and say up front what stays dense."""
    weights = classify_block_weights(model, routers=config.prune_routers)
    unknown = unknown_weights(weights)
    if unknown and not config.leave_unknown_dense:
        first = unknown[0]
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        why = f" ({first.why})" if first.why else ""
        raise BesaError(
            f"block weight {first.name} {list(first.shape)} has a layout besa cannot prune yet{why}{more} (no method "
            "would touch it, so the run would report a sparsity it does not have); pass --leave-unknown-dense to "
            "keep such weights dense on purpose"
        )
    dense = [w for w in weights if w.kind != "pruned"]
    if dense:
        total = sum(w.numel for w in weights)
        kept = sum(w.numel for w in dense)
        rules: dict[str, int] = {}
        for w in dense:
            rules[w.rule] = rules.get(w.rule, 0) + 1
        said = ", ".join(f"{n} {rule}{'s' * (n > 1)}" for rule, n in rules.items())
        message = (
            f"besa prune: {len(dense)} block weights ({kept / total:.1%} of the blocks' weights) stay dense: {said} "
            f"(e.g. {dense[0].name}); the report lists them"
        )
        if distributed.world().writer:  # with or without progress bars: a skip is said before the work, once
            tqdm.write(message, file=sys.stderr)
    return weights


def prune(
    model: str | nn.Module,
    *,
    method: str | None = None,
    tokenizer: Any = None,
    calib_ids: torch.Tensor | None = None,
    method_options: dict[str, Any] | None = None,
    recipe: str | Path | Recipe | None = None,
    **settings: Any,
) -> PruneResult:
    """Prune a causal LM block by block and optionally save it.

    Args:
        model: a model spec (local folder, hub id, ``.gguf`` file, ``smollm2-135m``) or a loaded model (then pass
            ``tokenizer``).
        method: a registered method name (default: the recipe's, else ``wanda``).
        calib_ids: pre-tokenized calibration windows (N, T) instead of sampling from ``calib``.
        method_options: the method's own settings (e.g. SparseGPT ``blocksize``); they may also be given as
            keywords.
        settings: the fields of ``PruneConfig`` (``sparsity``, ``pattern``, ``calib``, ``nsamples``, ``seqlen``,
            ``wbits``, ...), of ``RunOptions`` (``out``, ``overwrite``, ``run_dir``, ``resume``, ``checkpoint``,
            ``max_memory``, ``save_quantized``, ``progress``, ...) and of the method's config, each with its
            dataclass's default.
        recipe: a recipe file (or a loaded ``Recipe``): its settings replace the defaults; the keywords given
            here replace the recipe's. Every saved run writes its resolved recipe (``besa_recipe.yaml``).

    Returns a ``PruneResult``; see ``prune_with`` for the same call with the dataclasses built.

    Example:
        >>> result = besa.prune("smollm2-135m", method="wanda", sparsity=0.5, nsamples=16, seqlen=256, out="pruned")
    """
    base = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    if base is not None and base.calibration_ids is not None:
        if calib_ids is None or _ids_digest(calib_ids) != base.calibration_ids:
            raise BesaError(
                "the recipe's run was calibrated on token ids given to the Python API (calibration_ids "
                f"{base.calibration_ids[:19]}...): pass the same calib_ids"
            )
    config, method_config, options = build_settings(method, settings, method_options, base)
    return prune_with(model, config, method_config, options, tokenizer=tokenizer, calib_ids=calib_ids)


def prune_with(
    model: str | nn.Module,
    config: PruneConfig,
    method_config: Any,
    run_options: RunOptions | None = None,
    *,
    tokenizer: Any = None,
    calib_ids: torch.Tensor | None = None,
) -> PruneResult:
    """The core of ``prune``: every setting already in its dataclass. Checks everything it will write first."""
    t_start = time.perf_counter()
    options = run_options or RunOptions()
    given_ids = calib_ids is not None
    if options.save_quantized and config.quant is None:
        raise BesaError("--save-quantized needs --wbits between 2 and 8")
    if options.stream and config.kl_epochs:
        raise BesaError("--kl-epochs trains the whole model at once: it cannot run with --stream")
    spec = get_method(config.method)
    pruner = spec.pruner_cls(method_config, config)  # a method may refuse the shared settings (e.g. N:M)
    needs_data = pruner.needs_calibration or config.kl_epochs > 0  # the KL stage trains on the windows
    where = options.resolve(needs_data, _inputs(model, config, needs_data and calib_ids is None))
    compute_device = resolve_device(config.device)
    ranks = distributed.start(compute_device)  # torchrun: join the process group (one process: nothing)
    timings: dict[str, Any] = {}
    t = time.perf_counter()
    documents = load_calibration_documents(config.calib) if needs_data and calib_ids is None else None
    timings["read_calibration"] = time.perf_counter() - t
    window = calib_ids.shape[1] if calib_ids is not None else config.seqlen
    if needs_data:
        check_seqlen(model, window)  # from the model's config alone, before its weights are loaded
    if options.progress:
        _announce(config, calib_ids, needs_data, pruner.engine_uses_data)
    t = time.perf_counter()
    streamer = None
    if options.stream:
        if not isinstance(model, str):
            raise BesaError("--stream reads the model from its files: give a model folder, hub id or .gguf")
        folder, source = model_folder(model)
        model, tokenizer, streamer = open_streamed(
            folder, resolve_dtype(config.dtype, compute_device), options.trust_remote_code
        )
    else:
        model, tokenizer, source = prepare_model(
            model, tokenizer, resolve_dtype(config.dtype, compute_device), options.trust_remote_code
        )
    timings["load_model"] = time.perf_counter() - t
    _check_pattern_fits(model, config)
    stacked = [f"{b}.{p}.{n}" for b, block in find_blocks(model) for p, _, n, _ in expert_slabs(block)]
    if options.stream and stacked:
        raise BesaError(
            f"--stream cannot prune {stacked[0]}: experts the model's own forward multiplies show their layout in a "
            "forward of the whole model, which a streamed model cannot run; run without --stream"
        )
    if not options.stream:  # how a model's own forward multiplies experts no class records: one short forward
        learn_expert_layouts(model, find_blocks(model))
    weights = _check_weights(model, config)
    if stacked and config.expert_stats == "pooled":
        raise BesaError(
            f"--expert-stats pooled runs every expert on every token, which besa can do only for experts transformers "
            f"dispatches (use_experts_implementation); {stacked[0]} is multiplied by the model's own forward: use "
            "--expert-stats routed"
        )
    if options.save_format == "compressed-tensors" and where.out is not None:
        check_compressible(model, config.quant)
    if needs_data:
        check_seqlen(model, window)  # again, now that the config is known whatever the source
    t = time.perf_counter()
    run, record = None, RunRecord()
    spill = (where.run_dir / "spill" / (f"r{ranks.rank}" if ranks.active else "")) if where.run_dir else None
    budget = MemoryBudget(limit=where.memory_limit, spill_root=spill)
    bos = None
    if documents is not None:
        bos = resolve_bos(config.bos, tokenizer)
        calib_ids = _sample(documents, tokenizer, config, bos)
    timings["sample_calibration"] = time.perf_counter() - t
    # data parallel: this rank's whole forward batches of the windows (all of them in one process)
    local_ids = distributed.shard_windows(calib_ids, config.forward_batch) if calib_ids is not None else None
    # data-free methods run through the engine, no data
    engine_ids = local_ids if pruner.engine_uses_data else None
    if where.run_dir is not None and (engine_ids is not None or streamer is not None):
        run = _open_run(
            where.run_dir, model, config, method_config, calib_ids if engine_ids is not None else None, record,
            options.resume or options.redo_from is not None, streamer, options.redo_from,
        )  # fmt: skip
    resumed, kl_facts = _run_stages(
        model, pruner, record, config, local_ids, engine_ids, compute_device, options, budget, run, timings
    )
    if not ranks.writer:  # rank 0 counts, reports and saves; the others wait for it and return
        distributed.barrier()
        distributed.stop()
        return PruneResult(model=None if streamer else model, tokenizer=tokenizer, report={}, out=where.out)
    counts = (
        count_streamed(model, streamer, run.read_block, config.prune_routers)
        if streamer is not None and run is not None
        else None
    )
    report = build_report(
        model, source, config, method_config, pruner, record, timings, budget, where.run_dir, resumed, counts,
        weights,
    )  # fmt: skip
    report["config"]["bos_added"] = bos is not None  # what --bos resolved to (False for given token ids)
    if kl_facts is not None:
        report["kl"] = kl_facts
    if where.out is not None:
        t = time.perf_counter()
        recipe = recipe_text(config, method_config, _ids_digest(calib_ids) if given_ids else None)
        write_weights = None
        if streamer is not None and run is not None:
            read = run.read_block

            def write_weights(folder: Path) -> dict[str, Any]:
                return save_streamed(model, streamer, read, folder)

        save_pruned(model, tokenizer, where.out, report, options.overwrite, grids=record.grids, recipe=recipe,
                    save_format=options.save_format, save_quantized=options.save_quantized,
                    write_weights=write_weights)  # fmt: skip
        timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        try:
            write_json_atomic(where.out / REPORT_NAME, report)  # again, with the saving time
        except OSError as exc:
            raise write_error(exc, "the report", where.out) from None
        if run is not None and not options.keep_run_dir:
            run.remove()
    timings["total"] = time.perf_counter() - t_start
    distributed.barrier()  # the other ranks return once the output is written
    distributed.stop()
    if streamer is not None:  # its blocks are on the meta device: the pruned model is the one in ``out``
        return PruneResult(model=None, tokenizer=tokenizer, report=report, out=where.out)
    return PruneResult(model=model, tokenizer=tokenizer, report=report, out=where.out)


def _inputs(model: str | nn.Module, config: PruneConfig, reads_calibration: bool) -> dict[str, Path]:
    """What the run reads from disk (name -> path), which no place it writes may overlap. A missing model path
    fails here, before anything is loaded."""
    found: dict[str, Path] = {}
    if isinstance(model, str):
        source = resolve_model(model)
        if source.kind != "hub":
            found["the input model"] = Path(source.location)
    if reads_calibration and is_text_file(config.calib):
        found["the calibration file"] = Path(config.calib)
    return found


def _fingerprint(
    model: nn.Module, config: PruneConfig, method_config: Any, calib_ids: torch.Tensor | None,
    streamer: BlockStreamer | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What must match for a run folder to be continued: everything that decides the pruned weights."""
    fields = config.to_dict()
    fields.pop("device")  # where it runs does not change what it computes... up to kernel differences
    for name in [k for k in fields if k.startswith("kl_")]:  # the KL stage runs after the checkpointed blocks
        fields.pop(name)
    payload: dict[str, Any] = {f"config.{k}": v for k, v in fields.items()}
    payload.update({f"option.{k}": v for k, v in method_config.to_dict().items()})
    payload["model.class"] = type(model).__name__
    if streamer is not None:  # the blocks are not loaded: the fingerprint of the files instead
        payload["model.weights"] = streamer.index.digest()
        payload["model.dtype"] = str(streamer.dtype)
        payload["stream"] = True
    else:
        payload["model.weights"] = model_digest(model)
        payload["model.dtype"] = str(next(model.parameters()).dtype)
    if distributed.world().active:  # each rank's activations are its own: resume with as many processes
        payload["processes"] = distributed.world().size
    no_data = torch.zeros(0, dtype=torch.long)  # a data-free method (streamed runs keep a run folder anyway)
    payload["calibration.tokens"] = tensor_digest(
        (calib_ids if calib_ids is not None else no_data).to(torch.long)
    )
    return json.loads(json.dumps(payload))  # as it reads back from run.json (tuples -> lists)


def _run_stages(
    model: nn.Module, pruner: Any, record: RunRecord, config: PruneConfig, calib_ids: torch.Tensor | None,
    engine_ids: torch.Tensor | None, device: torch.device, options: RunOptions, budget: MemoryBudget,
    run: RunFolder | None, timings: dict[str, Any],
) -> tuple[int, dict[str, Any] | None]:  # fmt: skip
    """The allocation's look at the dense model, then the engine, block by block, then the optional KL stage;
    return the resumed blocks and the KL stage's facts (``None`` without it).

    ``timings["prune"]`` covers all of it (OWL's statistics pass is part of pruning with OWL; the KL stage's dense
    targets, measured before any block is pruned, and its training are part of pruning with ``--kl-epochs``).
    """
    t = time.perf_counter()
    targets = None
    if config.kl_epochs and calib_ids is not None:
        # the dense model's distribution, before anything is pruned (a resumed run restores its pruned blocks
        # inside the engine, after this)
        targets = teacher_targets(model, calib_ids, config.kl_topk, device, config.kl_batch, options.progress)
    pruner.prepare(model, calib_ids, device, config.forward_batch, options.progress)
    timings["allocation"] = time.perf_counter() - t
    torch.manual_seed(config.seed)

    def step(work: Any) -> None:  # the run keeps one record of every block's result
        record.add(work.name, pruner.run_block(work))

    engine = run_sequential(
        model, engine_ids, step, device, config.forward_batch, options.progress,
        dense_stream=pruner.needs_dense_stream, budget=budget, checkpoint=run, routers=config.prune_routers,
    )  # fmt: skip
    timings["capture"] = engine.capture_seconds
    timings["per_block"] = engine.block_seconds
    facts = None
    if targets is not None and calib_ids is not None:
        tk = time.perf_counter()
        spec = DistillSpec(config.kl_epochs, config.kl_lr, config.kl_topk, config.kl_batch, config.kl_holdout)
        facts = distill(model, calib_ids, targets, spec, device, config.seed, options.progress)
        timings["kl"] = time.perf_counter() - tk
    timings["prune"] = time.perf_counter() - t
    return engine.resumed_blocks, facts


def _announce(config: PruneConfig, calib_ids: torch.Tensor | None, needs_data: bool, uses_data: bool) -> None:
    """Say up front how much work the run is: the defaults (128 x 2048 tokens) take long on a laptop CPU."""
    if not needs_data:
        tqdm.write(f"besa prune: {config.method} needs no calibration data", file=sys.stderr)
        return
    n, length = calib_ids.shape if calib_ids is not None else (config.nsamples, config.seqlen)
    passes = (
        "statistics, pruning and propagation passes" if uses_data else "one statistics pass (the allocation)"
    )
    tqdm.write(
        f"besa prune: {n} calibration windows x {length} tokens = {n * length:,} tokens through every block "
        f"({passes}); --nsamples/--seqlen set how many",
        file=sys.stderr,
    )


def _sample(documents: list[str], tokenizer: Any, config: PruneConfig, bos: int | None) -> torch.Tensor:
    """The run's calibration windows (N, T), drawn from ``documents`` as ``config`` says; with ``bos`` each is that
    token then ``T - 1`` tokens of a document."""

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if bos is None:
        return sample_windows(documents, tokenize, config.nsamples, config.seqlen, config.seed)
    if config.seqlen < 2:
        raise BesaError("--seqlen must be at least 2 when windows start with BOS (--bos)")
    return with_bos(sample_windows(documents, tokenize, config.nsamples, config.seqlen - 1, config.seed), bos)


def _open_run(
    path: Path, model: nn.Module, config: PruneConfig, method_config: Any, calib_ids: torch.Tensor | None,
    record: RunRecord, resume: bool, streamer: BlockStreamer | None = None, redo_from: int | None = None,
) -> RunFolder:  # fmt: skip
    """The run folder of these settings, model and windows; one of another run is refused."""
    run = RunFolder(
        path, _fingerprint(model, config, method_config, calib_ids, streamer), record.block_json,
        record.restore_json, record.block_tensors, record.restore_tensors, redo_from=redo_from,
    )  # fmt: skip
    run.check(require=resume)
    return run


def _ids_digest(calib_ids: torch.Tensor) -> str:
    return "sha256:" + tensor_digest(calib_ids.to(torch.long))
