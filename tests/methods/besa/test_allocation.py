import pytest
import torch

from besa.methods.besa.allocation import (
    candidate_rates,
    expected_rates,
    hard_keep_by_rank,
    round_to_budget,
    soft_keep_by_rank,
    straight_through,
    tilted_logits,
    to_columns,
)


def test_candidates_are_ascending_and_span_the_range():
    c = candidate_rates(100, 0.3, 0.7)
    assert c.shape == (100,) and c[0] == pytest.approx(0.3) and c[-1] == pytest.approx(0.7)
    assert (c.diff() > 0).all()


@pytest.mark.parametrize("target", [0.05, 0.3, 0.5, 0.62, 0.9, 0.95])
def test_tilted_logits_hit_the_target_expectation(target):
    rates = candidate_rates(100, max(0.0, target - 0.3), min(0.99, target + 0.3))
    theta = tilted_logits(rates, target)
    assert float(expected_rates(theta[None], rates)) == pytest.approx(target, abs=1e-4)


def test_soft_keep_matches_the_definition():
    torch.manual_seed(0)
    rates = candidate_rates(7, 0.1, 0.9)
    theta = torch.randn(3, 7)
    cols = 10
    got = soft_keep_by_rank(theta, rates, cols, rows=3)
    beta = torch.softmax(theta, -1)
    cut = (rates * cols).floor()
    j = torch.arange(cols)
    expected = 1 - (beta[:, :, None] * (j[None, None, :] < cut[None, :, None])).sum(1)
    torch.testing.assert_close(got, expected)
    assert (got.diff(dim=1) >= -1e-6).all()  # keep-probability grows with importance rank


def test_shared_layer_distribution_broadcasts_to_every_row():
    rates = candidate_rates(5, 0.2, 0.8)
    got = soft_keep_by_rank(torch.zeros(1, 5), rates, 8, rows=4)
    assert got.shape == (4, 8) and torch.equal(got[0], got[3])


def test_straight_through_forward_is_hard_and_gradient_is_soft():
    theta = torch.zeros(2, 5, requires_grad=True)
    rates = candidate_rates(5, 0.2, 0.8)
    hard = hard_keep_by_rank(torch.tensor([3, 1]), 6)
    soft = soft_keep_by_rank(theta, rates, 6, rows=2)
    mask = straight_through(hard, soft)
    assert torch.equal(mask, hard.float())
    (mask * torch.arange(6.0)).sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_to_columns_inverts_the_ranking():
    order = torch.tensor([[2, 0, 1], [0, 1, 2]])
    by_rank = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    assert to_columns(by_rank, order).tolist() == [[20.0, 30.0, 10.0], [1.0, 2.0, 3.0]]


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_round_to_budget_is_exact_and_keeps_the_allocation_shape(target):
    torch.manual_seed(1)
    rates = (target + 0.1 * torch.randn(50)).clamp(0, 0.99)
    widths = torch.tensor([16] * 30 + [48] * 20)
    budget = round(target * int(widths.sum()))
    counts, shift = round_to_budget(rates, widths, budget, max_rate=0.99)
    assert int(counts.sum()) == budget
    assert (counts >= 0).all() and (counts <= (0.99 * widths).floor()).all()
    ideal = ((rates + shift).clamp(0, 0.99) * widths).clamp(max=(0.99 * widths).floor())
    assert ((counts - ideal).abs() <= 1.0 + 1e-9).all()
    # ordering of rates within equal widths is preserved (up to rounding)
    hi, lo = rates[:30].argmax(), rates[:30].argmin()
    assert counts[hi] >= counts[lo]


def test_round_to_budget_refuses_the_impossible():
    with pytest.raises(ValueError):
        round_to_budget(torch.full((2,), 0.5), torch.tensor([4, 4]), budget=8, max_rate=0.5)
