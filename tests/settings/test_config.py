import pytest

from besa.errors import BesaError
from besa.settings.commands import EvalConfig
from besa.settings.config import PruneConfig
from besa.settings.values import NMPattern, parse_pattern


def test_parse_pattern():
    assert parse_pattern("2:4") == NMPattern(2, 4)
    assert parse_pattern(None) is None and parse_pattern("unstructured") is None
    for bad in ("4:2", "0:4", "2:2", "2-4", "a:b", "2:4:8"):
        with pytest.raises(BesaError):
            parse_pattern(bad)


def test_pattern_sets_the_sparsity_and_default_is_half():
    assert PruneConfig(pattern="4:8").sparsity == 0.5
    assert PruneConfig(pattern="1:4").sparsity == 0.25
    assert PruneConfig().sparsity == 0.5
    with pytest.raises(BesaError, match="contradicts"):
        PruneConfig(pattern="2:4", sparsity=0.7)


@pytest.mark.parametrize(
    "field,value", [("sparsity", 1.0), ("sparsity", -0.01), ("nsamples", 0), ("seqlen", 0)]
)
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(BesaError):
        PruneConfig.from_flat(**{field: value})


def test_eval_config_validation():
    with pytest.raises(BesaError):
        EvalConfig(seqlen=1)
    with pytest.raises(BesaError):
        EvalConfig(max_windows=0)
