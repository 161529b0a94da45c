import pytest
import torch

from besa.config import NMPattern
from besa.methods.sparsegpt import sparsegpt_prune
from besa.stages.masks import select_prune_mask
from besa.stages.selection import HessianStats, wanda_scores


def _problem(rows=32, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix  # correlated inputs
    w = torch.randn(rows, cols, generator=g)
    stats = HessianStats(cols, torch.device("cpu"))
    stats.add(x)
    return w, x, stats.hessian


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_prunes_exactly_and_beats_wanda_on_output_error(sparsity):
    w, x, h = _problem()
    new_w, mask, _ = sparsegpt_prune(w, h, sparsity, blocksize=16)
    assert int((new_w == 0).sum()) == round(sparsity * w.numel())
    assert torch.equal(new_w == 0, mask)
    norms = x.norm(dim=0)
    wanda_w = w.masked_fill(select_prune_mask(wanda_scores(w, norms), sparsity, None), 0)
    err_sgpt = (x @ new_w.t() - x @ w.t()).square().sum()
    err_wanda = (x @ wanda_w.t() - x @ w.t()).square().sum()
    assert err_sgpt < err_wanda


def test_sparsegpt_nm_structure_holds():
    w, _, h = _problem()
    new_w, _, _ = sparsegpt_prune(w, h, 0.5, NMPattern(2, 4), blocksize=16)
    assert ((new_w == 0).reshape(32, 16, 4).sum(-1) == 2).all()


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged():
    w, _, h = _problem()
    new_w, mask, _ = sparsegpt_prune(w, h, 0.0)
    assert not mask.any()
    torch.testing.assert_close(new_w, w)


def test_sparsegpt_handles_dead_inputs():
    w, x, _ = _problem(cols=16)
    x[:, 3] = 0  # a feature that is never active
    stats = HessianStats(16, torch.device("cpu"))
    stats.add(x)
    new_w, _, _ = sparsegpt_prune(w, stats.hessian, 0.5)
    assert (new_w[:, 3] == 0).all()
    assert int((new_w == 0).sum()) == w.numel() // 2


def test_every_column_block_prunes_exactly_its_share():
    """Pinned after comparing with llm-compressor block by block: with the same Hessian the two sweeps choose the
    same weights, except that a threshold test (``saliency <= the k-th value``) prunes one extra weight per column
    block (0.500012 counted). Ours takes the k lowest by rank: block [i1, i2) holds exactly
    round(s * rows * i2) - round(s * rows * i1) zeros, and the layer exactly round(s * rows * cols)."""
    w, _, h = _problem(rows=24, cols=100)
    for sparsity in (0.5, 0.3):
        new_w, _, _ = sparsegpt_prune(w, h, sparsity, blocksize=32)
        for i1 in range(0, 100, 32):
            i2 = min(i1 + 32, 100)
            share = round(sparsity * 24 * i2) - round(sparsity * 24 * i1)
            assert int((new_w[:, i1:i2] == 0).sum()) == share, (sparsity, i1)
        assert int((new_w == 0).sum()) == round(sparsity * w.numel())
