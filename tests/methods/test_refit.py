"""What refit and KL stage a run gets (``besa.methods.refit.RefitChoice``): the flags where given, else the method's
defaults."""

import pytest

from besa.methods.besa.config import KL_REL_LR, NM_KL_EPOCHS, REFIT_REL_LR, BesaConfig
from besa.methods.besa.pruner import BesaPruner
from besa.methods.configs import WandaConfig
from besa.methods.wanda import WandaPruner
from besa.settings.config import PruneConfig


def _besa(**settings):
    return BesaPruner(BesaConfig(), PruneConfig.from_flat(method="besa", **settings))


def _wanda(**settings):
    return WandaPruner(WandaConfig(), PruneConfig.from_flat(method="wanda", **settings))


@pytest.mark.parametrize(
    ("pruner", "epochs", "target", "rel_lr"),
    [
        (lambda: _besa(sparsity=0.5), 2, "dense-stream", 0.0),
        (lambda: _besa(sparsity=0.6), 2, "dense-stream", 0.0),  # below 70%: the absolute rate
        (lambda: _besa(sparsity=0.7), 2, "pruned-input", REFIT_REL_LR),  # from 70%: the relative rate
        (lambda: _besa(sparsity=0.8), 2, "pruned-input", REFIT_REL_LR),
        (lambda: _besa(sparsity=0.7, refit_target="dense-stream"), 2, "dense-stream", REFIT_REL_LR),
        (lambda: _besa(pattern="2:4"), 2, "pruned-input", REFIT_REL_LR),  # N:M: the relative rate
        (lambda: _besa(pattern="4:8", refit_rel_lr=0.0), 2, "pruned-input", 0.0),  # a given 0 wins
        (lambda: _besa(sparsity=0.5, refit_rel_lr=2e-3), 2, "dense-stream", 2e-3),
        (lambda: _wanda(refit_epochs=1), 1, "dense-stream", 0.0),  # the baselines: absolute rate
        (lambda: _wanda(pattern="2:4", refit_epochs=1), 1, "dense-stream", 0.0),
    ],
)
def test_the_refit_a_run_gets(pruner, epochs, target, rel_lr):
    """The spec the engine runs, the report's settings and the fingerprint's resolved values agree."""
    p = pruner()
    spec = p.refit
    assert (spec.epochs, spec.rel_lr, p.refit_target) == (epochs, rel_lr, target)
    assert p.resolved_defaults()["config.refit_rel_lr"] == rel_lr
    report = p.report_refit({})
    assert (report["epochs"], report["rel_lr"], report["target"]) == (epochs, rel_lr, target)


def test_no_refit_by_default_where_it_would_move_quantized_weights_off_their_grids():
    assert _besa(pattern="2:4", wbits=4).refit is None and _besa(sparsity=0.5, wbits=4).refit is None
    assert _wanda().refit is None and _wanda().report_refit({}) is None
    assert _besa(pattern="2:4", refit_epochs=0).refit is None


@pytest.mark.parametrize(
    ("pruner", "streamed", "epochs", "rel_lr"),
    [
        (lambda: _besa(pattern="2:4"), False, NM_KL_EPOCHS, KL_REL_LR),  # N:M: one epoch, the relative rate
        (lambda: _besa(pattern="4:8"), False, NM_KL_EPOCHS, KL_REL_LR),
        (lambda: _besa(sparsity=0.5), False, 0, 0.0),  # unstructured: no stage
        (lambda: _besa(sparsity=0.7), False, 0, 0.0),
        (lambda: _besa(pattern="2:4", wbits=4), False, 0, KL_REL_LR),  # it would train off the grids
        (lambda: _besa(pattern="2:4"), True, 0, KL_REL_LR),  # --stream: it trains the whole model at once
        (lambda: _besa(pattern="2:4", kl_epochs=0), False, 0, KL_REL_LR),  # a given 0 wins
        (lambda: _besa(pattern="2:4", kl_epochs=2, kl_rel_lr=0.0), False, 2, 0.0),
        (lambda: _besa(sparsity=0.5, kl_epochs=1), False, 1, 0.0),
        (lambda: _wanda(pattern="2:4"), False, 0, 0.0),  # the baselines: none unless asked
        (lambda: _wanda(kl_epochs=1, kl_rel_lr=1e-3), False, 1, 1e-3),
    ],
)
def test_the_kl_stage_a_run_gets(pruner, streamed, epochs, rel_lr):
    kl = pruner().kl_settings(streamed=streamed)
    assert (kl.epochs, kl.rel_lr) == (epochs, rel_lr)
    assert (kl.lr, kl.batch, kl.topk, kl.holdout) == (1e-5, 4, 64, 4)  # the rest as given (here the defaults)


@pytest.mark.parametrize(
    ("settings", "streamed", "why"), [({"wbits": 4}, False, "--wbits"), ({}, True, "--stream")]
)
def test_a_default_kl_stage_left_out_says_so(caplog, settings, streamed, why):
    with caplog.at_level("WARNING", logger="besa.methods.refit"):
        assert _besa(pattern="2:4", **settings).kl_settings(streamed=streamed).epochs == 0
    assert f"left out with {why}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="besa.methods.refit"):  # said explicitly, or nothing to leave out
        assert _besa(pattern="2:4", kl_epochs=0, **settings).kl_settings(streamed=streamed).epochs == 0
        assert _besa(sparsity=0.5, **settings).kl_settings(streamed=streamed).epochs == 0
    assert caplog.text == ""
