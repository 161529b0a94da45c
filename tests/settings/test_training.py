"""The training stages' settings (``besa.settings.training``): what is left to the method, and what is refused."""

import pytest

from besa.errors import BesaError
from besa.settings.training import KLSettings, RefitSettings


def test_the_refits_epochs_target_and_relative_rate_are_left_to_the_method():
    r = RefitSettings()
    assert (r.epochs, r.target, r.rel_lr) == (None, None, None)
    assert RefitSettings(rel_lr=0.0).rel_lr == 0.0  # a given 0 stays given: the absolute rate


@pytest.mark.parametrize(
    ("section", "values", "match"),
    [
        (RefitSettings, {"rel_lr": -1e-3}, "--refit-rel-lr"),
        (RefitSettings, {"anchor": -1.0}, "--refit-anchor"),
        (RefitSettings, {"epochs": -1}, "--refit-epochs"),
        (RefitSettings, {"target": "dense-output"}, "refit-target"),
        (RefitSettings, {"loss": "kl"}, "refit-loss"),
        (KLSettings, {"lr": 0.0}, "--kl-lr"),
        (KLSettings, {"rel_lr": -1e-4}, "--kl-rel-lr"),
        (KLSettings, {"topk": 0}, "--kl-topk"),
    ],
)
def test_a_bad_value_is_refused_with_its_flag(section, values, match):
    with pytest.raises(BesaError, match=match):
        section(**values)
