"""The bitmask kernels against the dense product of the masked weight, on every instruction set this CPU runs (the
scalar path always), and the dense fallback when the kernels are off."""

import pytest
import torch

from besa.errors import BesaError
from besa.formats.quant import QuantSpec, dequantize_codes, fake_quantize, quant_params, quantize_codes
from besa.formats.sparse import pack_weight
from besa.runtime import kernels as kernels_module
from besa.runtime.kernels import kernels
from besa.runtime.layout import PAD, from_saved, pack, pack_codes, quantize
from besa.runtime.linear import SparseLinear, measure_crossover
from conftest import KERNEL_SHAPES, pruned_weight

needs_kernels = pytest.mark.skipif(not kernels().available, reason=kernels().reason or "no kernels")


@pytest.mark.parametrize(("rows", "cols", "sparsity"), KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layout_holds_exactly_the_kept_values(rows, cols, sparsity, dtype):
    w = pruned_weight(rows, cols, sparsity, seed=rows).to(dtype)
    packed = pack(w)
    assert torch.equal(packed.dense(), w)
    nnz = int((w != 0).sum())
    assert (
        packed.nnz == int(packed.offsets[-1]) == nnz
        and packed.values.numel() == nnz + PAD
        and packed.kpad % 16 == 0
    )
    assert not packed.values[nnz:].any()  # the padding a vector load may reach is zeros
    saved = from_saved(*pack_weight(w), rows, cols)  # straight from the saved format, byte by byte
    assert torch.equal(saved.mask, packed.mask) and torch.equal(saved.values, packed.values)
    assert torch.equal(saved.offsets, packed.offsets)


@needs_kernels
@pytest.mark.parametrize(("rows", "cols", "sparsity"), KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 6, 7, 8, 13, 18])
def test_every_instruction_set_gives_the_dense_product_of_the_masked_weight(
    rows, cols, sparsity, dtype, tokens
):
    w = pruned_weight(rows, cols, sparsity, seed=cols)
    layer = SparseLinear(pack(w, dtype))
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    expected = (x.double() @ w.to(dtype).double().T).float()
    bound = 1e-5 * (x.abs().double() @ w.abs().double().T).float() + 1e-6  # float32 sums in another order
    for isa in range(kernels().isa + 1):
        got = layer.kernel(x, isa)
        assert got.shape == (tokens, rows)
        assert ((got - expected).abs() <= bound).all(), (isa, (got - expected).abs().max())


@pytest.mark.skipif(kernels().isa < 3, reason="needs two AVX-512 paths (this CPU runs fewer)")
@pytest.mark.parametrize(("rows", "cols", "sparsity"), KERNEL_SHAPES)
@pytest.mark.parametrize("values", ["float32", "bfloat16", 8, 4])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_the_avx512_paths_agree_bit_for_bit(rows, cols, sparsity, values, tokens):
    """``vexpandps`` and the bit-count ``vpermps`` (and VBMI2's byte spread for 4-bit codes) place the same weights
    in the same lanes and add them in the same order: the same floats, not merely close ones."""
    w = pruned_weight(rows, cols, sparsity, seed=rows * cols)
    if isinstance(values, int):
        packed = quantize(pack(w), QuantSpec(values, 16))
    else:
        packed = pack(w, getattr(torch, values))
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    layer = SparseLinear(packed)
    first = layer.kernel(x, 2)
    for isa in range(3, kernels().isa + 1):
        assert torch.equal(layer.kernel(x, isa), first), isa


@needs_kernels
@pytest.mark.parametrize(("rows", "cols", "sparsity"), KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_unpacked_weight_is_the_dense_weight_bit_for_bit(rows, cols, sparsity, dtype):
    w = pruned_weight(rows, cols, sparsity, seed=rows + cols).to(dtype)
    packed = pack(w)
    layer = SparseLinear(packed)
    assert torch.equal(layer.unpacked(), w.float())
    for isa in range(kernels().isa + 1):
        full = kernels().module.bitmask_unpack(
            *packed.kernel_args(), isa, torch.full((rows, packed.kpad), 7.0)
        )
        assert (
            full.shape == (rows, packed.kpad)
            and torch.equal(full[:, :cols], w.float())
            and not full[:, cols:].any()
        )


@needs_kernels
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_n_m_weights_multiply_exactly_as_dense(nm):
    w = pruned_weight(48, 64, 0.5, seed=3, nm=nm)
    assert (w.reshape(48, -1, nm[1]) == 0).sum(-1).eq(nm[0]).all()
    layer = SparseLinear(pack(w))
    x = torch.randn(4, 64)
    for isa in range(kernels().isa + 1):
        torch.testing.assert_close(layer.kernel(x, isa), x @ w.T, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_forward_of_any_shape_and_bias_matches_nn_linear():
    torch.manual_seed(0)
    dense = torch.nn.Linear(40, 24)
    with torch.no_grad():
        dense.weight.masked_fill_(torch.rand(24, 40) < 0.6, 0.0)
    layer = SparseLinear(pack(dense.weight), dense.bias)
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    layer.crossover = 4  # six tokens: the weight unpacked for one dense product
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_without_kernels_every_product_runs_dense_and_says_why(monkeypatch):
    monkeypatch.setenv("BESA_KERNELS", "0")
    kernels_module.kernels.cache_clear()
    try:
        off = kernels()
        assert not off.available and "BESA_KERNELS=0" in off.reason and "\n" not in off.reason
        torch.manual_seed(1)
        w = pruned_weight(24, 40, 0.5, seed=1)
        layer = SparseLinear(pack(w))
        x = torch.randn(3, 40)
        torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-6, atol=1e-6)
        assert measure_crossover(layer) == 0
    finally:
        kernels_module.kernels.cache_clear()


@needs_kernels
def test_the_crossover_is_the_first_token_count_where_another_path_wins(monkeypatch):
    from besa.runtime import linear as linear_module

    layer = SparseLinear(pack(pruned_weight(24, 40, 0.5, seed=4)))

    def timings(layer_, count, dtype, paths):  # the kernel costs 1 + tokens / 4, every other path 4
        return {name: 1.0 + count / 4 if name == "kernel" else 4.0 for name in paths}

    monkeypatch.setattr(linear_module, "_timings", timings)
    assert measure_crossover(layer, counts=(1, 2, 4, 8, 16, 32)) == 16  # 1 + 16 / 4 = 5 > 4
    assert measure_crossover(layer, counts=(1, 2)) == 0  # the kernel wins at every count tried


CODE_SHAPES = [
    (7, 13, 0.5, 0),
    (33, 40, 0.0, 16),
    (64, 100, 0.9, 32),
    (19, 129, 0.3, 128),
    (96, 256, 0.7, 64),
]


def _codes_of(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero = quant_params(w, spec)
    return quantize_codes(fake_quantize(w, scale, zero, spec), scale, zero, spec), scale, zero


@pytest.mark.parametrize(("rows", "cols", "sparsity", "group_size"), CODE_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_integer_codes_hold_exactly_the_dequantized_weights(rows, cols, sparsity, group_size, bits):
    spec = QuantSpec(bits, group_size)
    w = pruned_weight(rows, cols, sparsity, seed=rows + bits)
    codes, scale, zero = _codes_of(w, spec)
    packed = pack_codes(codes, w != 0, scale, zero, spec)
    expected = dequantize_codes(codes, scale, zero, spec) * (w != 0)  # pruned codes sit on the zero point
    assert torch.equal(packed.dense(), expected)
    kept = int((w != 0).sum())
    stored = packed.values.numel() - PAD
    assert stored == kept if bits == 8 else kept / 2 <= stored <= kept / 2 + rows * packed.kpad // 32
    assert torch.equal(quantize(pack(w), spec).dense(), expected)  # rounding a float layout: the same codes
    if kernels().available:
        for isa in range(kernels().isa + 1):
            full = kernels().module.bitmask_unpack(
                *packed.kernel_args(), isa, torch.full((rows, packed.kpad), 7.0)
            )
            assert torch.equal(full[:, :cols], expected) and not full[:, cols:].any(), isa


@needs_kernels
@pytest.mark.parametrize(("rows", "cols", "sparsity", "group_size"), CODE_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 8, 11])
def test_every_instruction_set_multiplies_codes_as_their_dequantized_weights(
    rows, cols, sparsity, group_size, bits, tokens
):
    spec = QuantSpec(bits, group_size)
    w = pruned_weight(rows, cols, sparsity, seed=cols + bits)
    packed = pack_codes(*_codes_of(w, spec)[:1], w != 0, *_codes_of(w, spec)[1:], spec)
    dense = packed.dense()
    layer = SparseLinear(packed)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    expected = (x.double() @ dense.double().T).float()
    bound = 1e-5 * (x.abs().double() @ dense.abs().double().T).float() + 1e-6
    for isa in range(kernels().isa + 1):
        got = layer.kernel(x, isa)
        assert ((got - expected).abs() <= bound).all(), (isa, (got - expected).abs().max())


def test_codes_the_kernels_cannot_hold_are_refused_in_one_line():
    w = pruned_weight(8, 32, 0.5, seed=0)
    codes, scale, zero = _codes_of(w, QuantSpec(4, 8))
    with pytest.raises(BesaError, match="multiple of 16"):
        pack_codes(codes, w != 0, scale, zero, QuantSpec(4, 8))
    with pytest.raises(BesaError, match="8-bit or 4-bit"):
        quantize(pack(w), QuantSpec(3, 16))
