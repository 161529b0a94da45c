import pytest
import torch

from besa.methods.besa.layer import PatternLogits
from besa.methods.besa.patterns import (
    ANNEAL_END,
    keep_patterns,
    pattern_hard_keep,
    pattern_prior,
    pattern_soft_keep,
    temperature,
)
from besa.settings.values import NMPattern
from besa.stages.masks import nm_prune_mask


@pytest.mark.parametrize(("n", "m", "count"), [(2, 4, 6), (1, 4, 4), (4, 8, 70), (1, 2, 2)])
def test_keep_patterns_are_every_distinct_way_to_keep_m_minus_n(n, m, count):
    p = keep_patterns(NMPattern(n, m))
    assert p.shape == (count, m)
    assert (p.sum(1) == m - n).all()
    assert len({tuple(r.tolist()) for r in p}) == count


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)])
def test_prior_starts_at_the_metrics_own_nm_mask_whatever_the_scale(pattern):
    scores = torch.rand(6, 32, generator=torch.Generator().manual_seed(0))
    patterns = keep_patterns(pattern)
    for scale in (1e-3, 1.0, 1e3):
        theta = pattern_prior(scores * scale, patterns, sharpness=1.0)
        assert torch.equal(pattern_hard_keep(theta, patterns), ~nm_prune_mask(scores, pattern))
    # the softmax is proportional to the product of the kept scores: independent of the scores' scale
    a = torch.softmax(pattern_prior(scores, patterns, 2.0), -1)
    b = torch.softmax(pattern_prior(scores * 1e3, patterns, 2.0), -1)
    assert torch.allclose(a, b, atol=1e-5)


def test_soft_keep_is_the_expected_mask_and_sums_to_the_kept_count():
    patterns = keep_patterns(NMPattern(2, 4))
    theta = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    soft = pattern_soft_keep(theta, patterns)
    assert soft.shape == (3, 20)
    assert torch.allclose(soft.reshape(3, 5, 4).sum(-1), torch.full((3, 5), 2.0))
    # a one-hot distribution gives its pattern exactly
    sharp = pattern_soft_keep(theta * 1e4, patterns)
    assert torch.allclose(sharp, pattern_hard_keep(theta, patterns).float(), atol=1e-6)


def test_temperature_anneals_from_one_to_the_end_value():
    assert temperature(0.0) == 1.0 and temperature(1.0) == pytest.approx(ANNEAL_END)
    assert 1.0 > temperature(0.5) > ANNEAL_END and temperature(2.0) == temperature(1.0)


def test_prior_refuses_a_width_that_is_not_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 4"):
        pattern_prior(torch.rand(2, 6), keep_patterns(NMPattern(2, 4)), 1.0)


def test_learning_patterns_reduces_the_layer_output_error_below_the_metrics_mask():
    """Annealed steps on one linear, inputs correlated so the metric's choice is not the best one: each group's
    expected keep count stays m - n, the gradient reaches the logits, and the final hard mask's error falls below
    the starting (metric) mask's."""
    g = torch.Generator().manual_seed(0)
    cols = 32
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(256, cols, generator=g) @ mix
    layer = torch.nn.Linear(cols, 16, bias=False)
    layer.weight.data = torch.randn(16, cols, generator=g)
    w = layer.weight.detach()
    scores = w.abs() * x.norm(dim=0)  # Wanda
    rate_logits = PatternLogits("l", layer, scores, NMPattern(2, 4), sharpness=1.0)
    target = x @ w.t()

    def error(keep):
        return float((x @ (w * keep).t() - target).square().mean())

    start = error(rate_logits.keep().float())
    opt = torch.optim.Adam(rate_logits.parameters(), lr=0.05)
    for i in range(200):
        mask, rates = rate_logits.step(i / 199)
        assert torch.allclose(mask.detach().reshape(16, 8, 4).sum(-1), torch.full((16, 8), 2.0))
        assert torch.equal(rates, torch.full((16,), 0.5))
        loss = (x @ (w * mask).t() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert rate_logits.theta.grad is not None and rate_logits.theta.grad.abs().sum() > 0
        opt.step()
    assert ((rate_logits.keep().reshape(16, 8, 4)).sum(-1) == 2).all()
    assert error(rate_logits.keep().float()) < 0.9 * start
    assert rate_logits.moved() > 0
    rate_logits.reset()
    assert rate_logits.moved() == 0 and error(rate_logits.keep().float()) == start
