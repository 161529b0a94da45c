import torch

from besa.engine.fingerprint import ADDED_LATER, ids_digest, run_fingerprint
from besa.methods.configs import WandaConfig
from besa.settings.config import PruneConfig
from besa.settings.flat import to_flat
from conftest import make_model


def test_the_fingerfingerprintkeeps_what_decides_the_weights_by_flat_name():
    model = make_model("llama")
    ids = torch.arange(12).reshape(2, 6)
    config = PruneConfig.from_flat(method="wanda", nsamples=2, seqlen=6, kl_epochs=3, device="cpu")
    fingerprint = run_fingerprint(model, config, WandaConfig(), ids, resolved=_resolved(config))
    keys = {k.removeprefix("config.") for k in fingerprint if k.startswith("config.")}
    assert keys == set(config.to_dict()) - {"device"} - set(to_flat(config.kl)) - set(ADDED_LATER)
    assert fingerprint["config.nsamples"] == 2 and fingerprint["calibration.tokens"] == ids_digest(
        ids
    ).removeprefix("sha256:")
    # the device and the KL stage do not decide the checkpointed blocks; every other setting does
    other = PruneConfig.from_flat(method="wanda", nsamples=2, seqlen=6, kl_epochs=0, device="meta")
    assert run_fingerprint(model, other, WandaConfig(), ids, resolved=_resolved(other)) == fingerprint
    moved = PruneConfig.from_flat(method="wanda", nsamples=2, seqlen=6, refit_epochs=1)
    assert run_fingerprint(model, moved, WandaConfig(), ids, resolved=_resolved(moved)) != fingerprint


def _resolved(config):
    """What Wanda's pruner decides for ``config`` when a setting is left to it (``Pruner.resolved_defaults``)."""
    from besa.methods.wanda import WandaPruner

    return WandaPruner(WandaConfig(), config).resolved_defaults()


def test_a_setting_added_later_changes_the_fingerprint_only_away_from_what_older_folders_ran():
    model = make_model("llama")
    ids = torch.arange(12).reshape(2, 6)
    plain = PruneConfig.from_flat(method="wanda", refit_epochs=1)
    base = run_fingerprint(model, plain, WandaConfig(), ids, resolved=_resolved(plain))
    assert "config.refit_anchor" not in base  # as a folder written before --refit-anchor existed has it
    anchored = PruneConfig.from_flat(method="wanda", refit_epochs=1, refit_anchor=2.0)
    assert run_fingerprint(model, anchored, WandaConfig(), ids)["config.refit_anchor"] == 2.0
    assert "config.refit_loss" not in base  # likewise --refit-loss at mse
    per_token = PruneConfig.from_flat(method="wanda", refit_epochs=1, refit_loss="token")
    assert run_fingerprint(model, per_token, WandaConfig(), ids)["config.refit_loss"] == "token"
    # likewise --refit-rel-lr at 0 (off), given or the method's default
    assert "config.refit_rel_lr" not in base
    off = PruneConfig.from_flat(method="wanda", refit_epochs=1, refit_rel_lr=0.0)
    assert run_fingerprint(model, off, WandaConfig(), ids, resolved=_resolved(off)) == base
    relative = PruneConfig.from_flat(method="wanda", refit_epochs=1, refit_rel_lr=1e-3)
    assert run_fingerprint(model, relative, WandaConfig(), ids)["config.refit_rel_lr"] == 1e-3


def _besa_fingerprint(sparsity, options=None, **settings):
    """The fingerprint a BESA run would store, with what its pruner decides by default resolved."""
    from besa.methods.besa.config import BesaConfig
    from besa.methods.besa.pruner import BesaPruner

    config = PruneConfig.from_flat(method="besa", sparsity=sparsity, **settings)
    method_config = BesaConfig(**(options or {}))
    pruner = BesaPruner(method_config, config)
    ids = torch.arange(12).reshape(2, 6)
    return run_fingerprint(
        make_model("llama"), config, method_config, ids, resolved=pruner.resolved_defaults()
    )


def test_a_default_the_method_decides_is_stored_as_what_it_decided():
    """A folder that gave the refit target and weight update explicitly (as every folder did before they became
    the method's defaults) resumes under the defaults where they decide the same, and not where they differ."""
    old_style = {"options": {"weight_update": "obs"}, "refit_target": "dense-stream"}
    assert _besa_fingerprint(0.5) == _besa_fingerprint(0.5, **old_style)
    assert _besa_fingerprint(0.7) != _besa_fingerprint(0.7, **old_style)
    at_70 = _besa_fingerprint(0.7)
    assert at_70["config.refit_target"] == "pruned-input" and at_70["option.weight_update"] == "admm"
    assert at_70["option.epochs"] == 1 == _besa_fingerprint(0.7, options={"epochs": 1})["option.epochs"]


def test_a_folder_of_the_learned_nm_default_is_not_resumed_by_todays():
    """A 2:4 folder from when BESA learned its patterns by default (1 epoch, the OBS update, the dense-stream refit,
    all stored as given or resolved then) differs from today's default (nothing learned, ADMM, pruned input)."""
    before = {
        "options": {"epochs": 1, "weight_update": "obs"},
        "refit_target": "dense-stream",
        "pattern": "2:4",
    }
    today = _besa_fingerprint(0.5, pattern="2:4")
    assert today != _besa_fingerprint(0.5, **before)
    assert (today["option.epochs"], today["option.weight_update"], today["config.refit_target"]) == (
        0, "admm", "pruned-input"
    )  # fmt: skip


def test_a_folder_of_the_unrefitted_nm_default_is_not_resumed_by_todays():
    """A 2:4 folder from when the N:M default was ADMM alone (stored with no refit epochs and, the setting newer, no
    relative rate) differs from today's (the relative rate resolved and stored); a 50% folder from before
    ``--refit-rel-lr`` existed resumes, its default resolving to 0 (off)."""
    today = _besa_fingerprint(0.5, pattern="2:4")
    assert today["config.refit_rel_lr"] == 1.2e-3
    assert today != {k: v for k, v in today.items() if k != "config.refit_rel_lr"}
    assert _besa_fingerprint(0.5, pattern="2:4", refit_rel_lr=1.2e-3) == today
    assert "config.refit_rel_lr" not in _besa_fingerprint(0.5)
