import pytest
import torch

import besa
from besa.engine.pipeline import run_sequential
from besa.errors import BesaError
from besa.methods.besa.config import KL_REL_LR, NM_KL_EPOCHS, NM_REFIT_EPOCHS, REFIT_REL_LR, BesaConfig
from besa.methods.besa.layer import reconstruction_loss
from besa.methods.besa.pruner import BesaPruner
from besa.methods.besa.training import masked, train_block
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.settings.config import PruneConfig
from conftest import make_model


def _linears(model):
    return {f"{b}.{n}": m for b, blk in find_blocks(model) for n, m in find_linears(blk, model).items()}


def _block_sparsity(model):
    out = {}
    for b, blk in find_blocks(model):
        ws = [weight_matrix(m) for m in find_linears(blk, model).values()]
        out[b] = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    return out


@pytest.mark.parametrize("granularity", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_counted_block_sparsity_is_the_target_and_survivors_are_untouched(granularity, sparsity, tokenizer):
    """The paper's form (Prodigy, frozen weights, no refit): exact block sparsity, survivors untouched."""
    dense = make_model("llama")
    original = {n: weight_matrix(m).clone() for n, m in _linears(dense).items()}
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    result = besa.prune(
        dense, tokenizer=tokenizer, method="besa", sparsity=sparsity, calib_ids=ids, progress=False,
        method_options={"granularity": granularity, "d_coef": 50.0, "optimizer": "prodigy", "weight_update": "none"},
        refit_epochs=0,
    )  # fmt: skip
    for name, s in _block_sparsity(result.model).items():
        assert s == pytest.approx(sparsity, abs=1e-3), name  # within 0.1 points
    assert result.report["sparsity"]["pruned_layers"] == pytest.approx(sparsity, abs=1e-3)
    for name, layer in _linears(result.model).items():
        w = weight_matrix(layer)
        kept = w != 0
        assert torch.equal(w[kept], original[name][kept]), name  # bit-identical survivors
    blocks = result.report["method"]["blocks"]
    assert len(blocks) == 2
    layer_info = next(iter(blocks.values()))["layers"]
    assert set(layer_info) == set(find_linears(find_blocks(result.model)[0][1], result.model))
    if granularity == "row":
        assert all(len(v["row_rates"]) > 0 for v in layer_info.values())


def _one_block_work(arch="llama", n=6):
    model = make_model(arch)
    ids = torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(0))
    works = []

    def grab(work):  # the engine frees a block's activations once it is done: keep a copy for the test
        work.inputs = list(work.inputs)
        works.append(work)

    run_sequential(model, ids, grab, torch.device("cpu"), forward_batch=1, progress=False)
    return model, works[0]


def test_ste_forward_equals_the_hard_mask_and_theta_gets_gradient():
    _, work = _one_block_work()
    pruner = BesaPruner(BesaConfig(), PruneConfig(method="besa", sparsity=0.5))
    block_logits, outputs = pruner._calibrate(work)
    for rate_logits in block_logits.values():
        with torch.no_grad():
            rate_logits.theta.add_(torch.randn_like(rate_logits.theta))  # an uneven allocation
        mask = rate_logits.mask()
        counts = (rate_logits.row_rates().detach() * rate_logits.cols).floor().long()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal((mask == 0).sum(1), counts)
        rate_logits.prepare_step()
    with torch.enable_grad(), masked(block_logits):
        out = work.forward(work.inputs[0])
        loss = reconstruction_loss(outputs[0], out)
        loss.backward()
    for rate_logits in block_logits.values():
        assert rate_logits.theta.grad is not None and rate_logits.theta.grad.abs().sum() > 0, rate_logits.name


def test_masked_forward_matches_a_block_with_the_mask_applied():
    _, work = _one_block_work()
    pruner = BesaPruner(BesaConfig(), PruneConfig(method="besa", sparsity=0.5))
    block_logits, _ = pruner._calibrate(work)
    for rate_logits in block_logits.values():
        rate_logits.prepare_step()
    with torch.no_grad(), masked(block_logits):
        masked_out = work.forward(work.inputs[0])
    for rate_logits in block_logits.values():
        weight_matrix(rate_logits.layer).mul_(rate_logits.mask().detach())
    with torch.no_grad():
        applied_out = work.forward(work.inputs[0])
    torch.testing.assert_close(masked_out, applied_out)


def test_loss_goes_down_when_the_target_is_the_blocks_input():
    _, work = _one_block_work(n=40)
    pruner = BesaPruner(BesaConfig(d_coef=50.0, lam=0.0), PruneConfig(method="besa", sparsity=0.5))
    block_logits, _ = pruner._calibrate(work)
    losses = train_block(pruner.cfg, work, block_logits, work.inputs, pruner.block_rate)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first


def test_learning_beats_the_uniform_allocation_on_reconstruction():
    """After training, the block output is closer to the dense target than with rates all at the target."""
    _, work = _one_block_work(n=40)
    pruner = BesaPruner(BesaConfig(d_coef=50.0), PruneConfig(method="besa", sparsity=0.6))
    block_logits, targets = pruner._calibrate(work)

    def error():
        for rate_logits in block_logits.values():
            rate_logits.prepare_step()
        with torch.no_grad(), masked(block_logits):
            return sum(
                float(reconstruction_loss(t, work.forward(x)))
                for x, t in zip(work.inputs, targets, strict=True)
            )

    before = error()
    train_block(pruner.cfg, work, block_logits, targets, pruner.block_rate)
    assert error() < before


def test_dense_stream_target_uses_the_engines_dense_outputs(tokenizer):
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    result = besa.prune(
        make_model("gpt2"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=ids, progress=False,
        method_options={"target": "dense-stream", "metric": "sparsegpt"},
    )  # fmt: skip
    assert result.report["sparsity"]["pruned_layers"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("pattern", "update", "wbits"),
    [("2:4", "none", 16), ("2:4", "obs", 16), ("4:8", "none", 16), ("2:4", "obs", 4), ("4:8", "admm", 16)],
)
def test_nm_patterns_are_learned_exactly(pattern, update, wbits, tokenizer):
    """``--method besa --pattern N:M``: every group of M input weights of every pruned linear holds exactly N
    zeros (frozen survivors, the OBS update, or the OBS sweep quantizing), and the report says how many groups
    left the metric's own pattern."""
    n, m = (int(v) for v in pattern.split(":"))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = make_model("llama")
    original = {k: weight_matrix(v).clone() for k, v in _linears(dense).items()}
    result = besa.prune(
        dense, tokenizer=tokenizer, method="besa", pattern=pattern, calib_ids=ids, wbits=wbits, group_size=16,
        method_options={"weight_update": update, "optimizer": "adamw", "lr": 0.05, "epochs": 3}, progress=False,
        refit_epochs=0, kl_epochs=0,
    )  # fmt: skip
    moved = []
    for name, layer in _linears(result.model).items():
        w = weight_matrix(layer)
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (zeros == n).all() if wbits == 16 else (zeros >= n).all(), (
            name
        )  # 4 bits: survivors may round to 0
        if update == "none" and wbits == 16:
            assert torch.equal(w[w != 0], original[name][w != 0]), name  # frozen survivors
    for info in result.report["method"]["blocks"].values():
        moved += [layer["patterns_moved"] for layer in info["layers"].values()]
        assert info["steps"] == 3 * 4
    assert max(moved) > 0  # learning moved some groups away from the metric's pattern
    assert result.report["sparsity"]["target"] == pytest.approx(n / m)


def test_besa_refuses_bad_options(tokenizer):
    with pytest.raises(BesaError, match="--metric must be one of"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="besa", method_options={"metric": "x"})
    with pytest.raises(BesaError, match="--lr must be non-negative"):
        BesaConfig(lr=-0.05)
    with pytest.raises(BesaError, match="--epochs must be non-negative"):
        BesaConfig(epochs=-1)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_defaults_are_admms_own_patterns_and_solve_then_the_relative_rate_refit(pattern, tokenizer):
    """Not given ``--epochs``, an N:M run learns nothing: its weights are exactly those of ``--method admm``
    followed by the refit toward the dense block on its pruned input at ``--refit-rel-lr 1.2e-3``
    (``REFIT_REL_LR``) and one epoch of the KL stage at ``--kl-rel-lr 4e-4`` (``NM_KL_EPOCHS``, ``KL_REL_LR``),
    and without the refit and the KL stage exactly ``--method admm``'s; every group of m keeps m - n weights, and
    the report says no learning step was taken."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))

    def run(method, **settings):
        return besa.prune(make_model("llama"), tokenizer=tokenizer, method=method, pattern=pattern, calib_ids=ids,
                          progress=False, **settings)  # fmt: skip

    def same(x, y):
        a, b = _linears(x.model), _linears(y.model)
        return bool(a) and all(torch.equal(weight_matrix(a[name]), weight_matrix(b[name])) for name in a)

    ours = run("besa")
    assert (ours.report["refit"]["target"], ours.report["refit"]["rel_lr"]) == (
        "pruned-input",
        REFIT_REL_LR,
    )
    assert NM_REFIT_EPOCHS == ours.report["refit"]["epochs"] == 2
    assert (ours.report["config"]["kl_epochs"], ours.report["config"]["kl_rel_lr"]) == (
        NM_KL_EPOCHS,
        KL_REL_LR,
    )
    assert NM_KL_EPOCHS == ours.report["kl"]["epochs"] == 1
    blocks = ours.report["method"]["blocks"].values()
    assert blocks and all(b["steps"] == 0 and b["learned"] is False for b in blocks)
    refit = {"refit_epochs": 2, "refit_target": "pruned-input", "refit_rel_lr": REFIT_REL_LR}
    assert same(ours, run("admm", **refit, kl_epochs=1, kl_rel_lr=KL_REL_LR))
    assert not same(
        ours, run("besa", refit_rel_lr=0.0)
    )  # the relative rates are what ran, not the absolute ones
    assert not same(ours, run("besa", kl_rel_lr=0.0))
    assert not same(ours, run("admm", **refit))  # the KL stage ran
    plain = run("besa", refit_epochs=0, kl_epochs=0)
    assert plain.report["refit"] is None and "kl" not in plain.report and same(plain, run("admm"))
    n, m = map(int, pattern.split(":"))
    assert all(
        ((weight_matrix(w) == 0).reshape(-1, m).sum(-1) == n).all() for w in _linears(ours.model).values()
    )


@pytest.mark.parametrize(("update", "method"), [("obs", "sparsegpt"), ("admm", "admm"), ("none", "wanda")])
def test_zero_epochs_prune_as_the_weight_updates_own_method(update, method, tokenizer):
    """``--epochs 0`` learns nothing: every layer keeps the block's rate, its weights chosen (and solved) as the
    weight update's own method does it (``none``: ranked by the metric, Wanda's), to the same weights."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    ours = besa.prune(make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.6, calib_ids=ids,
                      progress=False, refit_epochs=0, method_options={"epochs": 0, "weight_update": update})  # fmt: skip
    theirs = besa.prune(make_model("llama"), tokenizer=tokenizer, method=method, sparsity=0.6, calib_ids=ids,
                        progress=False, refit_epochs=0)  # fmt: skip
    a, b = _linears(ours.model), _linears(theirs.model)
    assert a and all(torch.equal(weight_matrix(a[name]), weight_matrix(b[name])) for name in a)
    assert ours.report["method"]["weight_update"] == update
    assert all(abs(s - 0.6) < 1e-3 for s in _block_sparsity(ours.model).values())


@pytest.mark.parametrize(("lr", "moves"), [(0.0, False), (0.05, True)])
def test_a_zero_lr_keeps_the_metrics_nm_mask(lr, moves, tokenizer):
    """``--lr 0`` is a step of 0 (not 'unset', which would take the default 0.05): no group leaves the metric's
    own N:M pattern, while the default step moves some on the same windows."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="besa", pattern="2:4", calib_ids=ids, progress=False,
        method_options={"optimizer": "adamw", "lr": lr, "epochs": 1}, refit_epochs=0,
    )  # fmt: skip
    moved = [
        i["patterns_moved"] for b in result.report["method"]["blocks"].values() for i in b["layers"].values()
    ]
    assert (max(moved) > 0) is moves


def _frozen_masks(tokenizer, ids, **options):
    """Every linear's zero mask after BESA at 2:4 learning with a step of 0 (lr 0: each group's prior argmax), the
    weights frozen and no refit, and the metric the report names."""
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="besa", pattern="2:4", calib_ids=ids, progress=False,
        method_options={"lr": 0.0, "epochs": 1, "weight_update": "none", **options}, refit_epochs=0,
    )  # fmt: skip
    return {n: weight_matrix(m) == 0 for n, m in _linears(result.model).items()}, result.report["method"][
        "metric"
    ]


def test_learned_nm_patterns_start_from_admms_saliency_by_default(tokenizer):
    """With ``--pattern`` and ``--epochs 1`` the default metric (``auto``) is ADMM's saliency, the start measured
    best on PTB valid; the same masks as ``--metric admm``, not the OBS saliency's; unstructured runs keep Wanda."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    default, metric = _frozen_masks(tokenizer, ids)
    admm, _ = _frozen_masks(tokenizer, ids, metric="admm")
    obs, _ = _frozen_masks(tokenizer, ids, metric="sparsegpt")
    assert metric == "admm"
    assert all(torch.equal(default[n], admm[n]) for n in default)
    assert any(not torch.equal(default[n], obs[n]) for n in default)
    unstructured = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=ids, progress=False,
        method_options={"lr": 0.0, "weight_update": "none"}, refit_epochs=0,
    )  # fmt: skip
    assert unstructured.report["method"]["metric"] == "wanda"
    assert BesaConfig(metric="magnitude").resolved_metric(nm=True) == "magnitude"


def test_metric_admm_starts_the_patterns_at_admms_own_nm_mask(tokenizer):
    """``--metric admm`` with nothing learned keeps, in the first block (whose inputs no pruning has touched yet),
    exactly the N:M mask ``--method admm`` chooses from the same Hessians, which is not SparseGPT's saliency's."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    masks, metric = _frozen_masks(tokenizer, ids, metric="admm")
    obs, _ = _frozen_masks(tokenizer, ids, metric="sparsegpt")
    admm = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="admm", pattern="2:4", calib_ids=ids, progress=False,
        within_block="parallel",
    )  # fmt: skip
    admm_masks = {n: weight_matrix(m) == 0 for n, m in _linears(admm.model).items()}
    first = [n for n in masks if ".0." in n]
    assert metric == "admm" and first
    assert all(torch.equal(masks[n], admm_masks[n]) for n in first)
    assert any(not torch.equal(masks[n], obs[n]) for n in first)
    assert all((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all() for m in masks.values())


@pytest.mark.parametrize(
    ("kwargs", "epochs", "target", "rel_lr"),
    [
        ({"sparsity": 0.5}, 2, "dense-stream", 0.0),
        ({"sparsity": 0.65}, 2, "dense-stream", 0.0),
        # from 70%: the dense block's function, at the rate relative to each linear's weights (PTB valid, Gemma)
        ({"sparsity": 0.7}, 2, "pruned-input", REFIT_REL_LR),
        ({"sparsity": 0.8}, 2, "pruned-input", REFIT_REL_LR),
        (
            {"pattern": "2:4"},
            2,
            "pruned-input",
            REFIT_REL_LR,
        ),  # N:M: toward the pruned input (PTB valid, 2:4)
        ({"pattern": "2:4", "refit_epochs": 0}, None, None, None),
        (
            {"sparsity": 0.7, "refit_target": "dense-stream"},
            2,
            "dense-stream",
            REFIT_REL_LR,
        ),  # a given target wins
        ({"sparsity": 0.7, "refit_epochs": 1}, 1, "pruned-input", REFIT_REL_LR),  # and a given --refit-epochs
        ({"sparsity": 0.7, "refit_rel_lr": 0.0}, 2, "pruned-input", 0.0),  # and a given rate
        ({"sparsity": 0.5, "refit_epochs": 0}, None, None, None),
    ],
)
def test_default_refit_turns_to_the_pruned_input_at_the_relative_rate_from_70_percent(
    kwargs, epochs, target, rel_lr, tokenizer
):
    """BESA's blockwise refit runs 2 epochs by default, toward the dense model's output at the absolute
    ``--refit-lr`` below 70% sparsity, and toward the dense block's function on its pruned input at the rate
    relative to each linear's weights from 70% on; the run's report says which, and the default's weights are
    exactly those of the same flags given (and not those of the other rate)."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))

    def run(**more):
        return besa.prune(
            make_model("llama"), tokenizer=tokenizer, method="besa", calib_ids=ids, progress=False,
            method_options={"epochs": 1}, **kwargs, **more,
        )  # fmt: skip

    def same(x, y):
        a, b = _linears(x.model), _linears(y.model)
        return bool(a) and all(torch.equal(weight_matrix(a[n]), weight_matrix(b[n])) for n in a)

    result = run()
    refit = result.report["refit"]
    assert (refit["epochs"] if refit else None) == epochs
    assert (refit["target"] if refit else None) == target
    assert (refit["rel_lr"] if refit else None) == rel_lr
    if refit and "refit_target" not in kwargs and "refit_rel_lr" not in kwargs:
        assert len(refit["blocks"]) == len(result.report["method"]["blocks"])
        assert same(result, run(refit_target=target, refit_rel_lr=rel_lr))
        assert not same(result, run(refit_rel_lr=2e-3 if rel_lr == 0 else 0.0))  # the rate is what ran


@pytest.mark.parametrize(
    ("kwargs", "update"),
    [
        ({"sparsity": 0.5}, "obs"),
        ({"sparsity": 0.7}, "admm"),
        ({"sparsity": 0.8}, "admm"),
        ({"pattern": "2:4"}, "admm"),  # N:M: ADMM solves the learned patterns
        ({"pattern": "2:4", "wbits": 4, "group_size": 16}, "obs"),
        ({"sparsity": 0.7, "wbits": 4, "group_size": 16}, "obs"),  # joint quantization: ADMM has no grid
        (
            {"sparsity": 0.7, "method_options": {"weight_update": "obs"}},
            "obs",
        ),  # a given --weight-update wins
    ],
)
def test_default_weight_update_turns_to_admm_from_70_percent(kwargs, update, tokenizer):
    """Not given, BESA's weight update is ADMM for N:M patterns and for unstructured runs from 70% sparsity, when
    they do not quantize jointly, the OBS sweep otherwise; the report says which ran, and the default's weights are those of the flag given."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    options = {"epochs": 1, **kwargs.pop("method_options", {})}
    result = besa.prune(make_model("llama"), tokenizer=tokenizer, method="besa", calib_ids=ids, progress=False,
                        method_options=options, refit_epochs=0, **kwargs)  # fmt: skip
    assert result.report["method"]["weight_update"] == update
    if "weight_update" not in options:
        explicit = besa.prune(make_model("llama"), tokenizer=tokenizer, method="besa", calib_ids=ids,
                              progress=False, method_options={**options, "weight_update": update}, refit_epochs=0,
                              **kwargs)  # fmt: skip
        ours, theirs = _linears(result.model), _linears(explicit.model)
        assert all(torch.equal(weight_matrix(ours[n]), weight_matrix(theirs[n])) for n in ours)


def test_training_batch_is_independent_of_the_forward_batch(tokenizer):
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=ids, forward_batch=2,
        method_options={"batch_size": 3, "epochs": 2}, progress=False,
    )  # fmt: skip
    for info in result.report["method"]["blocks"].values():
        assert info["steps"] == 2 * 2  # ceil(5 / 3) steps per epoch


def _nan_after(calls_before_nan: int | None):
    """A reconstruction loss that turns NaN: from the first call (``None``) or only on call ``calls_before_nan``."""
    count = {"n": 0}

    def loss(target, output):
        count["n"] += 1
        value = reconstruction_loss(target, output)
        if calls_before_nan is None or count["n"] == calls_before_nan:
            return value * float("nan")
        return value

    return loss


def test_nan_loss_retries_then_falls_back_to_the_uniform_metric_mask(tokenizer, monkeypatch):
    import besa.methods.besa.training as pruner_module

    monkeypatch.setattr(pruner_module, "reconstruction_loss", _nan_after(None))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = make_model("llama")
    original = {n: weight_matrix(m).clone() for n, m in _linears(dense).items()}
    result = besa.prune(
        dense, tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=ids, progress=False,
        method_options={"weight_update": "none"}, refit_epochs=0,
    )  # fmt: skip
    extra = result.report["method"]
    assert extra["fallback_blocks"] == [b for b, _ in find_blocks(result.model)]
    for info in extra["blocks"].values():
        assert info["fallback"] == "uniform wanda mask" and info["steps"] == 0
        assert [f["step_scale"] for f in info["non_finite"]] == [1.0, pytest.approx(0.1)]
    for name, layer in _linears(result.model).items():
        w = weight_matrix(layer)
        assert torch.isfinite(w).all()
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
        kept = w != 0
        assert torch.equal(w[kept], original[name][kept])
    # the fallback is Wanda's own per-row mask: block 0 sees the dense inputs, so it must equal plain Wanda there
    wanda = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="wanda", sparsity=0.5, calib_ids=ids, progress=False
    )
    first = find_blocks(result.model)[0][0]
    for name, layer in _linears(wanda.model).items():
        if name.startswith(f"{first}."):
            assert torch.equal(weight_matrix(_linears(result.model)[name]) == 0, weight_matrix(layer) == 0), (
                name
            )


def test_one_nan_step_is_retried_with_a_smaller_step(tokenizer, monkeypatch):
    import besa.methods.besa.training as pruner_module

    monkeypatch.setattr(pruner_module, "reconstruction_loss", _nan_after(2))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=ids, progress=False
    )
    blocks = list(result.report["method"]["blocks"].values())
    assert result.report["method"]["fallback_blocks"] == []
    assert blocks[0]["non_finite"] == [{"step_scale": 1.0, "at_step": 1, "loss": "nan"}]
    assert blocks[0]["fallback"] is None and blocks[0]["steps"] == 4
    assert "non_finite" not in blocks[1]


@pytest.mark.parametrize(("sparsity", "update"), [(0.5, "obs"), (0.7, "obs"), (0.7, "admm")])
def test_obs_weight_update_keeps_the_learned_row_counts_and_reconstructs_better(sparsity, update, tokenizer):
    """The OBS sweep and ADMM each choose the weights within every row but keep its learned count, and their
    updated survivors reconstruct the dense model better than the frozen ones."""
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    dense = make_model("llama")
    runs = {
        choice: besa.prune(
            make_model("llama"),
            tokenizer=tokenizer,
            method="besa",
            sparsity=sparsity,
            calib_ids=ids,
            progress=False,
            method_options={"optimizer": "adamw", "lr": 0.05, "weight_update": choice},
        )  # fmt: skip
        for choice in ("none", update)
    }
    obs = runs[update]
    for name, s in _block_sparsity(obs.model).items():
        assert s == pytest.approx(sparsity, abs=1e-3), name
    info = obs.report["method"]["blocks"]
    for block_name, block in find_blocks(obs.model):
        for name, layer in find_linears(block, obs.model).items():
            w = weight_matrix(layer)
            learned = torch.tensor(info[block_name]["layers"][name]["row_rates"]) * w.shape[1]
            assert torch.equal((w == 0).sum(1), learned.round().long()), (
                name
            )  # each row keeps its learned count

    def output_error(model):
        with torch.no_grad():
            return float((model(ids).logits - dense(ids).logits).square().mean())

    assert output_error(obs.model) < output_error(runs["none"].model)


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("within_block", ["parallel", "sequential"])
def test_obs_update_within_block_sees_the_inputs_of_the_pruned_block(
    monkeypatch, tokenizer, pattern, within_block
):
    """BESA's OBS update, sequential: every layer is updated with the Hessian of its inputs in the final pruned
    block (the groups before it pruned); parallel: only the first group's (q/k/v) are those."""
    from tests.methods.test_base import _pruned_stream_hessians

    seen: dict[str, torch.Tensor] = {}
    real_rates, real_patterns = BesaPruner._apply_obs, BesaPruner._obs_update

    def spy_rates(self, result, name, rate_logits, counts, learned_clip):
        seen[name] = rate_logits.hessian.clone()
        return real_rates(self, result, name, rate_logits, counts, learned_clip)

    def spy_patterns(self, result, name, layer, hessian, choice):
        seen[name] = hessian.clone()
        return real_patterns(self, result, name, layer, hessian, choice)

    monkeypatch.setattr(BesaPruner, "_apply_obs", spy_rates)
    monkeypatch.setattr(BesaPruner, "_obs_update", spy_patterns)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = make_model("llama")
    besa.prune(
        model, tokenizer=tokenizer, method="besa", pattern=pattern, calib_ids=ids, forward_batch=4,
        within_block=within_block, method_options={"weight_update": "obs", "optimizer": "adamw", "lr": 0.05},
        refit_epochs=0, kl_epochs=0,
        progress=False, checkpoint=False,
    )  # fmt: skip
    final = _pruned_stream_hessians(model, ids)
    assert seen.keys() == final.keys() and len(seen) == 14
    for name, h in seen.items():
        same = torch.allclose(h, final[name], rtol=1e-4, atol=1e-6)
        assert same == (within_block == "sequential" or name.endswith(("q_proj", "k_proj", "v_proj"))), name


def test_the_least_squares_solve_reaches_besas_obs_update(tokenizer):
    """``lsq_iters`` after BESA's OBS sweep: the first group's layers see the same inputs either way, so they keep
    the same learned row counts and masks and only their kept weights move; every row keeps its learned count."""
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    runs = {
        iters: besa.prune(make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=ids,
                          method_options={"lsq_iters": iters}, refit_epochs=0, progress=False, checkpoint=False)
        for iters in (0, 20)
    }  # fmt: skip
    assert BesaConfig().lsq_iters == 20
    first = {
        iters: _linears(run.model)["model.layers.0.self_attn.q_proj"].weight for iters, run in runs.items()
    }
    assert torch.equal(first[0] == 0, first[20] == 0) and not torch.equal(first[0], first[20])
    info = runs[20].report["method"]["blocks"]
    for block_name, block in find_blocks(runs[20].model):
        for name, layer in find_linears(block, runs[20].model).items():
            w = weight_matrix(layer)
            learned = torch.tensor(info[block_name]["layers"][name]["row_rates"]) * w.shape[1]
            assert torch.equal((w == 0).sum(1), learned.round().long()), name
