import pytest
import torch

from besa.errors import BesaError
from besa.formats.quant import (
    QuantSpec,
    dequantize_codes,
    fake_quantize,
    quant_params,
    quantize_codes,
    round_ste,
)


def _w(rows=8, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 16, 64])
def test_fake_quantize_lands_on_the_grid_and_keeps_zeros(bits, group_size):
    spec = QuantSpec(bits, group_size)
    w = _w()
    w[:, ::3] = 0  # pruned positions
    h, z = quant_params(w, spec)
    q = fake_quantize(w, h, z, spec)
    assert torch.equal(q[:, ::3], torch.zeros_like(q[:, ::3]))
    codes = quantize_codes(q, h, z, spec)
    assert int(codes.max()) <= spec.qmax
    assert torch.equal(dequantize_codes(codes, h, z, spec), q)  # every value is (code - zero) * scale exactly
    groups = 1 if group_size == 0 else 64 // group_size
    assert h.shape == z.shape == (8, groups)
    assert all(len(q[r].reshape(groups, -1)[g].unique()) <= 2**bits for r in range(8) for g in range(groups))
    # round to nearest: no value moves by more than half a step (nothing is clipped without gamma < 1)
    step = h.repeat_interleave(64 // groups, dim=1)
    assert ((q - w).abs() <= step / 2 + 1e-6).all()


def test_more_bits_means_less_error():
    w = _w(16, 128)
    errors = []
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits, 32)
        errors.append(float((fake_quantize(w, *quant_params(w, spec), spec) - w).square().mean()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_round_ste_passes_gradients_and_clipping_is_learnable():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    spec = QuantSpec(3, 16)
    w = _w(4, 32)
    logits = torch.full((2, 4, 2), 4.0, requires_grad=True)
    gamma = torch.sigmoid(logits)
    h, z = quant_params(w, spec, gamma[0], gamma[1], ste=True)
    loss = (fake_quantize(w, h, z, spec, ste=True) - w).square().sum()
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bad_specs_are_refused():
    with pytest.raises(BesaError, match="between 2 and 8"):
        QuantSpec(9)
    with pytest.raises(BesaError, match="group-size"):
        QuantSpec(4, -1)


def test_a_narrower_last_group_has_its_own_grid():
    spec = QuantSpec(4, 32)  # 72 = 32 + 32 + 8 columns (SmolLM2's 576 = 4 x 128 + 64 is such a case)
    w = _w(6, 72)
    w[:, 64:] *= 0.01  # the last 8 columns: a much smaller range
    h, z = quant_params(w, spec)
    assert h.shape == (6, 3)
    q = fake_quantize(w, h, z, spec)
    assert q.shape == w.shape
    assert torch.equal(dequantize_codes(quantize_codes(q, h, z, spec), h, z, spec), q)
    last = quant_params(w[:, 64:], QuantSpec(4, 0))
    assert torch.equal(h[:, 2:], last[0]) and torch.equal(z[:, 2:], last[1])
