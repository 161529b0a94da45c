from pathlib import Path

import pytest

from besa.errors import BesaError
from besa.model.blocks import classify_block_weights
from besa.model.checks import (
    check_pattern_fits,
    check_pooled_stats,
    check_weights,
    dense_weights_message,
    inputs_read,
    learn_experts,
)
from besa.settings.values import NMPattern
from conftest import make_einsum_moe, make_llama4, make_model


def test_a_pattern_must_divide_every_pruned_width():
    model = make_model("llama")
    check_pattern_fits(model, NMPattern(2, 4), routers=False)
    check_pattern_fits(model, None, routers=False)
    with pytest.raises(
        BesaError, match=r"--pattern 3:7 does not divide the input width \d+ of model\.layers\.0\."
    ):
        check_pattern_fits(model, NMPattern(3, 7), routers=False)


def test_a_dense_model_keeps_nothing_dense_and_says_nothing():
    weights = check_weights(make_model("llama"), routers=False, leave_unknown_dense=False)
    assert weights and {w.kind for w in weights} == {"pruned"} and dense_weights_message(weights) is None


def test_what_stays_dense_is_counted_by_rule_in_one_line():
    model = make_llama4()
    learn_experts(model, streamed=False)
    weights = check_weights(model, routers=False, leave_unknown_dense=False)
    said = dense_weights_message(weights)
    dense = [w for w in weights if w.kind != "pruned"]
    share = sum(w.numel for w in dense) / sum(w.numel for w in weights)
    assert said is not None and "\n" not in said and f"{len(dense)} block weights ({share:.1%}" in said
    assert "router" in said and dense[0].name in said


def test_an_unknown_layout_stops_the_run_unless_left_dense_on_purpose():
    model = make_einsum_moe()
    stacked = learn_experts(model, streamed=False)
    assert stacked  # stacks no class records, multiplied in an einsum: their layout stays unknown
    with pytest.raises(BesaError, match="layout besa cannot prune yet.*--leave-unknown-dense"):
        check_weights(model, routers=False, leave_unknown_dense=False)
    kept = check_weights(model, routers=False, leave_unknown_dense=True)
    assert kept == classify_block_weights(model, routers=False)
    with pytest.raises(BesaError, match="--expert-stats pooled .* use --expert-stats routed"):
        check_pooled_stats(stacked)
    check_pooled_stats([])  # nothing stacked: pooled statistics are fine
    with pytest.raises(BesaError, match="--stream cannot prune"):
        learn_experts(make_einsum_moe(), streamed=True)


def test_what_a_run_reads_is_named_and_a_missing_model_fails_first(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    found = inputs_read(str(tmp_path / "model"), str(calib), reads_calibration=True)
    assert found == {"the input model": tmp_path / "model", "the calibration file": Path(calib)}
    assert inputs_read(make_model("llama"), "wikitext2", reads_calibration=True) == {}
    assert inputs_read(str(tmp_path / "model"), str(calib), reads_calibration=False) == {
        "the input model": tmp_path / "model"
    }
    with pytest.raises(BesaError):
        inputs_read(str(tmp_path / "missing"), "wikitext2", reads_calibration=False)
