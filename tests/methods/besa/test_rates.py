import pytest
import torch

from besa.methods.besa.rates import (
    candidate_index,
    candidate_rates,
    column_ranks,
    expected_rates,
    hard_keep,
    keep_probability,
    masked_weight,
    round_to_budget,
    straight_through,
    tilted_logits,
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


def _brute_force_keep(theta, rates, order):
    """P[r, col] = 1 - sum_d beta_rd [rank(col) < floor(c_d * C)], straight from the definition."""
    rows, cols = order.shape
    beta = torch.softmax(theta, -1).expand(rows, -1)
    cut = (rates * cols).floor()
    keep = torch.empty(rows, cols)
    for r in range(rows):
        for j in range(cols):
            keep[r, order[r, j]] = 1 - float((beta[r] * (j < cut)).sum())
    return keep


@pytest.mark.parametrize("shared", [False, True])
def test_keep_probability_matches_the_definition(shared):
    torch.manual_seed(0)
    rates = candidate_rates(7, 0.1, 0.9)
    order = torch.stack([torch.randperm(10) for _ in range(3)])
    theta = torch.randn(1 if shared else 3, 7)
    cand = candidate_index(rates, 10)[column_ranks(order)]
    got = keep_probability(torch.softmax(theta, -1), cand)
    torch.testing.assert_close(got, _brute_force_keep(theta, rates, order))


def test_column_ranks_invert_the_order():
    order = torch.tensor([[2, 0, 1], [0, 1, 2]])
    assert column_ranks(order).tolist() == [[1, 2, 0], [0, 1, 2]]


def test_hard_keep_prunes_the_lowest_ranks():
    rank = column_ranks(torch.tensor([[2, 0, 1, 3]]))  # column 2 least important, then 0, 1, 3
    assert hard_keep(rank, torch.tensor([2])).tolist() == [[False, True, False, True]]


def test_straight_through_forward_is_hard_and_gradient_is_soft():
    theta = torch.zeros(2, 5, requires_grad=True)
    rates = candidate_rates(5, 0.2, 0.8)
    order = torch.arange(6).expand(2, 6)
    hard = hard_keep(column_ranks(order), torch.tensor([3, 1]))
    soft = keep_probability(torch.softmax(theta, -1), candidate_index(rates, 6)[column_ranks(order)])
    mask = straight_through(hard, soft)
    assert torch.equal(mask, hard.float())
    (mask * torch.arange(6.0)).sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


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


@pytest.mark.parametrize("groups", [1, 6])
def test_masked_weight_has_the_values_and_gradients_of_the_straight_through_mask(groups):
    """The memory-lean masked weight equals ``w * straight_through(hard, soft)`` in value and in the gradients of
    the logits and of the weight (the clipping of joint quantization flows through ``w``)."""
    torch.manual_seed(0)
    rows, cols, d = 6, 40, 9
    rates = candidate_rates(d, 0.2, 0.8)
    rank = column_ranks(torch.argsort(torch.randn(rows, cols), dim=1))
    cand = candidate_index(rates, cols)[rank]
    theta = torch.randn(groups, d)
    counts = ((torch.softmax(theta, -1) @ rates).expand(rows) * cols).floor().long()
    w0, upstream = torch.randn(rows, cols), torch.randn(rows, cols)
    results = []
    for lean in (False, True):
        t, w = theta.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        beta = torch.softmax(t, -1)
        if lean:
            out = masked_weight(w, beta, rank.to(torch.int32), counts, cand.to(torch.int16))
        else:
            out = w * straight_through(hard_keep(rank, counts), keep_probability(beta, cand))
        (out * upstream).sum().backward()
        results.append((out.detach(), t.grad, w.grad))
    (a, ga, wa), (b, gb, wb) = results
    assert torch.equal(a, b) and torch.equal(wa, wb)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)
    assert ga.abs().sum() > 0
