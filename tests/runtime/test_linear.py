"""``SparseLinear``'s paths: the prefill kernel against the dense product of the masked weight, and the plan that
picks a path by token count (measured, then followed)."""

import pytest
import torch

from besa.formats.quant import QuantSpec
from besa.runtime import linear as linear_module
from besa.runtime.kernels import Kernels, kernels
from besa.runtime.layout import pack, quantize
from besa.runtime.linear import SPMM_ISA, SparseLinear, fastest_paths, measure_plan
from conftest import KERNEL_SHAPES, pruned_weight

needs_spmm = pytest.mark.skipif(
    kernels().isa < SPMM_ISA, reason=kernels().reason or "the prefill kernel needs AVX-512"
)


def _close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``got`` is ``x w^T`` up to float32 sums in another order."""
    expected = (x.double() @ w.double().T).float()
    bound = 1e-5 * (x.abs().double() @ w.abs().double().T).float() + 1e-6
    assert got.shape == expected.shape
    assert ((got - expected).abs() <= bound).all(), (got - expected).abs().max()


TOKENS = [
    1,
    15,
    16,
    33,
    100,
    128,
    130,
    256,
    300,
]  # blocks of 128 tokens, then a last one of fewer, a multiple of 16


@needs_spmm
@pytest.mark.parametrize(("rows", "cols", "sparsity"), KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", TOKENS)
def test_the_prefill_kernel_gives_the_dense_product_of_the_masked_weight(rows, cols, sparsity, dtype, tokens):
    w = pruned_weight(rows, cols, sparsity, seed=rows * 7 + cols)
    layer = SparseLinear(pack(w, dtype))
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    _close(layer.spmm(x, kernels().isa), x, w.to(dtype).float())


@needs_spmm
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("tokens", [16, 70])
def test_the_prefill_kernel_on_n_m_weights(nm, tokens):
    w = pruned_weight(40, 96, 0.5, seed=5, nm=nm)
    layer = SparseLinear(pack(w))
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(1))
    _close(layer.spmm(x, kernels().isa), x, w)


@needs_spmm
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("rows", "cols", "sparsity", "group_size"),
    [(7, 13, 0.5, 0), (64, 100, 0.9, 32), (19, 129, 0.3, 128), (96, 256, 0.7, 64)],
)
def test_the_prefill_kernel_multiplies_codes_as_their_dequantized_weights(
    rows, cols, sparsity, group_size, bits
):
    packed = quantize(pack(pruned_weight(rows, cols, sparsity, seed=cols)), QuantSpec(bits, group_size))
    layer = SparseLinear(packed)
    x = torch.randn(150, cols, generator=torch.Generator().manual_seed(bits))
    _close(layer.spmm(x, kernels().isa), x, packed.dense())


@needs_spmm
def test_a_forward_follows_its_plan_and_every_path_gives_the_same_product(monkeypatch):
    torch.manual_seed(0)
    dense = torch.nn.Linear(40, 24)
    with torch.no_grad():
        dense.weight.masked_fill_(torch.rand(24, 40) < 0.6, 0.0)
    layer = SparseLinear(pack(dense.weight), dense.bias)
    layer.plan = ((4, "spmm"), (9, "dense"), (30, "spmm"))
    assert [layer.path(t) for t in (1, 3, 4, 8, 9, 29, 30, 500)] == ["kernel", "kernel", "spmm", "spmm", "dense",
                                                                      "dense", "spmm", "spmm"]  # fmt: skip
    assert layer.crossover == 4
    found, called = kernels(), []

    class Spy:  # the compiled module, each call recorded
        def __getattr__(self, name):
            def call(*args):
                called.append(name)
                return getattr(found.module, name)(*args)

            return call

    monkeypatch.setattr(linear_module, "kernels", lambda: Kernels(Spy(), found.isa))
    for tokens, expected in (
        (1, "bitmask_linear"),
        (5, "bitmask_spmm"),
        (12, "bitmask_unpack"),
        (31, "bitmask_spmm"),
    ):
        called.clear()
        x = torch.randn(1, tokens, 40)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
        assert called == [expected], tokens
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    layer.crossover = 7  # a crossover alone: the unpacked weight from there on
    assert layer.plan == ((7, "dense"),) and layer.path(100) == "dense"
    layer.crossover = 0
    assert layer.plan == () and layer.path(100) == "kernel"


def test_without_avx512_a_planned_prefill_kernel_runs_dense(monkeypatch):
    found = kernels()
    monkeypatch.setattr(linear_module, "kernels", lambda: Kernels(found.module, 1))
    layer = SparseLinear(pack(pruned_weight(8, 16, 0.5, seed=2)))
    layer.plan = ((2, "spmm"),)
    assert layer.path(1) == ("kernel" if found.available else "dense") and layer.path(5) == "dense"


def test_the_plan_is_the_fastest_path_at_each_count_measured():
    timings = {
        1: {"kernel": 1.0, "spmm": 3.0, "dense": 4.0},
        8: {"kernel": 2.0, "spmm": 2.0, "dense": 4.0},  # a tie: the earlier path of PATHS
        16: {"kernel": 5.0, "spmm": 4.0, "dense": 4.5},
        64: {"kernel": 9.0, "spmm": 6.0, "dense": 5.0},
        128: {"kernel": 20.0, "dense": 9.0},  # no prefill kernel measured
    }
    assert fastest_paths(timings) == ((16, "spmm"), (64, "dense"))
    assert fastest_paths({1: {"kernel": 1.0, "dense": 2.0}}) == ()  # the kernel everywhere


def test_measuring_a_plan_times_every_path_this_cpu_runs(monkeypatch):
    found = kernels()
    if not found.available:
        assert measure_plan(SparseLinear(pack(pruned_weight(8, 16, 0.5, seed=2)))) == ()
        return
    timed: list[tuple[int, str]] = []
    layer = SparseLinear(pack(pruned_weight(24, 40, 0.5, seed=4)))
    costs = {"kernel": lambda t: 1 + t / 4, "spmm": lambda t: 2 + t / 16, "dense": lambda t: 5.0}

    def timings_of(layer_, count, dtype, calls):
        timed.extend((count, name) for name in calls)
        return {name: costs[name](count) for name in calls}

    monkeypatch.setattr(linear_module, "_timings", timings_of)
    plan = measure_plan(layer, counts=(1, 2, 4, 8, 16, 32, 64))
    paths = {"kernel", "dense"} | ({"spmm"} if found.isa >= SPMM_ISA else set())
    assert {name for _, name in timed} == paths and len(timed) == 7 * len(paths)
    # the kernel 1 + t/4, the prefill kernel 2 + t/16, dense 5: the prefill kernel from 8 on (3.5 < 4), dense from
    # 64 on (6 > 5); without it, dense from 32 on (9 > 5; at 16, 5 = 5: a tie the kernel keeps)
    assert plan == (((8, "spmm"), (64, "dense")) if found.isa >= SPMM_ISA else ((32, "dense"),))
