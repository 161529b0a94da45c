import pytest
import torch

from besa.stages.adam import DenseAdam, KeptAdam, adam_update


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
