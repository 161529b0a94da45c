import dataclasses

import pytest

from besa.errors import BesaError
from besa.settings.commands import PlanConfig
from besa.settings.config import PruneConfig
from besa.settings.flat import allows_none, flat_fields, from_flat, to_flat, type_name
from besa.settings.training import KLSettings, RefitSettings
from besa.settings.values import CHOICES, check_choice

# The flat names of every pruning setting: the flags, the recipe's ``prune`` keys, the report's ``config`` and the
# run folder's fingerprint. Nesting the config must not change them (old recipes and run folders keep working).
FLAT_NAMES = {
    "method", "sparsity", "pattern", "calib", "nsamples", "seqlen", "seed", "bos", "device", "dtype", "forward_batch",
    "wbits", "group_size", "quant_mode", "allocation", "owl_m", "owl_lambda", "prune_routers", "expert_min_tokens",
    "expert_stats", "leave_unknown_dense", "within_block", "refit_epochs", "refit_lr", "refit_target", "refit_batch",
    "refit_holdout", "refit_anchor", "refit_rel_lr", "refit_loss", "rotate", "kl_epochs", "kl_lr", "kl_rel_lr",
    "kl_topk", "kl_batch", "kl_holdout",
}  # fmt: skip


def test_the_flat_names_are_those_of_the_flat_config_before():
    names = [name for name, _ in flat_fields(PruneConfig)]
    assert len(names) == len(set(names)) and set(names) == FLAT_NAMES
    assert set(PruneConfig().to_dict()) == FLAT_NAMES


def test_flat_round_trip_lands_each_setting_in_its_section():
    given = {"method": "besa", "nsamples": 7, "calib": "ptb", "dtype": "float32", "wbits": 4, "quant_mode": "rtn",
             "allocation": "owl", "owl_lambda": 0.05, "expert_min_tokens": 9, "expert_stats": "pooled",
             "refit_epochs": 3, "refit_target": "dense", "kl_epochs": 0, "kl_topk": 5, "within_block": "parallel"}  # fmt: skip
    config = PruneConfig.from_flat(**given)
    assert (config.calibration.nsamples, config.calibration.source, config.runtime.dtype) == (
        7,
        "ptb",
        "float32",
    )
    assert (config.quantization.wbits, config.quantization.mode, config.quantization.joint) == (
        4,
        "rtn",
        None,
    )
    assert config.quantization.spec is not None and config.quantization.spec.bits == 4
    assert (config.allocation.policy, config.allocation.owl_lambda) == ("owl", 0.05)
    assert (config.experts.min_tokens, config.experts.stats) == (9, "pooled")
    assert (config.refit.epochs, config.refit.target, config.kl.topk) == (3, "dense", 5)
    flat = config.to_dict()
    assert {k: flat[k] for k in given} == given
    assert PruneConfig.from_flat(**flat) == config


def test_an_unknown_flat_name_is_refused_by_name():
    with pytest.raises(BesaError, match="unknown setting 'refit_epoch'"):
        PruneConfig.from_flat(refit_epoch=2)


def test_section_prefixes_make_the_flat_names():
    assert [n for n, _ in flat_fields(RefitSettings)] == [
        f"refit_{f.name}" for f in dataclasses.fields(RefitSettings)
    ]
    assert to_flat(KLSettings(epochs=2)) == {
        "kl_epochs": 2,
        "kl_lr": 1e-5,
        "kl_rel_lr": None,  # the method's own (``Pruner.kl_settings``)
        "kl_topk": 64,
        "kl_batch": 4,
        "kl_holdout": 4,
    }
    assert from_flat(RefitSettings, {"refit_lr": 0.5, "kl_lr": 9.0}) == RefitSettings(lr=0.5)


def test_plan_exposes_only_the_settings_that_change_the_memory():
    names = {name for name, _ in flat_fields(PlanConfig)}
    assert names == {"method", "device", "stream", "nsamples", "seqlen", "dtype", "forward_batch", "within_block",
                     "refit_epochs", "kl_epochs"}  # fmt: skip
    plan = from_flat(PlanConfig, {"method": "sparsegpt", "nsamples": 4, "refit_epochs": 1, "kl_epochs": 2})
    run = plan.prune_config()
    assert (run.method, run.calibration.nsamples, run.refit.epochs, run.kl.epochs) == ("sparsegpt", 4, 1, 2)
    with pytest.raises(BesaError, match="cannot run with --stream"):
        PlanConfig(stream=True, kl=KLSettings(epochs=1))


@pytest.mark.parametrize("flag", sorted(CHOICES))
def test_each_choice_list_is_the_one_that_decides(flag):
    for choice in CHOICES[flag]:
        check_choice(flag, choice)
    with pytest.raises(BesaError, match=f"unknown --{flag} 'nonsense': choose "):
        check_choice(flag, "nonsense")


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"dtype": "fp8"}, "--dtype"), ({"bos": "maybe"}, "--bos"), ({"within_block": "diagonal"}, "--within-block"),
     ({"quant_mode": "both"}, "--quant-mode"), ({"expert_stats": "all"}, "--expert-stats"),
     ({"refit_target": "x"}, "--refit-target"), ({"allocation": "learned"}, "--allocation")],
)  # fmt: skip
def test_sections_refuse_a_word_outside_their_choices(settings, message):
    with pytest.raises(BesaError, match=message):
        PruneConfig.from_flat(**settings)


@dataclasses.dataclass
class _Typed:  # this module does not postpone annotations: the fields' types are the classes themselves
    rate: float = 0.5
    steps: int | None = None
    name: str = "x"
    on: bool = False


def test_annotations_as_types_read_like_annotations_as_strings():
    fields = {f.name: f for f in dataclasses.fields(_Typed)}
    assert [type_name(fields[n]) for n in ("rate", "steps", "name", "on")] == ["float", "int", "str", "bool"]
    assert allows_none(fields["steps"]) and not allows_none(fields["rate"])
    strings = {f.name: f for f in dataclasses.fields(RefitSettings)}  # ``from __future__ import annotations``
    assert (type_name(strings["lr"]), type_name(strings["epochs"]), allows_none(strings["epochs"])) == (
        "float",
        "int",
        True,
    )
