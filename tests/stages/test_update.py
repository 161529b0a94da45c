import torch

from besa.stages.selection import HessianStats
from besa.stages.update import GivenMask, obs_sweep


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
    new_w, mask = obs_sweep(w, stats.hessian, GivenMask(prune), blocksize=16)
    assert torch.equal(mask, prune) and torch.equal(new_w == 0, prune)
    err_obs = (x @ new_w.t() - x @ w.t()).square().sum()
    err_plain = (x @ w.masked_fill(prune, 0).t() - x @ w.t()).square().sum()
    assert err_obs < 0.95 * err_plain
