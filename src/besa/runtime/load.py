"""``besa.load_sparse(folder)``: a ``--save-format sparse`` folder as a Hugging Face model whose pruned linears are
``SparseLinear`` modules, read straight from the stored bitmask and values: the pruned weights are never dense."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch import nn

from besa.errors import BesaError
from besa.formats.quant import QuantSpec
from besa.formats.sparse import is_sparse_folder, read_sparse_folder
from besa.runtime.kernels import kernels
from besa.runtime.layout import PackedWeight, from_saved, pack_codes, quantize
from besa.runtime.linear import Plan, SparseLinear, measure_plan

__all__ = ["load_sparse", "sparse_bytes"]

log = logging.getLogger(__name__)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def load_sparse(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    crossover: int | None = None,
    trust_remote_code: bool = False,
    bits: int = 0,
    group_size: int = 128,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of a folder written by ``besa prune --save-format sparse``, in eval mode, every pruned
    ``nn.Linear`` a ``SparseLinear`` holding its kept values in ``dtype`` (float32 or bfloat16; the rest of the model
    too). Each forward runs the kernel, the prefill kernel or a dense product of the unpacked weight, whichever was
    fastest at its token count (``besa.runtime.linear.measure_plan``, measured now, once per weight shape), unless
    ``crossover`` is given: the kernel below that many tokens, the unpacked weight from it on (0: the kernel always).
    Without the kernels it says so, once, and runs every product dense.

    ``bits`` 8 or 4 holds integer codes instead, with a scale and zero point per row and group of columns: the
    folder's own ``--wbits`` codes where it has codes of that many bits (``--save-quantized``), else the values
    rounded now, on groups of ``group_size`` columns (a multiple of 16, or 0: one group a row)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not is_sparse_folder(folder):
        raise BesaError(f"{str(folder)!r} is not a sparse model folder (write one with --save-format sparse)")
    meta, flat = read_sparse_folder(folder)
    codes = _folder_codes(folder, bits)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, computed buffers kept
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in flat.items()
             if not k.endswith((".bitmask", ".values"))}  # fmt: skip
    swapped: list[SparseLinear] = []
    for name, (rows, cols) in meta["sparse"].items():
        owner = name.removesuffix(".weight")
        module = model.get_submodule(owner)
        packed = from_saved(flat[f"{name}.bitmask"], flat[f"{name}.values"], rows, cols)
        if type(module) is not nn.Linear or (module.out_features, module.in_features) != (rows, cols):
            dense[name] = packed.dense().to(dtype)  # not a plain linear (Conv1D, experts): kept dense
            continue
        if bits:
            packed = _as_codes(packed, codes, owner, QuantSpec(bits, group_size))
        elif packed.values.dtype != dtype:
            packed.values = packed.values.to(dtype)
        layer = SparseLinear(packed, dense.pop(f"{owner}.bias", None))
        _swap(model, owner, layer)
        swapped.append(layer)
    for alias, stored in meta["tied"].items():
        if stored in dense:
            dense.setdefault(alias, dense[stored])
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if unexpected:
        raise BesaError(f"{folder}: tensors the model does not have: {', '.join(unexpected[:3])}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise BesaError(f"{folder}: no stored tensor for {', '.join(left[:3])}")
    found = kernels()
    if not found.available:
        print(f"besa: {found.reason}", file=sys.stderr)
    elif swapped:  # one plan per weight shape, measured on the first linear of that shape
        plans: dict[tuple[int, int], Plan] = {}
        for layer in swapped:
            shape = (layer.out_features, layer.in_features)
            if shape not in plans:
                if crossover is None:
                    plans[shape] = measure_plan(layer, dtype=dtype)
                else:
                    layer.crossover = crossover
                    plans[shape] = layer.plan
            layer.plan = plans[shape]
    model.config.use_cache = True  # older besa folders saved it off
    if getattr(model, "generation_config", None) is not None:
        if (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.generation_config.use_cache = True  # decode reuses the keys and values of the tokens before
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def _folder_codes(folder: Path, bits: int) -> tuple[Path, QuantSpec] | None:
    """The folder's ``--save-quantized`` codes file and their spec, when ``bits`` asks for codes and the folder has
    codes of that many bits (else ``None``: the values are rounded at load, and a line says why when it has other
    codes)."""
    from safetensors import SafetensorError, safe_open

    from besa.output.saving import QUANT_LAYOUT

    if bits not in (0, 4, 8):
        raise BesaError(
            f"the sparse kernels hold float values (bits 0) or 8-bit or 4-bit codes, not {bits}-bit"
        )
    path = folder / QUANT_LAYOUT["file"]
    if not bits or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
        spec = QuantSpec(int(stored["bits"]), int(stored["group_size"]))
    except (OSError, ValueError, KeyError, BesaError, SafetensorError) as exc:
        log.warning(
            "%s: unreadable codes (%s): the values are rounded to %d-bit codes at load", path, exc, bits
        )
        return None
    if spec.bits != bits or spec.group_size % 16:
        log.warning("%s holds %d-bit codes on groups of %d columns; the kernels are asked for %d-bit codes on "
                    "groups that are a multiple of 16: the values are rounded at load", path, spec.bits,
                    spec.group_size, bits)  # fmt: skip
        return None
    return path, spec


def _as_codes(packed: PackedWeight, source: tuple[Path, QuantSpec] | None, owner: str,
              spec: QuantSpec) -> PackedWeight:  # fmt: skip
    """``packed`` as integer codes: the folder's own for ``owner`` where ``source`` has them (read for this linear
    alone), else rounded now to ``spec``."""
    from safetensors import safe_open

    if source is None:
        return quantize(packed, spec)
    with safe_open(str(source[0]), framework="pt") as f:
        if f"{owner}.codes" not in f.keys():
            return quantize(packed, spec)
        q = [f.get_tensor(f"{owner}.{part}") for part in ("codes", "scales", "zeros")]
    if tuple(q[0].shape) != (packed.rows, packed.cols):
        raise BesaError(
            f"{owner}: its codes are {tuple(q[0].shape)}, its weight ({packed.rows}, {packed.cols})"
        )
    return pack_codes(q[0], packed.keep(), q[1], q[2], source[1])


def sparse_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the ``SparseLinear`` modules hold, bytes their weights would take dense in the same form: float values
    in their dtype; codes at the same bits with the same scales and zero points)."""
    held = dense = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            p = module.packed
            held += p.nbytes
            if p.bits:
                dense += p.rows * p.cols * p.bits // 8 + (p.scales.numel() + p.zeros.numel()) * 4
            else:
                dense += p.rows * p.cols * p.values.element_size()
    return held, dense
