"""What must match for a run folder to be continued: everything that decides the pruned weights."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from besa.engine import distributed
from besa.engine.checkpoint import model_digest, tensor_digest
from besa.engine.streaming import BlockStreamer
from besa.settings.config import MethodConfig, PruneConfig
from besa.settings.flat import to_flat

__all__ = ["ADDED_LATER", "ids_digest", "run_fingerprint"]

ADDED_LATER = {"refit_anchor": 0.0, "rotate": "none", "refit_loss": "mse", "refit_rel_lr": 0.0}
"""Settings newer than some run folders, with the value those folders ran with: left out of the fingerprint at that
value, so a folder from before the setting existed still resumes."""


def run_fingerprint(
    model: nn.Module, config: PruneConfig, method_config: MethodConfig, calib_ids: torch.Tensor | None,
    streamer: BlockStreamer | None = None, resolved: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The settings (flat names; not the device, not the KL stage, which runs after the checkpointed blocks, not a
    setting of ``ADDED_LATER`` at the value older folders ran with), the
    method's options, the model's weights (a streamed model: its files) and the calibration tokens, as ``run.json``
    stores them. ``resolved`` (``Pruner.resolved_defaults``: ``config.NAME`` / ``option.NAME`` -> value) replaces a
    setting left to the method (``None``) by what the method made of it for this run, so that a folder that gave
    the value explicitly and a run that gets it by default agree, and a changed default cannot resume a folder that
    ran the old one."""
    fields = config.to_dict()
    fields.pop("device")  # where it runs does not change what it computes... up to kernel differences
    for name in to_flat(config.kl):
        fields.pop(name)
    payload: dict[str, Any] = {f"config.{k}": v for k, v in fields.items()}
    payload.update({f"option.{k}": v for k, v in method_config.to_dict().items()})
    for key, value in (resolved or {}).items():
        if key in payload and payload[key] is None:
            payload[key] = value
    for name, before in ADDED_LATER.items():  # given or resolved to the value older folders ran with
        if payload.get(f"config.{name}") == before:
            payload.pop(f"config.{name}")
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


def ids_digest(calib_ids: torch.Tensor) -> str:
    """The digest of token ids given to the Python API, as a recipe records them (``calibration_ids``)."""
    return "sha256:" + tensor_digest(calib_ids.to(torch.long))
