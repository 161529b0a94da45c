"""``besa speedup``: what the zeros of a saved model buy, measured on the machine at hand.

Every pruned linear is timed dense (``F.linear``) against a sparse kernel: on the CPU besa's bitmask kernels
(``besa.runtime``, float32 and bfloat16 weights; torch's CSR, ``torch.sparse.mm``, where they could not be built),
and on CUDA the 2:4 semi-structured kernels (``to_sparse_semi_structured``) for 2:4 weights (CSR otherwise). Then one whole forward and a greedy decode, the model as saved vs the same model with every
pruned linear swapped for its sparse twin. Times are medians of repeats, dense and sparse interleaved in one run.
Sparse may well be slower (unstructured 50% rarely pays on CPU); the table says so either way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.settings.commands import SpeedConfig

__all__ = ["SparseTwin", "is_two_four", "measure_speed", "median_time", "sparsify_model"]


def is_two_four(w: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row holds at least 2 zeros."""
    rows, cols = w.shape
    return cols % 4 == 0 and bool(((w == 0).reshape(rows, cols // 4, 4).sum(-1) >= 2).all())


_CROSSOVERS: dict[tuple[int, ...], int] = {}
"""The bitmask twins' prefill crossover by weight shape, measured on the first linear of that shape."""


class SparseTwin(nn.Module):
    """A linear whose weight is held in a sparse layout: ``bitmask`` (besa's CPU kernels, ``besa.runtime``), ``csr``
    (any device) or ``2:4`` (CUDA semi-structured)."""

    def __init__(self, layer: nn.Module, kind: str) -> None:
        super().__init__()
        w = weight_matrix(layer).detach()
        self.kind = kind
        self.out_features, self.in_features = w.shape
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        if kind == "bitmask":
            from besa.runtime.layout import pack
            from besa.runtime.linear import SparseLinear, measure_crossover

            self.bitmask = SparseLinear(pack(w), None)
            shape = tuple(w.shape)  # measured once per shape, not once per linear
            if shape not in _CROSSOVERS:
                _CROSSOVERS[shape] = measure_crossover(self.bitmask, counts=(1, 8, 32, 128))
            self.bitmask.crossover = _CROSSOVERS[shape]
        elif kind == "2:4":
            from torch.sparse import to_sparse_semi_structured

            self.weight = nn.Parameter(to_sparse_semi_structured(w.contiguous()), requires_grad=False)
        else:
            self.weight_csr = w.to_sparse_csr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bitmask":
            y = self.bitmask(x)
            return y if self.bias is None else y + self.bias
        if self.kind == "2:4":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.weight_csr, flat.t()).t().contiguous()  # row-major, as F.linear gives
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _kind(w: torch.Tensor, device: torch.device) -> str:
    if device.type == "cuda":
        return "2:4" if w.dtype in (torch.float16, torch.bfloat16) and is_two_four(w) else "csr"
    from besa.runtime.kernels import kernels

    return "bitmask" if kernels().available and w.dtype in (torch.float32, torch.bfloat16) else "csr"


def sparsify_model(model: nn.Module) -> dict[str, str]:
    """Swap every pruned linear of every block (one with zeros) for its ``SparseTwin``; return name -> kind.
    Experts count as linears while they are (``besa.model.experts.experts_as_linears``)."""
    device = next(model.parameters()).device
    kinds: dict[str, str] = {}
    for block_name, block in find_blocks(model):
        for name, layer in find_linears(block, model).items():
            w = weight_matrix(layer)
            if not bool((w == 0).any()):
                continue
            kinds[f"{block_name}.{name}"] = kind = _kind(w, device)
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], SparseTwin(layer, kind))
    return kinds


def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(model: nn.Module, config: SpeedConfig, progress: bool = True) -> dict[str, Any]:
    """Dense vs sparse seconds of every pruned linear, of one forward and of a greedy decode (``model`` is left
    dense; a sparse copy is built for the whole-model rows).

    Mixture-of-Experts experts are timed as the linears they are pruned as: while measuring, both models run every
    expert as a linear of its own on its routed tokens (``besa.model.experts.experts_as_linears``), so the two sides
    differ in their kernels only, not in how the experts are dispatched."""
    from besa.model.experts import experts_as_linears

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    with experts_as_linears(model, find_blocks(model)):
        return _measure(model, config, device, progress)


def _measure(model: nn.Module, config: SpeedConfig, device: torch.device, progress: bool) -> dict[str, Any]:
    import copy

    from tqdm.auto import tqdm

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = next(model.parameters()).dtype
    linears = {(b, n): lin for b, blk in find_blocks(model) for n, lin in find_linears(blk, model).items()}
    pruned = {key: lin for key, lin in linears.items() if bool((weight_matrix(lin) == 0).any())}
    if not pruned:
        raise BesaError("the model has no pruned linears (no zeros in any block's linears)")
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        bar = tqdm(pruned.items(), desc="Timing linears", disable=None if progress else True)
        for (block, name), layer in bar:
            w = weight_matrix(layer)
            twin = SparseTwin(layer, _kind(w, device))
            for batch in config.batch:
                x = torch.randn(batch, config.seqlen, w.shape[1], device=device, dtype=dtype)
                dense = median_time(lambda layer=layer, x=x: layer(x), config.repeats, sync)
                sparse = median_time(lambda twin=twin, x=x: twin(x), config.repeats, sync)
                rows.append({"layer": f"{block}.{name}", "type": name, "shape": list(w.shape), "sparsity": float((w == 0).float().mean()),
                             "kind": twin.kind, "batch": batch, "dense_s": dense, "sparse_s": sparse,
                             "speedup": dense / sparse})  # fmt: skip
        sparse_model = copy.deepcopy(model)
        kinds = sparsify_model(sparse_model)
        whole: list[dict[str, Any]] = []
        vocab = model.get_input_embeddings().weight.shape[0]
        for batch in config.batch:
            ids = torch.randint(0, vocab, (batch, config.seqlen), device=device)
            dense = median_time(lambda ids=ids: model(ids, use_cache=False), config.repeats, sync)
            sparse = median_time(lambda ids=ids: sparse_model(ids, use_cache=False), config.repeats, sync)
            whole.append({"what": "forward", "batch": batch, "dense_s": dense, "sparse_s": sparse,
                          "speedup": dense / sparse})  # fmt: skip
        if config.decode_tokens:
            ids = torch.randint(0, vocab, (1, 8), device=device)

            def decode(m: nn.Module) -> Callable[[], Any]:
                return lambda: m.generate(ids, max_new_tokens=config.decode_tokens, min_new_tokens=config.decode_tokens,
                                          do_sample=False, use_cache=True)  # fmt: skip

            repeats = max(1, config.repeats // 4)
            dense, sparse = (
                median_time(decode(model), repeats, sync),
                median_time(decode(sparse_model), repeats, sync),
            )
            whole.append({"what": f"greedy decode {config.decode_tokens} tokens", "batch": 1, "dense_s": dense,
                          "sparse_s": sparse, "speedup": dense / sparse})  # fmt: skip
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "repeats": config.repeats, "seqlen": config.seqlen, "kinds": sorted(set(kinds.values())),
            "layers": rows, "model": whole}  # fmt: skip
