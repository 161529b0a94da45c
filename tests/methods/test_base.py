import pytest
import torch

import besa
from besa.engine.pipeline import run_sequential
from besa.engine.work import BlockWork
from besa.methods.sparsegpt import SparseGPTPruner
from besa.model.blocks import find_blocks
from besa.stages.selection import HessianStats
from conftest import make_model


def _seen_hessians(monkeypatch, within_block: str | None, calib_ids, tokenizer):
    """Prune a tiny LLaMA with SparseGPT; return (the Hessian each linear was pruned with, by parameter name,
    the pruned model)."""
    seen: dict[int, torch.Tensor] = {}
    real = SparseGPTPruner.prune_layer

    def spy(self, layer, stats, rate):
        seen[id(layer)] = stats.hessian.clone()
        return real(self, layer, stats, rate)

    monkeypatch.setattr(SparseGPTPruner, "prune_layer", spy)
    model = make_model("llama")
    besa.prune(model, tokenizer=tokenizer, method="sparsegpt", calib_ids=calib_ids, forward_batch=4,
               within_block=within_block, progress=False, checkpoint=False)  # fmt: skip
    return {name: seen[id(m)] for name, m in model.named_modules() if id(m) in seen}, model


def _pruned_stream_hessians(model, calib_ids):
    """The Hessian of every linear's inputs when the finished pruned model runs the calibration windows."""
    found: dict[str, torch.Tensor] = {}

    def step(work: BlockWork) -> None:
        stats = {n: HessianStats(layer.in_features, torch.device("cpu")) for n, layer in work.linears.items()}
        work.calibrate(stats)
        found.update({f"{work.name}.{n}": s.hessian for n, s in stats.items()})

    run_sequential(model, calib_ids, step, torch.device("cpu"), forward_batch=4, progress=False)
    return found


@pytest.mark.parametrize("within_block", ["parallel", "sequential", None])
def test_sequential_fits_every_layer_to_the_inputs_of_the_pruned_block(monkeypatch, calib_ids, tokenizer,
                                                                       within_block):  # fmt: skip
    """Sequential: the statistics each layer was pruned with are those of the final pruned block (earlier groups
    pruned, later ones not yet mattering). Parallel: only the block's first group sees them (the rest see the
    dense block's). SparseGPT's default (``None``) is sequential."""
    seen, model = _seen_hessians(monkeypatch, within_block, calib_ids, tokenizer)
    final = _pruned_stream_hessians(model, calib_ids)
    assert seen.keys() == final.keys() and len(seen) == 14
    first_group = ("q_proj", "k_proj", "v_proj")
    for name, h in seen.items():
        same = torch.allclose(h, final[name], rtol=1e-4, atol=1e-6)
        assert same == (within_block != "parallel" or name.endswith(first_group)), name


@pytest.mark.parametrize(("method", "default"), [("sparsegpt", "sequential"), ("wanda", "parallel"),
                                                 ("magnitude", "parallel")])  # fmt: skip
def test_within_block_default_is_the_methods_own_and_reported(
    method, default, calib_ids, tokenizer, tmp_path
):
    """Without ``--within-block`` each method uses its own default, and the report says which ran."""
    import json

    model = make_model("llama")
    besa.prune(model, tokenizer=tokenizer, method=method, calib_ids=calib_ids, out=tmp_path / "out",
               progress=False, checkpoint=False)  # fmt: skip
    report = json.loads((tmp_path / "out" / "besa_report.json").read_text())
    assert report["config"]["within_block"] == default
    model = make_model("llama")
    besa.prune(model, tokenizer=tokenizer, method=method, calib_ids=calib_ids, out=tmp_path / "given",
               within_block="parallel", progress=False, checkpoint=False)  # fmt: skip
    assert (
        json.loads((tmp_path / "given" / "besa_report.json").read_text())["config"]["within_block"]
        == "parallel"
    )


def _with_idle_linears() -> torch.nn.Module:
    """A tiny LLaMA whose MLPs each hold two more linears: ``unused``, never called, and ``zero_fed``, called on
    zeros only (it adds nothing to the output): no calibration statistics reach either."""
    model = make_model("llama")
    for _, block in find_blocks(model):
        mlp = block.mlp
        torch.manual_seed(1)
        mlp.unused = torch.nn.Linear(64, 64, bias=False)
        mlp.zero_fed = torch.nn.Linear(64, 64, bias=False)
        original = mlp.forward

        def forward(x, original=original, mlp=mlp):
            return original(x) + mlp.zero_fed(torch.zeros_like(x))

        mlp.forward = forward
    return model


@pytest.mark.parametrize(
    "method,options",
    [
        ("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("wanda", {"pattern": "2:4"}),
        ("sparsegpt", {"pattern": "2:4"}), ("besa", {"method_options": {"optimizer": "adamw", "lr": 0.05}}),
    ],
)  # fmt: skip
def test_no_method_destroys_a_tensor_and_layers_no_calibration_reaches_stay_dense(
    method, options, tokenizer, calib_ids
):
    model = _with_idle_linears()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    result = besa.prune(
        model, tokenizer=tokenizer, method=method, calib_ids=calib_ids, progress=False, checkpoint=False,
        **({"sparsity": 0.5} if "pattern" not in options else {}), **options,
    )  # fmt: skip
    after = dict(model.named_parameters())
    for name, w in before.items():  # the invariant, for every method: nothing non-zero comes out all zeros
        assert not (w.count_nonzero() and not after[name].count_nonzero()), name
    left = result.report["weights"]["left_dense"]
    for block in ("model.layers.0", "model.layers.1"):
        unused, zero_fed = f"{block}.mlp.unused", f"{block}.mlp.zero_fed"
        if method == "magnitude":  # needs no calibration: it prunes them like any other
            assert unused not in left and result.report["layers"][unused]["sparsity"] == 0.5
            continue
        assert left[unused] == "its forward never ran on the calibration windows"
        assert torch.equal(after[f"{unused}.weight"], before[f"{unused}.weight"])
        assert result.report["layers"][unused]["target"] == 0.0
        if method == "sparsegpt":  # all-zero inputs: every column dead, the solve would zero it whole
            assert left[zero_fed] == "pruning would have left it all zeros"
            assert torch.equal(after[f"{zero_fed}.weight"], before[f"{zero_fed}.weight"])
    down = result.report["layers"]["model.layers.0.mlp.down_proj"]["sparsity"]
    assert down == 0.5 if method != "besa" else 0.4 < down < 0.6  # the other linears are pruned as ever


def test_a_linear_the_first_window_misses_but_others_reach_is_pruned_not_left_dense(tokenizer, calib_ids):
    """As a per-expert ``nn.Linear`` that the router happens to skip on the first window: the one-window probe
    misses it, the count over every window finds it, and the method prunes it."""
    model = make_model("llama")
    for _, block in find_blocks(model):
        mlp = block.mlp
        mlp.sometimes = torch.nn.Linear(64, 64, bias=False)
        original, calls = mlp.forward, [0]

        def forward(x, original=original, mlp=mlp, calls=calls):
            calls[0] += 1
            out = original(x)
            return out + 0 * mlp.sometimes(x) if calls[0] % 2 == 0 else out  # every other call: not the first

        mlp.forward = forward
    result = besa.prune(model, tokenizer=tokenizer, method="wanda", sparsity=0.5, calib_ids=calib_ids,
                        forward_batch=2, progress=False, checkpoint=False)  # fmt: skip
    assert result.report["weights"]["left_dense"] == {}
    assert result.report["layers"]["model.layers.0.mlp.sometimes"]["sparsity"] == 0.5


def test_a_layer_put_back_dense_leaves_the_quantized_save_whole(tokenizer, calib_ids, tmp_path):
    model = _with_idle_linears()
    result = besa.prune(
        model, tokenizer=tokenizer, method="sparsegpt", sparsity=0.5, calib_ids=calib_ids, wbits=4, group_size=32,
        save_quantized=True, out=tmp_path / "q", progress=False,
    )  # fmt: skip
    left = result.report["weights"]["left_dense"]
    assert left["model.layers.0.mlp.zero_fed"] == "pruning would have left it all zeros"
    layers = result.report["quantization"]["layers"]
    assert "model.layers.0.mlp.zero_fed" not in layers and "model.layers.0.mlp.down_proj" in layers
    assert (tmp_path / "q" / "quantized.safetensors").is_file()
