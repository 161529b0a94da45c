"""Writing a pruned model folder: model (safetensors), tokenizer, report, recipe, allocation picture and, on
request, the integer codes of quantized weights; all into a temporary sibling folder renamed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from besa.errors import BesaError
from besa.fileio import atomic_folder, write_json_atomic
from besa.modeling import weight_matrix
from besa.options import check_output_dir
from besa.plotting import PLOT_NAME, plot_allocation
from besa.quant import QuantSpec, dequantize_codes, quantize_codes
from besa.recipe import RECIPE_NAME

__all__ = ["REPORT_NAME", "QUANT_LAYOUT", "save_pruned", "save_quantized"]

REPORT_NAME = "besa_report.json"


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    report: dict[str, Any],
    overwrite: bool,
    quant_grids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    recipe: str | None = None,
) -> Path:
    """Write model (safetensors), tokenizer and report into a temporary sibling folder, then rename it to ``out``.

    With ``quant_grids`` (qualified linear name -> (scale, zero)) the integer codes are written too
    (``save_quantized``). An interrupted save leaves ``out`` untouched (absent, or the previous content when
    overwriting).
    """
    out = check_output_dir(out, overwrite)
    with atomic_folder(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if quant_grids:
            spec = report["quantization"]
            save_quantized(model, quant_grids, QuantSpec(spec["bits"], spec["group_size"]), tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
        if recipe is not None:
            (tmp / RECIPE_NAME).write_text(recipe, encoding="utf-8")
        plot_allocation(report, tmp / PLOT_NAME)
    return out


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


def save_quantized(
    model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: QuantSpec, folder: Path
) -> None:
    """Write the integer codes, scales and zero points of every quantized linear (layout: ``QUANT_LAYOUT``)."""
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name, (h, z) in grids.items():
        w = weight_matrix(modules[name]).detach().float().cpu()
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
