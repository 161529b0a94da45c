"""A method written outside ``besa``: its config, its pruner and one ``register_method`` call are all it takes to
prune end to end (the Python API, the CLI, the saved recipe, ``besa plan``); nothing inside ``besa`` names it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import besa
import besa.registry
from besa.cli import main
from besa.methods.base import apply_prune_mask
from besa.methods.cost import BlockShape, MethodCost
from besa.methods.layerwise import LayerwisePruner
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.settings.commands import PlanConfig
from besa.settings.config import CalibrationSettings, MethodConfig
from besa.settings.recipe import RECIPE_NAME
from besa.stages.masks import select_prune_mask
from besa.stages.selection import LayerStats
from besa.tools.plan import plan_run, shape_of
from conftest import make_model


@dataclass
class PeakConfig(MethodConfig):
    """The method's own setting (a flag of its own on the CLI, ``--peak-power``)."""

    peak_power: float = field(
        default=1.0, metadata={"help": "peak: exponent of the inputs' peak in the score"}
    )


class PeakStats(LayerStats):
    """The largest |x| every input feature of a linear sees over the calibration tokens."""

    def __init__(self, in_features: int) -> None:
        self.peak = torch.zeros(in_features)

    def add(self, x: torch.Tensor) -> None:
        self.peak = torch.maximum(self.peak, x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float().cpu())


class PeakPruner(LayerwisePruner):
    """Prune the weights with the smallest |W| * peak|x|^power in every output row."""

    def make_stats(self, layer: nn.Module) -> LayerStats:
        return PeakStats(weight_matrix(layer).shape[1])

    def prune_layer(self, layer: nn.Module, stats: LayerStats | None, rate: float) -> None:
        assert isinstance(stats, PeakStats) and isinstance(self.method_config, PeakConfig)
        w = weight_matrix(layer)
        scores = w.abs().float() * stats.peak.to(w.device).pow(self.method_config.peak_power)
        apply_prune_mask(layer, select_prune_mask(scores, rate, self.pattern))

    def report_extra(self, facts: dict) -> dict:
        assert isinstance(self.method_config, PeakConfig)
        return {"name": "peak", "power": self.method_config.peak_power}

    def method_cost(self, block: BlockShape) -> MethodCost:
        return MethodCost(
            {"peaks of the block's inputs (float32)": 4 * sum(i for _o, i in block.linears.values())}
        )


class PlainPeakPruner(PeakPruner):
    """The same method without a cost of its own: the base class's answer."""

    method_cost = LayerwisePruner.method_cost


@pytest.fixture
def peak():
    """``peak`` registered for one test (and gone after it, so no other test sees it)."""
    besa.register_method("peak", PeakConfig)(PeakPruner)
    try:
        yield
    finally:
        del besa.registry._REGISTRY["peak"]


def _linears(model):
    return {
        f"{b}.{n}": layer
        for b, block in find_blocks(model)
        for n, layer in find_linears(block, model).items()
    }


def _expected_masks(model, calib_ids, power):
    """The masks of ``peak`` computed here, layer by layer on the dense block inputs, for the first block (its
    inputs are the embeddings: the same for any method)."""
    captured = {}
    block = find_blocks(model)[0][1]
    hooks = [
        layer.register_forward_hook(lambda m, a, o, n=n: captured.setdefault(n, []).append(a[0].detach()))
        for n, layer in find_linears(block, model).items()
    ]
    with torch.no_grad():
        model(calib_ids)
    for h in hooks:
        h.remove()
    masks = {}
    for name, layer in find_linears(block, model).items():
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in captured[name]])
        scores = weight_matrix(layer).abs() * x.abs().amax(0).pow(power)
        masks[name] = select_prune_mask(scores, 0.5, None)
    return masks


def test_a_method_registered_outside_besa_prunes_end_to_end_and_its_recipe_reruns(
    peak, tmp_path, tokenizer, calib_ids
):
    model = make_model("llama")
    expected = _expected_masks(make_model("llama"), calib_ids, 2.0)
    out = tmp_path / "first"
    result = besa.prune(
        model, method="peak", tokenizer=tokenizer, calib_ids=calib_ids, sparsity=0.5, peak_power=2.0,
        within_block="parallel", out=out, progress=False,
    )  # fmt: skip
    report = result.report
    assert report["config"]["method"] == "peak" and report["method_options"] == {"peak_power": 2.0}
    assert report["method"] == {"name": "peak", "power": 2.0}
    linears = _linears(result.model)
    assert set(report["layers"]) == set(linears)
    for name, layer in linears.items():
        w = weight_matrix(layer)
        assert int((w == 0).sum()) == w.numel() // 2, name  # exactly half of every pruned linear
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name  # ... row by row
    first = find_blocks(result.model)[0]
    for name, layer in find_linears(first[1], result.model).items():
        assert torch.equal(weight_matrix(layer) == 0, expected[name]), name  # the method's own masks
    recipe = yaml.safe_load((out / RECIPE_NAME).read_text())
    assert recipe["method"] == "peak" and recipe["options"] == {"peak_power": 2.0}
    again = besa.prune(
        make_model("llama"), recipe=out / RECIPE_NAME, tokenizer=tokenizer, calib_ids=calib_ids,
        out=tmp_path / "second", progress=False,
    )  # fmt: skip
    assert again.report["config"] == report["config"]
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "second" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_the_cli_prunes_and_plans_with_a_method_registered_outside_besa(peak, tmp_path, model_dir, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("Some calibration text about many things, sentences and numbers 1 2 3. " * 40)
    common = ["--calib", str(calib), "--nsamples", "4", "--seqlen", "16", "--no-progress"]
    out, again = tmp_path / "first", tmp_path / "second"
    argv = ["prune", str(model_dir), "--method", "peak", "--peak-power", "0.5", *common, "--out", str(out)]
    assert main(argv) == 0
    assert main(["prune", str(model_dir), "--recipe", str(out / RECIPE_NAME), "--out", str(again),
                 "--no-progress"]) == 0  # fmt: skip
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
    pruned = [k for k in a if k.endswith("proj.weight")]
    assert pruned and all(int((a[k] == 0).sum()) == a[k].numel() // 2 for k in pruned)
    capsys.readouterr()
    assert main(["plan", str(model_dir), "--method", "peak", "--nsamples", "4", "--seqlen", "16"]) == 0
    printed = capsys.readouterr().out
    assert "peaks of the block's inputs (float32)" in printed and "peak, host" in printed
    assert "about 4 block forwards" in printed  # 2 blocks x (the statistics pass + the propagation)


def test_plan_run_plans_a_method_registered_outside_besa(peak):
    shape = shape_of(make_model("llama"))  # hidden 64, MLP 128, 2 blocks
    cfg = PlanConfig(method="peak", calibration=CalibrationSettings(nsamples=8, seqlen=16))
    own = plan_run(shape, cfg, PeakPruner(PeakConfig(), cfg.prune_config()), torch.float32)
    inputs = sum(i for _o, i in shape.blocks[0].values())
    assert ("peaks of the block's inputs (float32)", 4 * inputs, "host") in own.rows
    base = plan_run(shape, cfg, PlainPeakPruner(PeakConfig(), cfg.prune_config()), torch.float32)
    assert len(base.rows) == len(own.rows) - 1  # the base class: no working set of the method's own
    assert base.peaks["host"] == shape.total_params * 4 + 2 * 8 * 16 * 64 * 4  # the weights and activations
    assert own.peaks["host"] == base.peaks["host"] + 4 * inputs
    assert own.forwards == base.forwards == 2 * 2.0
