import pytest
import torch

from besa.settings.values import NMPattern
from besa.stages.admm import AdmmSettings, admm_prune, admm_saliency, choose_mask, gradual_fraction
from besa.stages.masks import prune_mask_by_rank, row_prune_counts
from besa.stages.selection import HessianStats
from besa.stages.update import BlockShare, GivenMask, NMGroups, RowShares, masked_least_squares


def _problem(rows=24, cols=64, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.exp(torch.randn(cols, generator=g))  # input channels of very different sizes
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    w = torch.randn(rows, cols, generator=g)
    stats = HessianStats(cols, torch.device("cpu"))
    stats.add(x)
    return w, x, stats.hessian


def _error(w, new_w, h):
    d = (w - new_w).double()
    return float((d @ h.double() @ d.t()).trace())


def _exact_masked_solve(w, h, prune, percdamp, per_input=False):
    """Row by row in float64: the kept weights minimising ||(w' - w) X||^2 + damp ||w' - w||^2, damp a share of
    H's mean diagonal (SparseGPT's) or, ``per_input``, of each input's own H_jj (a unit ridge where inputs are
    normalised, as in ADMM's iterations)."""
    ridge = h.diagonal().double() if per_input else h.diagonal().double().mean().expand(h.shape[0])
    h = h.double() + percdamp * torch.diag(ridge)
    out = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        keep = ~prune[r]
        out[r, keep] = torch.linalg.solve(h[keep][:, keep], (w[r].double() @ h)[keep])
    return out.float()


def test_the_gradual_schedule_is_cubic_and_ends_at_the_whole_mask():
    fractions = [gradual_fraction(step, 15) for step in range(20)]
    assert fractions[0] == pytest.approx(1 - (14 / 15) ** 3)
    assert all(a < b for a, b in zip(fractions[:15], fractions[1:15], strict=False))
    assert fractions[14:] == [1.0] * 6
    assert gradual_fraction(0, 0) == 1.0


def test_a_thinned_mask_is_the_lowest_part_of_the_whole_one():
    saliency = torch.rand(8, 32, generator=torch.Generator().manual_seed(1))
    choice = RowShares(row_prune_counts(8, 32, 0.75), 32)
    full = choose_mask(saliency, choice)
    part = choose_mask(saliency, choice, 0.4)
    assert int(part.sum()) == round(0.4 * int(full.sum()))
    assert not (part & ~full).any()
    assert saliency[part].max() <= saliency[full & ~part].min()


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8])
def test_learned_row_counts_are_kept_exactly_and_pruned_weights_are_zero(sparsity):
    w, _, h = _problem()
    counts = row_prune_counts(*w.shape, sparsity)
    counts[0] += 3  # uneven rows, as BESA learns them
    counts[1] -= 3
    new_w, prune = admm_prune(w, h, RowShares(counts, w.shape[1]))
    assert torch.equal(prune.sum(1), counts)
    assert (new_w[prune] == 0).all()
    assert (new_w[~prune] != 0).all()


def test_a_layer_share_and_nm_groups_hold_their_structure():
    w, _, h = _problem()
    new_w, prune = admm_prune(w, h, BlockShare(0.6))
    assert int(prune.sum()) == round(0.6 * w.numel()) and (new_w[prune] == 0).all()
    new_w, prune = admm_prune(w, h, NMGroups(NMPattern(2, 4)))
    assert ((new_w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_on_a_given_mask_the_iterations_converge_to_the_exact_least_squares_weights():
    w, _, h = _problem()
    prune = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    settings = AdmmSettings(iters=300, gradual=0, lsq_iters=0)
    new_w, got = admm_prune(w, h, GivenMask(prune), settings)
    assert torch.equal(got, prune)
    exact = _exact_masked_solve(w, h, prune, settings.percdamp, per_input=True)
    assert _error(w, new_w, h) == pytest.approx(_error(w, exact, h), rel=1e-3)


def test_the_final_solve_is_the_least_squares_optimum_of_the_final_mask():
    w, _, h = _problem()
    new_w, prune = admm_prune(w, h, BlockShare(0.7), AdmmSettings(lsq_iters=64))
    exact = _exact_masked_solve(w, h, prune, 0.01)
    torch.testing.assert_close(new_w, exact, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_choosing_while_solving_beats_wandas_mask_with_the_same_solve(sparsity):
    """The point of the gradual projection: the mask is chosen on weights that already compensate for it, so it
    reconstructs the layer better than Wanda's mask of the dense weights, even with the same final solve."""
    w, _, h = _problem(rows=48, cols=128, tokens=2048)
    counts = row_prune_counts(*w.shape, sparsity)
    new_w, _ = admm_prune(w, h, RowShares(counts, w.shape[1]))
    wanda = prune_mask_by_rank(w.abs() * h.diagonal().sqrt(), counts)
    solved = masked_least_squares(w, h, wanda, w.masked_fill(wanda, 0), 20)
    assert _error(w, new_w, h) < 0.95 * _error(w, solved, h)


def test_dead_inputs_get_zero_weights_and_are_pruned_first():
    w, x, _ = _problem(cols=32)
    x[:, 5] = 0
    stats = HessianStats(32, torch.device("cpu"))
    stats.add(x)
    new_w, prune = admm_prune(w, stats.hessian, BlockShare(0.5))
    assert prune[:, 5].all() and (new_w[:, 5] == 0).all()
    assert torch.isfinite(new_w).all()


@pytest.mark.parametrize("choice", [BlockShare(0.7), NMGroups(NMPattern(2, 4))], ids=["share", "2:4"])
def test_admm_saliency_chooses_admms_own_mask_and_ranks_every_weight(choice):
    """``admm_saliency`` (what ``--metric admm`` starts BESA from) gives ADMM's own final mask when the same
    choice is taken of it, and still ranks the weights inside the kept and the pruned sets (no ties), with the
    weights of a dead input at 0."""
    w, _, h = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    _, prune = admm_prune(w, h, choice, AdmmSettings())
    saliency = admm_saliency(w, h, choice, AdmmSettings(lsq_iters=0))
    assert saliency.shape == w.shape and saliency.dtype == torch.float32
    assert torch.equal(choose_mask(saliency, choice), prune)
    assert (saliency[:, 5] == 0).all()
    live = torch.cat([saliency[:, :5], saliency[:, 6:]], dim=1)
    assert live.unique().numel() == live.numel()
    assert not torch.equal(prune, choose_mask(w.abs() * h.diagonal().sqrt(), choice))  # not Wanda's mask


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="gradual"):
        AdmmSettings(iters=5, gradual=6)
    with pytest.raises(ValueError, match="rho"):
        AdmmSettings(rho=0.0)
