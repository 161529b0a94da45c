"""Writing a pruned model folder: model (safetensors), tokenizer, report, recipe, allocation picture and, on
request, the integer codes of quantized weights; all into a temporary sibling folder renamed at the end."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from besa.errors import BesaError
from besa.fileio import atomic_folder, write_error, write_json_atomic
from besa.formats.compressed import save_compressed
from besa.formats.quant import QuantSpec, dequantize_codes, quantize_codes
from besa.formats.sparse import save_sparse, stored_tensors
from besa.model.blocks import pruned_matrices
from besa.output.plotting import PLOT_NAME, plot_allocation
from besa.settings.options import REPORT_NAME, check_output_dir
from besa.settings.recipe import RECIPE_NAME

__all__ = ["QUANT_LAYOUT", "SaveOptions", "save_pruned", "save_quantized_codes", "size_on_disk"]


log = logging.getLogger(__name__)


@dataclass
class SaveOptions:
    """What a saved folder holds besides the model, tokenizer and report.

    ``save_format`` ``sparse`` stores the pruned linears (``report["layers"]``) as bitmask + values
    (``besa.formats.sparse``). ``grids`` (qualified linear name -> (scale, zero)) are the quantization grids of a
    quantized run: the ``compressed-tensors`` format packs the codes on them, and ``save_quantized`` writes them
    beside the model (``save_quantized_codes``). ``recipe`` is the run's ``besa_recipe.yaml``.
    ``write_weights(folder)`` writes the weights and config instead of the model (a streamed run:
    ``besa.engine.streaming.save_streamed``) and returns the ``size_on_disk`` entry.
    """

    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    recipe: str | None = None
    save_format: str = "dense"
    save_quantized: bool = False
    write_weights: Callable[[Path], dict[str, Any]] | None = None


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    report: dict[str, Any],
    overwrite: bool = False,
    options: SaveOptions | None = None,
) -> Path:
    """Write model (safetensors), tokenizer and report into a temporary sibling folder, then rename it to ``out``;
    ``report["size_on_disk"]`` gets the weights' bytes, dense vs saved. ``overwrite`` replaces only a folder besa
    wrote. An interrupted save leaves ``out`` untouched (absent, or the previous content when overwriting)."""
    out = check_output_dir(out, overwrite)
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    try:
        if cached is not None:  # loading turned the cache off for the run's own forwards, not for the user's
            config.use_cache = True
        _write_folder(model, tokenizer, out, report, options or SaveOptions())
    except (OSError, SafetensorError) as exc:
        needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        raise write_error(exc, "the pruned model", out, needed) from None
    finally:
        if cached is not None:
            config.use_cache = cached
    return out


def _write_folder(
    model: nn.Module, tokenizer: Any, out: Path, report: dict[str, Any], options: SaveOptions
) -> None:
    """The body of ``save_pruned`` (same arguments), raising ``OSError`` as it comes."""
    grids, write_weights, save_format = options.grids, options.write_weights, options.save_format
    with atomic_folder(out, replace=True) as tmp:
        spec = (
            QuantSpec(report["quantization"]["bits"], report["quantization"]["group_size"]) if grids else None
        )
        if write_weights is not None:
            report["size_on_disk"] = write_weights(tmp)
        elif save_format == "sparse":
            save_sparse(model, list(report["layers"]), tmp)
        elif save_format == "compressed-tensors":
            if not grids or spec is None:
                raise BesaError("--save-format compressed-tensors needs a quantized run (--wbits)")
            save_compressed(model, grids, spec, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if write_weights is None:
            report["size_on_disk"] = size_on_disk(model, tmp, save_format)
        tokenizer.save_pretrained(tmp)
        if options.save_quantized and grids and spec is not None:
            save_quantized_codes(model, grids, spec, tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
        if options.recipe is not None:
            (tmp / RECIPE_NAME).write_text(options.recipe, encoding="utf-8")
        plot_allocation(report, tmp / PLOT_NAME)
        drop_dangling_auto_map(tmp)


def drop_dangling_auto_map(folder: Path) -> None:
    """Remove ``auto_map`` from a saved ``config.json`` when the code files it names were not saved with it (a
    model whose custom code was not run, ``trust_remote_code`` off): it would point loaders at files not there."""
    path = folder / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    names = config.get("auto_map") or {}
    refs = [r for v in names.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    modules = {r.split("--")[-1].rsplit(".", 1)[0] for r in refs}
    missing = sorted(m for m in modules if not (folder / f"{m}.py").is_file())
    if missing:
        log.warning("config.json's auto_map names code not saved with the model (%s): dropped it", missing[0])
        del config["auto_map"]
        write_json_atomic(path, config)


def size_on_disk(model: nn.Module, folder: Path, save_format: str) -> dict[str, Any]:
    """Bytes of the model's weights stored densely in their dtype (each tied tensor once) vs the weight files
    written in ``folder`` (``*.safetensors`` but the optional ``quantized.safetensors``)."""
    dense = sum(t.numel() * t.element_size() for t in stored_tensors(model)[0].values())
    saved = sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != QUANT_LAYOUT["file"])
    return {"format": save_format, "dense_weights_bytes": dense, "saved_weights_bytes": saved,
            "saved_over_dense": round(saved / dense, 4) if dense else None}  # fmt: skip


QUANT_LAYOUT = {
    "file": "quantized.safetensors",
    "tensors": {
        "<linear>.codes": "uint8 (out_features, in_features): the integer code of every weight, in [0, 2^bits - 1]",
        "<linear>.scales": "float32 (out_features, groups): the step of each (row, group); groups = "
        "ceil(in_features / group_size), the last group narrower when group_size does not divide in_features",
        "<linear>.zeros": "uint8 (out_features, groups): the zero point of each (row, group)",
    },
    "dequantize": "w[r, c] = (codes[r, c] - zeros[r, c // group_size]) * scales[r, c // group_size]",
    "group_size_0": "group_size 0 means one group per row (groups = 1)",
    "pruned": "pruned weights have code == zero point, so they dequantize to exactly 0",
    "linear_names": "qualified module names as in the model (e.g. model.layers.0.self_attn.q_proj); weights of "
    "GPT-2 style Conv1D layers are stored as (out, in) too",
}


def save_quantized_codes(
    model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: QuantSpec, folder: Path
) -> None:
    """Write the integer codes, scales and zero points of every quantized linear (layout: ``QUANT_LAYOUT``)."""
    matrices = pruned_matrices(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, (h, z) in grids.items():
        w = matrices[name].detach().float().cpu()
        codes = quantize_codes(w, h, z, spec)
        back = dequantize_codes(codes, h, z, spec)
        if not torch.equal(back, w):
            raise BesaError(f"{name}: the weights are not on their quantization grid; nothing was saved")
        tensors[f"{name}.codes"] = codes.contiguous()
        tensors[f"{name}.scales"] = h.float().contiguous()
        tensors[f"{name}.zeros"] = z.to(torch.uint8).contiguous()
    save_file(
        tensors,
        str(folder / QUANT_LAYOUT["file"]),
        metadata={"bits": str(spec.bits), "group_size": str(spec.group_size)},
    )
    write_json_atomic(folder / "quantization.json", {"bits": spec.bits, "group_size": spec.group_size,
                                                     "layout": QUANT_LAYOUT})  # fmt: skip
