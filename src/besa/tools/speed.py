"""``besa speedup``: what the zeros of a saved model buy, measured on the machine at hand.

Every pruned linear is timed dense (``F.linear``) against a sparse kernel: on the CPU besa's bitmask kernels
(``besa.runtime``, float32 and bfloat16 weights; torch's CSR, ``torch.sparse.mm``, where they could not be built),
and on CUDA the 2:4 semi-structured kernels (``to_sparse_semi_structured``) for 2:4 weights (CSR otherwise). Then
one whole forward and a greedy decode, the model as saved vs the same model with every pruned linear swapped for its
sparse twin. On the CPU all of it at each thread count asked for, and again in bfloat16 (dense bfloat16 against
sparse with bfloat16 values). Times are medians of repeats, dense and sparse interleaved in one run. Sparse may
well be slower; the table says so either way.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.settings.commands import SpeedConfig

__all__ = ["SparseTwin", "is_two_four", "measure_speed", "sparsify_model"]


def is_two_four(w: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row holds at least 2 zeros."""
    rows, cols = w.shape
    return cols % 4 == 0 and bool(((w == 0).reshape(rows, cols // 4, 4).sum(-1) >= 2).all())


_PLANS: dict[tuple, tuple] = {}
"""The bitmask twins' plans (``besa.runtime.linear.measure_plan``) by (weight shape, input dtype, threads), measured on the first linear of
that shape at that thread count."""


class SparseTwin(nn.Module):
    """A linear whose weight is held in a sparse layout: ``bitmask`` (besa's CPU kernels, ``besa.runtime``), ``csr``
    (any device) or ``2:4`` (CUDA semi-structured)."""

    def __init__(self, layer: nn.Module, kind: str, values: torch.dtype | None = None) -> None:
        super().__init__()
        w = weight_matrix(layer).detach()
        w = w if values is None else w.to(values)
        self.kind = kind
        self.out_features, self.in_features = w.shape
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        if kind == "bitmask":
            from besa.runtime.layout import pack
            from besa.runtime.linear import SparseLinear

            self.bitmask = SparseLinear(pack(w), None)
            self.tune(w.dtype)
        elif kind == "2:4":
            from torch.sparse import to_sparse_semi_structured

            self.weight = nn.Parameter(to_sparse_semi_structured(w.contiguous()), requires_grad=False)
        else:
            self.weight_csr = w.to_sparse_csr()

    def tune(self, dtype: torch.dtype) -> None:
        """Set the bitmask twin's plan for inputs of ``dtype`` at torch's current thread count (measured once per
        weight shape, dtype and thread count)."""
        from besa.runtime.linear import measure_plan

        if self.kind != "bitmask":
            return
        key = (self.out_features, self.in_features, dtype, torch.get_num_threads())
        if key not in _PLANS:
            _PLANS[key] = measure_plan(self.bitmask, counts=(1, 8, 32, 128), dtype=dtype)
        self.bitmask.plan = _PLANS[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bitmask":
            y = self.bitmask(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
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


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pair(dense: Callable[[], Any], sparse: Callable[[], Any], repeats: int, sync: Callable[[], None],
          tag: str = "") -> dict[str, float]:  # fmt: skip
    """``dense_s``, ``sparse_s`` and ``speedup`` (``tag`` ``"_bf16"``: ``dense_bf16_s``, ...) of one side-by-side:
    medians of ``repeats`` calls each after two warm-up calls each, dense and sparse taking turns."""
    times: tuple[list[float], list[float]] = ([], [])
    for rep in range(repeats + 2):
        for fn, spent in zip((dense, sparse), times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            if rep >= 2:
                spent.append(time.perf_counter() - start)
    d, s = statistics.median(times[0]), statistics.median(times[1])
    return {f"dense{tag}_s": d, f"sparse{tag}_s": s, f"speedup{tag}": d / s}


def _measure(model: nn.Module, config: SpeedConfig, device: torch.device, progress: bool) -> dict[str, Any]:
    import copy

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = next(model.parameters()).dtype
    from besa.runtime.kernels import kernels

    bf16 = config.bf16 and device.type == "cpu" and dtype != torch.bfloat16 and kernels().available
    threads = config.threads if device.type == "cpu" else (torch.get_num_threads(),)
    linears = {(b, n): lin for b, blk in find_blocks(model) for n, lin in find_linears(blk, model).items()}
    pruned = {key: lin for key, lin in linears.items() if bool((weight_matrix(lin) == 0).any())}
    if not pruned:
        raise BesaError("the model has no pruned linears (no zeros in any block's linears)")
    with torch.inference_mode():
        rows = _linear_rows(pruned, config, threads, bf16, sync, progress)
        pairs = {"": (model, copy.deepcopy(model))}
        if bf16:
            dense16 = copy.deepcopy(model).to(torch.bfloat16)
            pairs["_bf16"] = (dense16, copy.deepcopy(dense16))
        kinds: dict[str, str] = {}
        for _, sparse in pairs.values():
            kinds |= sparsify_model(sparse)
        whole = [row for count in threads for row in _whole_model(pairs, config, count, sync)]
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": list(threads),
            "repeats": config.repeats, "seqlen": config.seqlen, "kinds": sorted(set(kinds.values())),
            "layers": rows, "model": whole}  # fmt: skip


def _linear_rows(pruned: dict[tuple[str, str], nn.Module], config: SpeedConfig, threads: tuple[int, ...],
                 bf16: bool, sync: Callable[[], None], progress: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Every pruned linear dense against its sparse twin at each thread count and batch (and in bfloat16 when
    ``bf16``). A pass calls every linear of one variant once, in model order, so each one's weights come from
    memory as in a decode step (the same linear called again and again would run from the cache); the median
    over ``repeats`` passes, after two warm-up passes."""
    pruned_keys = list(pruned)
    layers = list(pruned.values())
    weights = [weight_matrix(layer) for layer in layers]
    kinds = [_kind(w, w.device) for w in weights]
    variants: dict[str, list[Callable[[torch.Tensor], Any]]] = {
        "dense_s": layers, "sparse_s": [SparseTwin(lin, k) for lin, k in zip(layers, kinds, strict=True)]}  # fmt: skip
    if bf16:
        biases = [getattr(lin, "bias", None) for lin in layers]
        variants["dense_bf16_s"] = [partial(F.linear, weight=w.to(torch.bfloat16),
                                            bias=None if b is None else b.to(torch.bfloat16))
                                    for w, b in zip(weights, biases, strict=True)]  # fmt: skip
        variants["sparse_bf16_s"] = [SparseTwin(lin, "bitmask", torch.bfloat16) for lin in layers]
    from tqdm.auto import tqdm

    rows = []
    total = len(threads) * len(config.batch) * len(variants) * (config.repeats + 2)
    bar = tqdm(total=total, desc="Timing linears (passes)", disable=None if progress else True)
    for count in threads:
        with _threads(count):
            for key, twins in variants.items():
                for twin in twins:
                    if isinstance(twin, SparseTwin):
                        twin.tune(torch.bfloat16 if "bf16" in key else weights[0].dtype)
            for batch in config.batch:
                inputs = {w.shape[1]: torch.randn(batch, config.seqlen, w.shape[1], device=w.device, dtype=w.dtype)
                          for w in weights}  # fmt: skip
                half = {width: x.to(torch.bfloat16) for width, x in inputs.items()}
                feeds = {key: half if "bf16" in key else inputs for key in variants}
                seconds = _passes(variants, weights, feeds, config.repeats, (sync, bar))
                for (block, name), w, i in zip(pruned_keys, weights, range(len(weights)), strict=True):
                    row = {"layer": f"{block}.{name}", "type": name, "shape": list(w.shape), "kind": kinds[i], "sparsity": float((w == 0).float().mean()),
                           "batch": batch, "threads": count, **{key: s[i] for key, s in seconds.items()}}  # fmt: skip
                    row["speedup"] = row["dense_s"] / row["sparse_s"]
                    if "dense_bf16_s" in row:
                        row["speedup_bf16"] = row["dense_bf16_s"] / row["sparse_bf16_s"]
                    rows.append(row)
    bar.close()
    return rows


def _passes(variants: dict[str, list[Callable[[torch.Tensor], Any]]], weights: list[torch.Tensor],
            feeds: dict[str, dict[int, torch.Tensor]], repeats: int, hooks: tuple[Callable[[], None], Any],
            ) -> dict[str, list[float]]:  # fmt: skip
    """Median seconds of every call of every variant (one call per linear, on the input of its width in the
    variant's ``feeds``), over passes in model order, the variants taking turns pass by pass (a drift of the
    machine's speed moves them alike); ``hooks``: the device sync and the progress bar."""
    sync, bar = hooks
    times = {key: [[] for _ in calls] for key, calls in variants.items()}
    for rep in range(repeats + 2):
        for key, calls in variants.items():
            for i, (call, w) in enumerate(zip(calls, weights, strict=True)):
                x = feeds[key][w.shape[1]]
                start = time.perf_counter()
                call(x)
                sync()
                if rep >= 2:
                    times[key][i].append(time.perf_counter() - start)
            bar.update(1)
    return {key: [statistics.median(t) for t in per] for key, per in times.items()}


def _whole_model(
    pairs: dict[str, tuple[nn.Module, nn.Module]], config: SpeedConfig, count: int, sync
) -> list[dict]:
    """The forward and greedy decode rows at ``count`` threads: each pair (dense, sparse) of ``pairs`` timed side by
    side, tagged ``""`` (the model's own dtype) or ``"_bf16"`` (bfloat16)."""
    model = pairs[""][0]
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    out: list[dict] = []
    with _threads(count):
        for _, sparse in pairs.values():
            for twin in sparse.modules():
                if isinstance(twin, SparseTwin):
                    twin.tune(next(sparse.parameters()).dtype)
        for batch in config.batch:
            ids = torch.randint(0, vocab, (batch, config.seqlen), device=device)
            row = {"what": "forward", "batch": batch, "threads": count}
            for tag, (dense, sparse) in pairs.items():
                forward = partial(dense, ids, use_cache=False), partial(sparse, ids, use_cache=False)
                row |= _pair(*forward, config.repeats, sync, tag)
            out.append(row)
        if config.decode_tokens:
            ids = torch.randint(0, vocab, (1, 8), device=device)

            def decode(m: nn.Module) -> Callable[[], Any]:
                return partial(m.generate, ids, max_new_tokens=config.decode_tokens,
                               min_new_tokens=config.decode_tokens, do_sample=False, use_cache=True)  # fmt: skip

            row = {"what": f"greedy decode {config.decode_tokens} tokens", "batch": 1, "threads": count}
            for tag, (dense, sparse) in pairs.items():
                row |= _pair(decode(dense), decode(sparse), max(1, config.repeats // 4), sync, tag)
            out.append(row)
    return out
