"""``--save-format compressed-tensors``: the quantized pruned model in the format llm-compressor writes and vLLM and
transformers read (PyPI ``compressed-tensors``, ``pack-quantized``): per quantized linear ``weight_packed`` (int32
words of ``bits``-bit codes), ``weight_scale``, ``weight_zero_point`` (packed along the rows) and ``weight_shape``,
plus the ``quantization_config`` in ``config.json``.

Our asymmetric grid ``w = (code - z) * s`` with codes in [0, 2^b - 1] is theirs with signed codes:
``q = code - 2^(b-1)`` and ``zp = z - 2^(b-1)`` give the same ``(q - zp) * s``, so the weights come back exactly.
The config asks transformers to decompress on load (``run_compressed: false``): its compressed-module path cannot
load asymmetric packed zero points yet (llm-compressor#1618, #1704); vLLM reads the format natively.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from besa.errors import BesaError
from besa.formats.quant import QuantSpec, dequantize_codes, quantize_codes
from besa.formats.sparse import stored_tensors
from besa.model.blocks import find_blocks, find_linears, weight_matrix

__all__ = ["check_compressible", "save_compressed"]

INSTALL = "pip install 'besa[compressed]' (the compressed-tensors package)"


def check_compressible(model: nn.Module, spec: QuantSpec | None) -> None:
    """Refuse, before any work, what the compressed-tensors format cannot hold: no quantization, GPT-2 style
    ``Conv1D`` layers, or a group size that does not divide every pruned linear's input width."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise BesaError(f"--save-format compressed-tensors needs {INSTALL}") from None
    if spec is None:
        raise BesaError("--save-format compressed-tensors stores quantized weights: add --wbits 4 (or 2-8)")
    from besa.model.experts import block_expert_matrices

    moe = next((f"{b}.{n}" for b, block in find_blocks(model) for n in block_expert_matrices(block)), None)
    if moe is not None:
        raise BesaError(
            f"--save-format compressed-tensors cannot pack Mixture-of-Experts experts ({moe}): transformers' loader "
            "drops the zero points of packed experts, so besa's asymmetric grids would not reload; save with "
            "--save-format dense or sparse (with --save-quantized for the codes)"
        )
    for block_name, block in find_blocks(model):
        for name, layer in find_linears(block, model).items():
            if not isinstance(layer, nn.Linear):
                raise BesaError(f"--save-format compressed-tensors stores nn.Linear layers; {block_name}.{name} "
                                f"is a {type(layer).__name__}")  # fmt: skip
            width = weight_matrix(layer).shape[1]
            if spec.group_size and width % spec.group_size:
                widths = {weight_matrix(lin).shape[1] for _, b in find_blocks(model)
                          for lin in find_linears(b, model).values()}  # fmt: skip
                divisors = [g for g in range(spec.group_size, 7, -1) if all(w % g == 0 for w in widths)]
                hint = f"--group-size {divisors[0]}" if divisors else "--group-size 0 (one scale per row)"
                raise BesaError(
                    f"compressed-tensors groups must divide every input width: --group-size {spec.group_size} does "
                    f"not divide {width} ({block_name}.{name}); use {hint}"
                )


def save_compressed(
    model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: QuantSpec, folder: Path
) -> None:
    """Write ``model`` into ``folder`` in the compressed-tensors ``pack-quantized`` format: the linears in
    ``grids`` (qualified name -> (scale, zero)) as packed codes, everything else as is, and the config."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    stored, _ = stored_tensors(model)
    offset = 1 << (spec.bits - 1)
    tensors: dict[str, torch.Tensor] = {}
    for name, (scale, zero) in grids.items():
        w = stored.pop(f"{name}.weight").float()
        codes = quantize_codes(w, scale, zero, spec)
        if not torch.equal(dequantize_codes(codes, scale, zero, spec), w):
            raise BesaError(f"{name}: the weights are not on their quantization grid; nothing was saved")
        tensors[f"{name}.weight_packed"] = pack_to_int32(
            (codes.to(torch.int16) - offset).to(torch.int8), spec.bits
        )
        tensors[f"{name}.weight_scale"] = scale.float().contiguous()
        signed_zero = (zero.to(torch.int16) - offset).to(torch.int8)
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(
            signed_zero, spec.bits, packed_dim=0
        ).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(w.shape))
    tensors.update(stored)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    args = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=False,
        strategy="group" if spec.group_size else "channel", group_size=spec.group_size or None,
    )  # fmt: skip
    quantized = set(grids)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized", quantization_status="compressed", ignore=ignore,
    )  # fmt: skip
    model.config.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["quantization_config"] = {**config.model_dump(mode="json"), "run_compressed": False}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
