import tempfile

import pytest
import torch

from besa.errors import BesaError
from besa.stages.adam import DenseAdam, KeptAdam, SpilledTensors, adam_update, pack_bits, unpack_bits


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, 10, generator=gen), torch.randn(4, 6, generator=gen)]
    for p in params:
        p.masked_fill_(torch.rand(p.shape, generator=gen) < 0.5, 0.0)
    return params


def _loss(params: list[torch.Tensor], x: torch.Tensor, use_second: bool = True) -> torch.Tensor:
    h = torch.tanh(x @ params[0].T)
    return (h @ params[1].T).square().mean() if use_second else h.square().mean()


def test_adam_update_is_torch_adams_step():
    gen = torch.Generator().manual_seed(1)
    value = torch.randn(50, generator=gen)
    ref = value.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=3e-2)
    m, v = torch.zeros(50), torch.zeros(50)
    for step in range(1, 6):
        grad = torch.randn(50, generator=gen)
        ref.grad = grad.clone()
        opt.step()
        adam_update(value, grad, m, v, step, 3e-2)
        assert torch.allclose(value, ref.detach(), rtol=0, atol=1e-6), step


@pytest.mark.parametrize("use_second", [True, False])
def test_kept_adam_steps_as_torch_adam_on_the_kept_weights_and_never_writes_a_zero(use_second):
    """Against ``torch.optim.Adam`` with the zeros' gradients masked (the refit's ``DenseAdam``): the same weights
    after several steps; a tensor the loss does not use (an expert no token reached) still steps on Adam's
    momentum, as torch's does; the zeros stay exactly zero, no gradient is left, and the moments are kept-sized."""
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    lean, dense = _params(), _params()
    zeros = [p == 0 for p in lean]
    for p in (*lean, *dense):
        p.requires_grad_(True)
    kept = KeptAdam(lean, [1e-2, 1e-2])
    ref = DenseAdam(dense, [{"params": dense, "lr": 1e-2}])
    for step in range(4):
        kept.step(_loss(lean, x, use_second or step == 0))
        ref.step(_loss(dense, x, use_second or step == 0))
    for p, q, z in zip(lean, dense, zeros, strict=True):
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-6)
        assert torch.all(p.detach()[z] == 0) and p.grad is None
    assert [m.numel() for m in kept.m] == [int((~z).sum()) for z in zeros]
    assert not torch.equal(lean[1].detach(), _params()[1])  # the unused tensor moved on its momentum


def test_kept_adam_snapshot_restores_the_kept_values():
    params = _params()
    for p in params:
        p.requires_grad_(True)
    opt = KeptAdam(params, [1e-2, 1e-2])
    saved = opt.snapshot()
    before = [p.detach().clone() for p in params]
    opt.step(_loss(params, torch.randn(8, 10)))
    assert not torch.equal(params[0].detach(), before[0])
    opt.restore(saved)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 11), (0, 4)])
def test_pack_bits_holds_one_bit_per_entry_and_unpacks_to_the_same_mask(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(bits, mask.shape), mask)


def test_pack_bits_puts_the_first_entry_in_the_lowest_bit():
    first_and_tenth = torch.tensor([True] + [False] * 8 + [True])
    assert pack_bits(first_and_tenth).tolist() == [1, 2]


def test_spilled_tensors_read_back_every_dtype_exactly_and_leave_no_named_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gen = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(5, 3, generator=gen),
        torch.randn(7, generator=gen).to(torch.bfloat16),
        torch.randint(-9, 9, (2, 2, 2), generator=gen),
        torch.empty(0),
        torch.randn(4, 6, generator=gen).T,  # not contiguous
    ]
    spilled = SpilledTensors(iter(tensors))
    assert list(tmp_path.iterdir()) == []  # anonymous: nothing to delete, even after a crash
    for _ in range(2):  # read back as often as asked
        back = list(spilled)
        assert len(back) == len(tensors)
        for b, t in zip(back, tensors, strict=True):
            assert b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t)


def test_kept_adam_holds_its_kept_entries_as_bits_and_its_snapshot_outside_memory():
    params = _params()
    opt = KeptAdam(params, [1e-2, 1e-2])
    assert [b.numel() for b in opt.bits] == [-(-p.numel() // 8) for p in params]
    assert all(torch.equal(opt._keep(i), p != 0) for i, p in enumerate(params))
    saved = opt.snapshot()
    assert isinstance(saved, SpilledTensors)
    assert [t.numel() for t in saved] == [int((p != 0).sum()) for p in params]


def test_spilled_tensors_without_a_usable_temporary_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "gone"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    with pytest.raises(BesaError, match="set TMPDIR") as err:
        SpilledTensors(iter([torch.ones(3)]))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
