"""One pruning run as a short sequence of named steps: ``PruneRun(...).execute()`` prepares (every setting and
every place it writes checked first), loads the model, checks its weights, calibrates, runs the stages (the
allocation's look at the dense model, the engine block by block, the optional KL stage) and finishes (report,
saved folder). The work of each step lives in the module that owns it; this module only orders it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from besa.engine import distributed
from besa.engine.activations import MemoryBudget
from besa.engine.checkpoint import RunFolder
from besa.engine.fingerprint import ids_digest, run_fingerprint
from besa.engine.pipeline import EngineSetup, run_sequential
from besa.engine.record import RunRecord
from besa.engine.streaming import BlockStreamer, count_streamed, open_streamed, save_streamed
from besa.errors import BesaError
from besa.fileio import write_error, write_json_atomic
from besa.formats.compressed import check_compressible
from besa.model.checks import (
    check_pattern_fits,
    check_pooled_stats,
    check_weights,
    dense_weights_message,
    inputs_read,
    learn_experts,
)
from besa.model.data import load_calibration_documents, resolve_bos, sample_calibration, work_ahead
from besa.model.loading import (
    check_seqlen,
    model_folder,
    prepare_model,
    resolve_device,
    resolve_dtype,
)
from besa.output.report import RunFacts, build_report
from besa.output.saving import SaveOptions, save_pruned
from besa.registry import get_method
from besa.settings.config import MethodConfig, PruneConfig
from besa.settings.flat import to_flat
from besa.settings.options import REPORT_NAME, ResolvedRun, RunOptions
from besa.settings.recipe import recipe_text
from besa.settings.training import KLSettings
from besa.stages.distill import distill, teacher_targets
from besa.stages.rotation import rotate_model

__all__ = ["PruneRun"]


@dataclass
class PruneRun:
    """A pruning run: the settings, then what each step leaves for the next (``execute`` runs them in order)."""

    model: str | nn.Module
    config: PruneConfig
    method_config: MethodConfig
    options: RunOptions = field(default_factory=RunOptions)
    tokenizer: Any = None
    calib_ids: torch.Tensor | None = None
    # filled by the steps
    local_ids: torch.Tensor | None = None
    pruner: Any = None
    kl: KLSettings = field(default_factory=lambda: KLSettings(epochs=0))  # resolved by ``prepare``
    where: ResolvedRun | None = None
    device: torch.device | None = None
    source: Any = None
    streamer: BlockStreamer | None = None
    folder: RunFolder | None = None
    record: RunRecord = field(default_factory=RunRecord)
    timings: dict[str, Any] = field(default_factory=dict)
    weights: list = field(default_factory=list)
    budget: MemoryBudget | None = None
    bos: int | None = None
    documents: list[str] | None = None
    resumed: int = 0
    kl_facts: dict[str, Any] | None = None
    rotation_facts: dict[str, Any] | None = None

    def execute(self) -> tuple[nn.Module | None, Any, dict[str, Any], Path | None]:
        """Every step in order; return (model, tokenizer, report, out). ``model`` is ``None`` after a streamed
        run (its blocks are on the meta device: the pruned model is the one in ``out``); in a data-parallel run
        only rank 0 gets the report, the other ranks an empty one."""
        t_start = time.perf_counter()
        self.prepare()
        self.load()
        self.calibrate()
        self.run_stages()
        report = (
            self.finish(t_start) if distributed.world().writer else {}
        )  # rank 0 counts, reports and saves
        self.timings["total"] = time.perf_counter() - t_start
        distributed.barrier()  # the other ranks return once the output is written
        distributed.stop()
        return (None if self.streamer else self.model), self.tokenizer, report, self.where.out

    @property
    def needs_data(self) -> bool:
        """Calibration windows are needed: by the method, by the KL stage, which trains on them, or by the rotation,
        which is chosen from them."""
        return self.pruner.needs_calibration or bool(self.kl.epochs) or self.config.rotate != "none"

    def prepare(self) -> None:
        """The method's pruner (it may refuse the shared settings), every place the run writes, the device, the
        process group and the calibration text: all before the model is loaded."""
        config, options = self.config, self.options
        if options.save_quantized and config.quantization.spec is None:
            raise BesaError("--save-quantized needs --wbits between 2 and 8")
        if options.stream and config.kl.epochs:
            raise BesaError("--kl-epochs trains the whole model at once: it cannot run with --stream")
        if options.stream and config.rotate != "none":
            raise BesaError("--rotate turns the whole model before pruning: it cannot run with --stream")
        self.pruner = get_method(config.method).pruner_cls(self.method_config, config)
        self.kl = self.pruner.kl_settings(streamed=options.stream)
        reads_text = self.needs_data and self.calib_ids is None
        self.where = options.resolve(
            self.needs_data, inputs_read(self.model, config.calibration.source, reads_text)
        )
        self.device = resolve_device(config.runtime.device)
        distributed.start(self.device)  # torchrun: join the process group (one process: nothing)
        t = time.perf_counter()
        self.documents = load_calibration_documents(config.calibration.source) if reads_text else None
        self.timings["read_calibration"] = time.perf_counter() - t
        if self.needs_data:
            check_seqlen(self.model, self._window())  # from the model's config alone, before its weights
        if options.progress:  # the defaults (128 x 2048 tokens) take long on a laptop CPU: say it up front
            shape = self.calib_ids.shape if self.calib_ids is not None else None
            said = work_ahead(config, shape, self.needs_data, self.pruner.engine_uses_data)
            tqdm.write(said, file=sys.stderr)

    def load(self) -> None:
        """The model (streamed: its blocks on the meta device), then every check of its weights before work."""
        t = time.perf_counter()
        dtype = resolve_dtype(self.config.runtime.dtype, self.device)
        if self.options.stream:
            if not isinstance(self.model, str):
                raise BesaError(
                    "--stream reads the model from its files: give a model folder, hub id or .gguf"
                )
            folder, self.source = model_folder(self.model)
            self.model, self.tokenizer, self.streamer = open_streamed(
                folder, dtype, self.options.trust_remote_code
            )
        else:
            self.model, self.tokenizer, self.source = prepare_model(
                self.model, self.tokenizer, dtype, self.options.trust_remote_code
            )
        self.timings["load_model"] = time.perf_counter() - t
        model, config = self.model, self.config
        check_pattern_fits(model, config.nm, config.experts.prune_routers)
        stacked = learn_experts(model, streamed=self.options.stream)
        self.weights = check_weights(model, config.experts.prune_routers, config.experts.leave_unknown_dense)
        said = dense_weights_message(self.weights)
        if said and distributed.world().writer:  # with or without progress bars: said before the work, once
            tqdm.write(said, file=sys.stderr)
        if config.experts.stats == "pooled":
            check_pooled_stats(stacked)
        if self.options.save_format == "compressed-tensors" and self.where.out is not None:
            check_compressible(model, config.quantization.spec)
        if self.needs_data:
            check_seqlen(model, self._window())  # again, now that the config is known whatever the source

    def calibrate(self) -> None:
        """The calibration windows (sampled here unless given), the activations' memory, the run folder."""
        t, ranks, where = time.perf_counter(), distributed.world(), self.where
        spill = (
            (where.run_dir / "spill" / (f"r{ranks.rank}" if ranks.active else "")) if where.run_dir else None
        )
        self.budget = MemoryBudget(limit=where.memory_limit, spill_root=spill)
        if self.documents is not None:
            self.bos = resolve_bos(self.config.calibration.bos, self.tokenizer)
            self.calib_ids = sample_calibration(
                self.documents, self.tokenizer, self.config.calibration, self.bos
            )
        self.timings["sample_calibration"] = time.perf_counter() - t
        # data parallel: this rank's whole forward batches of the windows (all of them in one process)
        if self.calib_ids is not None:
            self.local_ids = distributed.shard_windows(self.calib_ids, self.config.runtime.forward_batch)
        engine_ids = self._engine_ids()
        if where.run_dir is not None and (engine_ids is not None or self.streamer is not None):
            fingerprint = run_fingerprint(
                self.model, self.config, self.method_config,
                self.calib_ids if engine_ids is not None else None, self.streamer, self.pruner.resolved_defaults(),
            )  # fmt: skip
            record, options = self.record, self.options
            self.folder = RunFolder(
                where.run_dir, fingerprint, record.block_json, record.restore_json, record.block_tensors,
                record.restore_tensors, redo_from=options.redo_from,
            )  # fmt: skip
            self.folder.check(require=options.resume or options.redo_from is not None)

    def run_stages(self) -> None:
        """The allocation's look at the dense model, then the engine, block by block, then the optional KL stage.

        ``timings["prune"]`` covers all of it (OWL's statistics pass is part of pruning with OWL; the KL stage's
        dense targets, measured before any block is pruned, and its training are part of pruning with KL).
        """
        config, options, pruner, model, kl = self.config, self.options, self.pruner, self.model, self.kl
        local_ids = self.local_ids
        t = time.perf_counter()
        targets = None
        if kl.epochs and local_ids is not None:
            # the dense model's distribution, before anything is pruned (a resumed run restores its pruned blocks
            # inside the engine, after this)
            targets = teacher_targets(model, local_ids, kl.topk, self.device, kl.batch, options.progress)
        if config.rotate != "none" and local_ids is not None:
            tr = time.perf_counter()
            self.rotation_facts = rotate_model(
                model, local_ids, self.device, config.runtime.forward_batch, options.progress
            )
            self.timings["rotation"] = time.perf_counter() - tr
        pruner.prepare(model, local_ids, self.device, config.runtime.forward_batch, options.progress)
        self.timings["allocation"] = time.perf_counter() - t
        torch.manual_seed(config.calibration.seed)
        record = self.record

        def step(work: Any) -> None:  # the run keeps one record of every block's result
            record.add(work.name, pruner.run_block(work))

        setup = EngineSetup(
            dense_stream=pruner.needs_dense_stream, budget=self.budget, checkpoint=self.folder,
            routers=config.experts.prune_routers,
        )  # fmt: skip
        engine = run_sequential(
            model,
            self._engine_ids(),
            step,
            self.device,
            config.runtime.forward_batch,
            options.progress,
            setup,
        )
        self.timings["capture"] = engine.capture_seconds
        self.timings["per_block"] = engine.block_seconds
        if targets is not None and local_ids is not None:
            tk = time.perf_counter()
            self.kl_facts = distill(
                model, local_ids, targets, kl, self.device, config.calibration.seed, options.progress
            )
            self.timings["kl"] = time.perf_counter() - tk
        self.timings["prune"] = time.perf_counter() - t
        self.resumed = engine.resumed_blocks

    def finish(self, t_start: float) -> dict[str, Any]:
        """Count, report and save (rank 0); return the report."""
        model, streamer, folder, config = self.model, self.streamer, self.folder, self.config
        counts = None
        if streamer is not None and folder is not None:
            counts = count_streamed(model, streamer, folder.read_block, config.experts.prune_routers)
        facts = RunFacts(
            self.source, config, self.method_config, self.pruner, self.record, self.timings, self.budget,
            self.where.run_dir, self.resumed, counts, self.weights,
        )  # fmt: skip
        report = build_report(model, facts)
        report["config"]["bos_added"] = self.bos is not None  # what --bos resolved to (False for given ids)
        report["config"].update(to_flat(self.kl))  # what the method made of --kl-* for this run
        if self.kl_facts is not None:
            report["kl"] = self.kl_facts
        if self.rotation_facts is not None:
            report["rotation"] = self.rotation_facts
        out = self.where.out
        if out is None:
            return report
        t = time.perf_counter()
        given = self.documents is None and self.calib_ids is not None
        save = SaveOptions(
            grids=self.record.grids, save_format=self.options.save_format,
            save_quantized=self.options.save_quantized,
            recipe=recipe_text(config, self.method_config, ids_digest(self.calib_ids) if given else None),
        )  # fmt: skip
        if streamer is not None and folder is not None:
            read = folder.read_block

            def write_weights(into: Path) -> dict[str, Any]:
                return save_streamed(model, streamer, read, into)

            save.write_weights = write_weights
        save_pruned(model, self.tokenizer, out, report, self.options.overwrite, save)
        self.timings["save"] = time.perf_counter() - t
        self.timings["total"] = time.perf_counter() - t_start
        try:
            write_json_atomic(out / REPORT_NAME, report)  # again, with the saving time
        except OSError as exc:
            raise write_error(exc, "the report", out) from None
        if folder is not None and not self.options.keep_run_dir:
            folder.remove()
        return report

    def _window(self) -> int:
        return self.calib_ids.shape[1] if self.calib_ids is not None else self.config.calibration.seqlen

    def _engine_ids(self) -> torch.Tensor | None:  # a data-free method runs through the engine without data
        return self.local_ids if self.pruner.engine_uses_data else None
