import torch

from besa.stages.selection import HessianStats
from besa.stages.update import GivenMask, SweepSettings, masked_least_squares, obs_sweep


def test_given_mask_prunes_exactly_those_weights_and_compensates_with_the_survivors():
    """The OBS sweep on a mask fixed in advance zeroes exactly that mask and leaves a smaller output error than
    zeroing the same weights without the update."""
    g = torch.Generator().manual_seed(0)
    cols = 48
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(512, cols, generator=g) @ mix
    w = torch.randn(20, cols, generator=g)
    stats = HessianStats(cols, torch.device("cpu"))
    stats.add(x)
    prune = torch.rand(20, cols, generator=g) < 0.5
    new_w, mask = obs_sweep(w, stats.hessian, GivenMask(prune), SweepSettings(blocksize=16))
    assert torch.equal(mask, prune) and torch.equal(new_w == 0, prune)
    err_obs = (x @ new_w.t() - x @ w.t()).square().sum()
    err_plain = (x @ w.masked_fill(prune, 0).t() - x @ w.t()).square().sum()
    assert err_obs < 0.95 * err_plain


def _layer_problem(seed=0, rows=24, cols=48, tokens=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    w = torch.randn(rows, cols, generator=g)
    stats = HessianStats(cols, torch.device("cpu"))
    stats.add(x)
    return w, x, stats.hessian, g


def _row_optimum(w, h, keep, percdamp):
    """Each row's exact argmin (w' - w) H_d (w' - w)^T on its support, by a dense solve of H_d[S, S]."""
    hd = h.double() + percdamp * h.double().diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    out = torch.zeros_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        s = keep[i]
        out[i, s] = torch.linalg.solve(hd[s][:, s], (w[i].double() @ hd)[s])
    return out


def test_masked_least_squares_reaches_every_rows_optimum_on_its_support():
    w, _, h, g = _layer_problem()
    prune = torch.rand(w.shape, generator=g) < 0.6
    start, _ = obs_sweep(w, h, GivenMask(prune), SweepSettings(blocksize=16))
    solved = masked_least_squares(w, h, prune, start, iters=48, percdamp=0.01)
    assert torch.equal(solved == 0, prune)  # exactly the mask: pruned weights are 0.0, no survivor lands on 0
    torch.testing.assert_close(solved.double(), _row_optimum(w, h, ~prune, 0.01), rtol=1e-4, atol=1e-5)
    chunked = masked_least_squares(w, h, prune, start, iters=48, percdamp=0.01, chunk=5)
    torch.testing.assert_close(chunked, solved)  # rows are independent: chunking changes nothing


def test_masked_least_squares_lowers_the_output_error_of_the_obs_sweep():
    """The sweep freezes the columns it has passed, so its weights are not the optimum of its final mask: a few
    solver steps from them lower the layer's output error, more steps lower it further, zero steps change nothing."""
    for seed in range(3):
        w, x, h, g = _layer_problem(seed)
        prune = torch.rand(w.shape, generator=g) < 0.5
        start, _ = obs_sweep(w, h, GivenMask(prune), SweepSettings(blocksize=16))

        def error(v, x=x, w=w):
            return float((x @ (v - w).t()).square().sum())

        torch.testing.assert_close(masked_least_squares(w, h, prune, start, iters=0), start)
        errors = [error(masked_least_squares(w, h, prune, start, iters=k)) for k in (0, 3, 30)]
        assert errors[2] < errors[1] < 0.97 * errors[0], (seed, errors)


def test_masked_least_squares_keeps_dead_inputs_at_zero():
    w, x, _, g = _layer_problem()
    x[:, 7] = 0
    stats = HessianStats(x.shape[1], torch.device("cpu"))
    stats.add(x)
    prune = torch.rand(w.shape, generator=g) < 0.5
    start, _ = obs_sweep(w, stats.hessian, GivenMask(prune))
    solved = masked_least_squares(w, stats.hessian, prune, start, iters=20)
    assert (solved[:, 7] == 0).all() and torch.isfinite(solved).all()
    assert (solved[prune] == 0).all()
