"""Streamed pruning (``--stream``): a model larger than memory, one block in RAM at a time.

The model is built without weights (``accelerate.init_empty_weights``: parameters on the meta device, buffers
real). Everything outside the decoder blocks (embeddings, final norm, head) is read from the safetensors shards in
the dtype it is stored in; the input embedding's output is cast to the compute dtype, so the blocks see exactly
the activations an unstreamed run in that dtype sees. The engine asks this module for a block's weights just
before it works on the block (``BlockStreamer.load``: memory-mapped reads, cast to the compute dtype) and drops
them after the block is checkpointed (``unload``: back to the meta device). The pruned blocks live in the run
folder's checkpoints (``besa.engine.checkpoint``), so a streamed run resumes like any other; at the end
``save_streamed`` writes one output shard per block from those checkpoints, in each tensor's stored dtype, plus a
shard of the rest and ``model.safetensors.index.json`` (the layout ``from_pretrained`` reads). The source
checkpoint is read through ``besa.engine.source_weights``.

Peak RAM is about the outside weights in their stored dtype + one block in the compute dtype + the calibration
activations, whatever the depth.
"""

from __future__ import annotations

import json
import logging
import shutil
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from besa.engine.activations import trim_heap
from besa.engine.source_weights import INDEX_NAME, ShardIndex, checkpoint_sources
from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears, weight_matrix

__all__ = [
    "BlockStreamer", "open_streamed", "streamer_of", "count_streamed", "save_streamed", "shard_name",
]  # fmt: skip

log = logging.getLogger(__name__)

_STREAMERS: weakref.WeakKeyDictionary[nn.Module, BlockStreamer] = weakref.WeakKeyDictionary()


def shard_name(index: int, total: int) -> str:
    """The file name ``save_pretrained`` gives shard ``index`` (1-based) of ``total``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _to_meta(module: nn.Module) -> None:
    """Drop a module's parameters and persistent buffers to the meta device (non-persistent buffers stay)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buf in list(sub._buffers.items()):
            if buf is not None and name not in sub._non_persistent_buffers_set and buf.device.type != "meta":
                sub._buffers[name] = torch.empty_like(buf, device="meta")


class BlockStreamer:
    """Loads a decoder block's weights from the source shards when the engine reaches it, and drops them after.

    Args:
        model: the model built without weights.
        index: the source checkpoint.
        dtype: the compute dtype the blocks are loaded in (floating tensors only).
    """

    def __init__(self, model: nn.Module, index: ShardIndex, dtype: torch.dtype) -> None:
        self.model = model
        self.index = index
        self.dtype = dtype
        self.blocks = find_blocks(model)
        self.block_names = [name for name, _ in self.blocks]
        self.sources = checkpoint_sources(model, index.weight_map)
        for target, (_, keys) in self.sources.items():  # a fused tensor is saved as its parts were stored
            index.dtypes.setdefault(target, index.dtypes.get(keys[0][1], torch.float32))

    def load(self, name: str, block: nn.Module) -> None:
        """Read block ``name``'s tensors into ``block`` (in the compute dtype)."""
        keys = list(block.state_dict())
        stored = self.read_as_model(f"{name}.{k}" for k in keys)
        state = {k: _cast(stored[f"{name}.{k}"], self.dtype) for k in keys}
        block.load_state_dict(state, strict=True, assign=True)

    def read_as_model(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The model's tensors ``names``: read as stored, or, where the checkpoint names them otherwise (a
        Mixture-of-Experts checkpoint stores each expert apart), built from their parts by the model's own
        conversion (``checkpoint_sources``)."""
        names = list(names)
        direct = [n for n in names if n in self.index.weight_map or n not in self.sources]
        out = self.index.read(direct)
        for name in names:
            if name in out:
                continue
            converter, parts = self.sources[name]
            tensors = self.index.read(key for _, key in parts)
            if converter is None:  # stored under another name only
                out[name] = tensors[parts[0][1]]
                continue
            collected: dict[str, Any] = {}
            for pattern, key in parts:
                collected.setdefault(pattern, []).append(tensors.pop(key))
            for op in converter.operations:
                collected = op.convert(
                    collected,
                    source_patterns=converter.source_patterns,
                    target_patterns=converter.target_patterns,
                )
            if len(collected) != 1:
                raise BesaError(f"cannot stream {name!r}: its conversion from the checkpoint gives {len(collected)} "
                                "tensors; run without --stream")  # fmt: skip
            out[name] = next(iter(collected.values()))
        return out

    def unload(self, block: nn.Module) -> None:
        """Free the block's weights (its checkpoint in the run folder holds the pruned ones)."""
        _to_meta(block)
        trim_heap()

    def outside_names(self) -> list[str]:
        """The checkpoint's tensors that belong to no block (embeddings, final norm, head), as the source names them."""
        prefixes = tuple(f"{n}." for n in self.block_names)
        return [n for n in self.index.weight_map if not n.startswith(prefixes)]

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        """Those tensors as the model holds them (loaded as stored and never pruned): no second read."""
        state = self.model.state_dict()
        return {n: state[n] for n in self.outside_names()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    """The streamer of a model opened by ``open_streamed`` (the engine asks before touching a block)."""
    return _STREAMERS.get(model)


def open_streamed(
    folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[nn.Module, Any, BlockStreamer]:
    """Build ``folder``'s model without weights, load everything outside the blocks as stored, and return
    ``(model, tokenizer, streamer)``; the blocks stay on the meta device until the engine loads them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from besa.model.loading import load_error

    folder = Path(folder)
    index = ShardIndex.open(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise load_error(str(folder), exc) from exc
    model.eval()
    model.config.use_cache = False
    streamer = BlockStreamer(model, index, dtype)
    _load_outside(model, streamer)
    _STREAMERS[model] = streamer
    return model, tokenizer, streamer


def _load_outside(model: nn.Module, streamer: BlockStreamer) -> None:
    """Everything outside the blocks, in its stored dtype; tied tensors follow; the embedding's output is cast."""
    names = streamer.outside_names()
    state = streamer.index.read(names)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    prefixes = tuple(f"{n}." for n in streamer.block_names)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(prefixes)]
    if left:
        raise BesaError(f"cannot stream: the checkpoint has no {left[0]!r}; run without --stream")
    embedding = model.get_input_embeddings()
    dtype = streamer.dtype
    embedding.register_forward_hook(lambda _m, _args, out: out.to(dtype) if out.is_floating_point() else out)


BlockReader = Callable[[int], dict[str, torch.Tensor]]
"""``read(i)``: pruned block ``i``'s own tensors from its checkpoint, verified (``RunFolder.read_block``)."""


def count_streamed(
    model: nn.Module, streamer: BlockStreamer, read: BlockReader, routers: bool = False
) -> tuple[dict, dict[str, Any]]:
    """``report.count_layer_sparsity`` and ``report.model_sparsity`` of a streamed run, block by block from the
    checkpoints (one block in memory at a time)."""
    layers: dict[str, dict[str, Any]] = {}
    all_zeros = all_numel = 0
    from besa.model.experts import block_expert_matrices

    for i, (block_name, block) in enumerate(streamer.blocks):
        tensors = read(i)
        block.load_state_dict(
            tensors, strict=True, assign=True
        )  # to see each expert's matrix as the engine did
        matrices = {name: weight_matrix(layer) for name, layer in find_linears(block, model, routers).items()}
        matrices.update(block_expert_matrices(block))
        for name, w in matrices.items():
            zeros = _zeros(w)
            layers[f"{block_name}.{name}"] = {
                "block": block_name, "layer": name, "shape": list(w.shape), "zeros": zeros, "numel": w.numel(),
                "sparsity": zeros / w.numel(),
            }  # fmt: skip
        for t in tensors.values():
            all_zeros += _zeros(t)
            all_numel += t.numel()
        del tensors, matrices
        _to_meta(block)
        trim_heap()
    for t in streamer.outside_tensors().values():
        all_zeros += _zeros(t)
        all_numel += t.numel()
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    totals = {
        "pruned_layers": zeros / max(numel, 1),
        "pruned_layers_zeros": zeros,
        "pruned_layers_numel": numel,
        "all_parameters": all_zeros / max(all_numel, 1),
        "all_parameters_numel": all_numel,
    }
    return layers, totals


def _zeros(t: torch.Tensor) -> int:
    """Exact zeros of ``t`` (counted without a mask the size of ``t``)."""
    return t.numel() - int(torch.count_nonzero(t))


def save_streamed(
    model: nn.Module, streamer: BlockStreamer, read: BlockReader, folder: Path
) -> dict[str, Any]:
    """Write the pruned model into ``folder``: one shard per block (from its checkpoint), a last shard with the
    rest, each tensor in the dtype the source stored it in, the index, the config; return ``size_on_disk``."""
    index = streamer.index
    total = len(streamer.blocks) + 1
    weight_map: dict[str, str] = {}
    size = 0
    for i, (block_name, _) in enumerate(streamer.blocks):
        tensors = {f"{block_name}.{k}": v for k, v in read(i).items()}
        tensors = {k: _cast(v, index.dtypes.get(k, v.dtype)).contiguous() for k, v in tensors.items()}
        size += _write_shard(folder, shard_name(i + 1, total), tensors, weight_map)
        del tensors
        trim_heap()
    rest = {k: v.contiguous() for k, v in streamer.outside_tensors().items()}  # as stored: never pruned
    size += _write_shard(folder, shard_name(total, total), rest, weight_map)
    (folder / INDEX_NAME).write_text(
        json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
        )
        + "\n",
        encoding="utf-8",
    )
    stored = {d for d in index.dtypes.values() if d.is_floating_point}
    if len(stored) == 1:
        model.config.dtype = next(iter(stored))
    model.config.save_pretrained(folder)
    source_generation = index.folder / "generation_config.json"
    if source_generation.is_file():
        shutil.copyfile(source_generation, folder / "generation_config.json")
    saved = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"format": "dense", "dense_weights_bytes": size, "saved_weights_bytes": saved,
            "saved_over_dense": round(saved / size, 4) if size else None, "shards": total}  # fmt: skip


def _write_shard(
    folder: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]
) -> int:
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    return sum(t.numel() * t.element_size() for t in tensors.values())
