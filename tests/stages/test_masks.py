import pytest
import torch

from besa.settings.values import NMPattern
from besa.stages.masks import (
    nm_prune_mask,
    prune_mask_by_rank,
    row_prune_counts,
    select_prune_mask,
    split_budget,
)


def test_split_budget_sums_exactly_and_differs_by_at_most_one():
    counts = split_budget(103, 10)
    assert int(counts.sum()) == 103
    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("shape", [(7, 13), (16, 64), (3, 1)])
def test_unstructured_mask_count_is_exact_even_with_all_ties(sparsity, shape):
    scores = torch.ones(shape)  # every score tied: a threshold would prune all or nothing
    mask = select_prune_mask(scores, sparsity, None)
    assert int(mask.sum()) == round(sparsity * shape[0] * shape[1])


def test_rank_mask_prunes_the_lowest_scores_of_each_row():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0]])
    mask = prune_mask_by_rank(scores, torch.tensor([2, 1]))
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_row_counts_spread_the_remainder_over_rows():
    counts = row_prune_counts(4, 10, 0.55)  # 22 zeros over 4 rows
    assert counts.tolist() == [6, 6, 5, 5]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_has_exactly_n_zeros_per_group_and_drops_the_smallest(n, m):
    torch.manual_seed(0)
    scores = torch.rand(5, 4 * m)
    mask = nm_prune_mask(scores, NMPattern(n, m))
    groups = mask.reshape(5, 4, m)
    assert (groups.sum(-1) == n).all()
    kept_min = scores.reshape(5, 4, m).masked_fill(groups, float("inf")).min(-1).values
    pruned_max = scores.reshape(5, 4, m).masked_fill(~groups, float("-inf")).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_nm_mask_with_ties_keeps_structure():
    mask = nm_prune_mask(torch.zeros(3, 8), NMPattern(2, 4))
    assert (mask.reshape(3, 2, 4).sum(-1) == 2).all()


def test_nm_mask_rejects_width_not_divisible():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_prune_mask(torch.zeros(2, 6), NMPattern(2, 4))
