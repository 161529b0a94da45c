import pytest
import torch

import besa
from besa.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
from besa.model.blocks import find_blocks, find_linears
from besa.settings.values import NMPattern
from besa.stages.masks import select_prune_mask
from besa.stages.selection import CrossStats, HessianStats, wanda_scores
from besa.stages.update import SweepSettings, dense_target_weight
from conftest import make_model, make_tokenizer


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
    new_w, mask, _ = sparsegpt_prune(w, h, sparsity, sweep=SweepSettings(blocksize=16))
    assert int((new_w == 0).sum()) == round(sparsity * w.numel())
    assert torch.equal(new_w == 0, mask)
    norms = x.norm(dim=0)
    wanda_w = w.masked_fill(select_prune_mask(wanda_scores(w, norms), sparsity, None), 0)
    err_sgpt = (x @ new_w.t() - x @ w.t()).square().sum()
    err_wanda = (x @ wanda_w.t() - x @ w.t()).square().sum()
    assert err_sgpt < err_wanda


def test_sparsegpt_nm_structure_holds():
    w, _, h = _problem()
    new_w, _, _ = sparsegpt_prune(w, h, 0.5, NMPattern(2, 4), sweep=SweepSettings(blocksize=16))
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
        new_w, _, _ = sparsegpt_prune(w, h, sparsity, sweep=SweepSettings(blocksize=32))
        for i1 in range(0, 100, 32):
            i2 = min(i1 + 32, 100)
            share = round(sparsity * 24 * i2) - round(sparsity * 24 * i1)
            assert int((new_w[:, i1:i2] == 0).sum()) == share, (sparsity, i1)
        assert int((new_w == 0).sum()) == round(sparsity * w.numel())


def test_a_mask_block_inside_the_lazy_block_chooses_as_a_lazy_block_of_its_width():
    """The sweep updates every column of its lazy block before reaching it, so choosing the weights 16 columns at a
    time inside 64-column lazy blocks sees the same saliencies as 16-column lazy blocks: same weights, and each
    16-column block holds exactly its share of zeros."""
    w, _, h = _problem(rows=24, cols=100)
    coarse, _, _ = sparsegpt_prune(w, h, 0.5, sweep=SweepSettings(blocksize=64, mask_block=16))
    fine, _, _ = sparsegpt_prune(w, h, 0.5, sweep=SweepSettings(blocksize=16))
    assert torch.equal(coarse == 0, fine == 0)
    torch.testing.assert_close(coarse, fine, rtol=1e-4, atol=1e-5)
    for i1 in range(0, 100, 16):  # sub-blocks restart at each lazy block: 64 -> [64, 80) ... [96, 100)
        i2 = min(i1 + 16, 100)
        assert int((coarse[:, i1:i2] == 0).sum()) == round(0.5 * 24 * i2) - round(0.5 * 24 * i1)
    default, _, _ = sparsegpt_prune(w, h, 0.5, sweep=SweepSettings(blocksize=64))
    assert not torch.equal(default == 0, coarse == 0)  # the width matters: 64 columns chosen at once differ


def test_a_finer_mask_block_reconstructs_the_layer_outputs_better():
    """Without the least-squares solve, choosing 16 columns at a time beats the paper's 128: each choice sees more of
    the compensation made so far (on these problems ~14% less output error, at every seed). With the solve the
    paper's 128 measured as well or better on PTB valid, so it is the default again (benchmarks/NOTES.md)."""
    assert SparseGPTConfig().mask_block == 128
    for seed in range(3):
        w, x, h = _problem(rows=64, cols=256, tokens=2048, seed=seed)
        errors = {}
        for width in (128, 16):
            new_w, _, _ = sparsegpt_prune(w, h, 0.6, sweep=SweepSettings(blocksize=128, mask_block=width))
            errors[width] = float((x @ (new_w - w).t()).square().sum())
        assert errors[16] < 0.95 * errors[128], seed


def _holds_its_share_per_16_columns(w: torch.Tensor) -> bool:
    rows, cols = w.shape
    return all(
        int((w[:, i1 : i1 + 16] == 0).sum())
        == round(0.5 * rows * min(i1 + 16, cols)) - round(0.5 * rows * i1)
        for i1 in range(0, cols, 16)
    )


def test_the_mask_block_reaches_the_sweep_on_a_model():
    """``--mask-block`` as the pruner passes it: with 16 every 16-column block of every linear holds exactly its
    share of zeros; with the default 128 (the paper's, wider than the model) the shares are per layer only."""
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    held = {}
    for options in ({"mask_block": 16}, {}):
        model = make_model("llama")
        besa.prune(model, tokenizer=make_tokenizer(), method="sparsegpt", sparsity=0.5, calib_ids=ids,
                   method_options=options, progress=False, checkpoint=False)  # fmt: skip
        linears = [layer for _, block in find_blocks(model) for layer in find_linears(block, model).values()]
        held[options.get("mask_block", 128)] = [
            _holds_its_share_per_16_columns(layer.weight) for layer in linears
        ]
    assert all(held[16])
    assert not all(held[128])


def test_a_nonpositive_mask_block_is_refused():
    with pytest.raises(besa.BesaError, match="--mask-block must be positive"):
        SparseGPTConfig(mask_block=0)


def _asymmetric(seed=0, rows=32, cols=64, tokens=2048):
    """Dense-stream inputs D and pruned-stream inputs X = D + drift (what the blocks pruned before did to them)."""
    g = torch.Generator().manual_seed(seed)
    w, d, _ = _problem(rows, cols, tokens, seed)
    x = d + 0.3 * torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    hs, cs = HessianStats(cols, torch.device("cpu")), CrossStats(cols, torch.device("cpu"))
    for i in range(0, tokens, 512):  # fed batch by batch, as the engine does
        hs.add(x[i : i + 512])
        cs.add(d[i : i + 512], x[i : i + 512])
    return w, d, x, hs.hessian, cs.cross


def test_dense_target_weight_is_the_least_squares_map_to_the_dense_outputs():
    w, d, x, h, c = _asymmetric()
    moved = dense_target_weight(w, c, h, percdamp=1e-9)
    exact = (
        torch.linalg.lstsq(x.double(), (d @ w.t()).double()).solution.t().float()
    )  # argmin ||X W'^T - D W^T||
    assert torch.allclose(moved, exact, atol=1e-3, rtol=1e-3)
    # no drift: the map is the weight itself
    _, d2, _, _, _ = _asymmetric()
    hs, cs = HessianStats(64, torch.device("cpu")), CrossStats(64, torch.device("cpu"))
    hs.add(d2)
    cs.add(d2, d2)
    assert torch.allclose(dense_target_weight(w, cs.cross, hs.hessian, 0.01), w, atol=1e-4)  # damping or not
    # an input channel that never fires keeps its weights (the ridge pulls toward W, not toward 0)
    w3, d3, x3, _, _ = _asymmetric()
    d3[:, 5], x3[:, 5] = 0, 0
    hs, cs = HessianStats(64, torch.device("cpu")), CrossStats(64, torch.device("cpu"))
    hs.add(x3)
    cs.add(d3, x3)
    assert torch.allclose(dense_target_weight(w3, cs.cross, hs.hessian, 0.01)[:, 5], w3[:, 5], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_the_dense_target_weight_gets_closer_to_the_dense_outputs(seed):
    """The asymmetric objective ||W D - W' X||: SparseGPT on the least-squares map beats SparseGPT on W itself, with
    the same exact sparsity."""
    w, d, x, h, c = _asymmetric(seed)
    plain, _, _ = sparsegpt_prune(w, h, 0.5)
    moved, _, _ = sparsegpt_prune(dense_target_weight(w, c, h, 0.01), h, 0.5)
    assert int((moved == 0).sum()) == int((plain == 0).sum()) == w.numel() // 2
    target = d @ w.t()
    assert float((x @ moved.t() - target).square().sum()) < 0.9 * float(
        (x @ plain.t() - target).square().sum()
    )


@pytest.mark.parametrize("within_block", ["sequential", "parallel"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_obs_target_dense_prunes_exactly_on_a_model(within_block, pattern):
    model = make_model("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    result = besa.prune(model, tokenizer=make_tokenizer(), method="sparsegpt", pattern=pattern, calib_ids=ids,
                        within_block=within_block, method_options={"obs_target": "dense"}, progress=False,
                        checkpoint=False, forward_batch=4)  # fmt: skip
    assert result.report["sparsity"]["pruned_layers"] == 0.5
    assert result.report["method_options"]["obs_target"] == "dense"
    for _, block in find_blocks(model):
        for layer in find_linears(block, model).values():
            w = layer.weight
            assert int((w == 0).sum()) == w.numel() // 2
            if pattern:
                assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2)


def test_an_unknown_obs_target_is_refused():
    with pytest.raises(besa.BesaError, match="--obs-target"):
        SparseGPTConfig(obs_target="teacher")


@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.7, None), (0.5, NMPattern(2, 4))])
def test_the_least_squares_solve_keeps_the_sweeps_mask_and_lowers_the_output_error(sparsity, pattern):
    """``lsq_iters``: the sweep chooses the mask (so the exact shares and N:M groups are the sweep's), then the kept
    weights are solved for it; the layer's output error falls at every seed (here by 17-33%)."""
    for seed in range(3):
        w, x, h = _problem(rows=48, cols=128, tokens=1024, seed=seed)
        swept, swept_mask, _ = sparsegpt_prune(w, h, sparsity, pattern, sweep=SweepSettings(blocksize=32))
        solved, solved_mask, _ = sparsegpt_prune(
            w, h, sparsity, pattern, sweep=SweepSettings(blocksize=32, lsq_iters=20)
        )
        assert torch.equal(solved_mask, swept_mask) and torch.equal(solved == 0, swept_mask)

        def error(v, x=x, w=w):
            return float((x @ (v - w).t()).square().sum())

        assert error(solved) < 0.9 * error(swept), (seed, error(solved), error(swept))


def _pruned_linears(options, wbits=16):
    model = make_model("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    besa.prune(model, tokenizer=make_tokenizer(), method="sparsegpt", sparsity=0.5, calib_ids=ids, wbits=wbits,
               group_size=32, method_options=options, progress=False, checkpoint=False)  # fmt: skip
    return [
        layer.weight.detach().clone()
        for _, b in find_blocks(model)
        for layer in find_linears(b, model).values()
    ]


def test_the_least_squares_solve_is_on_by_default_and_off_with_joint_quantization():
    """The default runs 20 solver steps (measured on PTB valid: benchmarks/NOTES.md); the first layer of the first block
    sees the same inputs either way, so its mask is the sweep's and only the kept weights move. With --wbits the
    sweep's weights are on their grids and are kept as they are: the option changes nothing there."""
    assert SparseGPTConfig().lsq_iters == 20
    solved, swept = _pruned_linears({}), _pruned_linears({"lsq_iters": 0})
    assert torch.equal(solved[0] == 0, swept[0] == 0)
    assert not torch.equal(solved[0], swept[0])
    assert all(int((w == 0).sum()) == w.numel() // 2 for w in solved)
    quantized = _pruned_linears({}, wbits=4), _pruned_linears({"lsq_iters": 0}, wbits=4)
    assert all(torch.equal(a, b) for a, b in zip(*quantized, strict=True))


def test_a_negative_lsq_iters_is_refused():
    with pytest.raises(besa.BesaError, match="--lsq-iters must be non-negative"):
        SparseGPTConfig(lsq_iters=-1)
