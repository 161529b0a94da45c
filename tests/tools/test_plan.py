"""``besa plan``: memory from the config alone, as sums of the tensors a run keeps."""

import pytest
import torch

from besa.cli import main
from besa.methods.base import Pruner
from besa.methods.besa.config import BesaConfig
from besa.methods.besa.pruner import BESA_BACKWARD_BYTES_PER_WEIGHT, BESA_BYTES_PER_WEIGHT
from besa.methods.cost import MethodCost, hessian_bytes
from besa.registry import get_method
from besa.settings.commands import PlanConfig
from besa.settings.config import (
    CalibrationSettings,
    KLSettings,
    MethodConfig,
    PruneConfig,
    RefitSettings,
    RuntimeSettings,
)
from besa.tools.plan import (
    KL_SAVED_PER_TOKEN_BLOCK,
    activation_bytes,
    block_step,
    kl_stage_bytes,
    largest_block,
    model_shape,
    plan_run,
    shape_of,
)
from conftest import make_model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_config_alone_gives_the_real_models_shapes(arch):
    model = make_model(arch)
    real = shape_of(model)
    meta = model_shape(model.config)  # built on the meta device: no weights
    assert meta.blocks == real.blocks and meta.block_params == real.block_params
    assert meta.outside_params == real.outside_params
    assert real.total_params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _plan(shape, method, stored=torch.float32, options=None, **settings):
    """``plan_run`` of a run of ``method`` on 8 windows of 16 tokens (float32 unless ``runtime`` says otherwise),
    its pruner made as ``besa plan`` makes it, with the method's ``options`` instead of its defaults."""
    settings.setdefault("calibration", CalibrationSettings(nsamples=8, seqlen=16))
    settings.setdefault("runtime", RuntimeSettings(dtype="float32"))
    cfg = PlanConfig(method=method, **settings)
    spec = get_method(method)
    pruner = spec.pruner_cls(spec.config_cls(**(options or {})), cfg.prune_config())
    return plan_run(shape, cfg, pruner, stored)


def test_plan_sums_the_tensors_a_run_keeps():
    shape = shape_of(make_model("llama"))  # hidden 64, MLP 128, 2 blocks
    block = max(shape.block_params)
    plain = _plan(shape, "sparsegpt", torch.bfloat16, {"lsq_iters": 0}, within_block="parallel")
    ins = [i for _o, i in shape.blocks[0].values()]
    hessians = 8 * sum(i * i for i in ins) + 8 * max(i * i for i in ins)
    assert hessian_bytes(shape.blocks[0], shape.groups[0], sequential=False) == hessians
    assert activation_bytes(8, 16, 64, 4, 2) == 2 * 8 * 16 * 64 * 4
    assert plain.peaks["host"] == shape.total_params * 4 + 2 * 8 * 16 * 64 * 4 + hessians
    assert plain.forwards == 2 * 2.0  # the statistics pass and the propagation, per block
    streamed = _plan(
        shape, "sparsegpt", torch.bfloat16, {"lsq_iters": 0}, stream=True, within_block="parallel"
    )
    assert streamed.peaks["host"] == shape.outside_params * 2 + block * 4 + 2 * 8 * 16 * 64 * 4 + hessians
    # the least-squares solve after the sweep: a float32 Hessian and six float32 (rows, in) copies of the largest
    solve = max(4 * i * i + 24 * min(o, 1024) * i for o, i in shape.blocks[0].values())
    with_lsq = hessian_bytes(shape.blocks[0], shape.groups[0], sequential=False, lsq=True)
    assert with_lsq == 8 * sum(i * i for i in ins) + max(8 * max(i * i for i in ins), solve) > hessians
    solved = _plan(
        shape, "sparsegpt", torch.bfloat16, within_block="parallel"
    )  # SparseGPT's default: the solve
    assert solved.peaks["host"] == shape.total_params * 4 + 2 * 8 * 16 * 64 * 4 + with_lsq
    # sequential holds one group's Hessians at a time: never more than all of them
    assert hessian_bytes(shape.blocks[0], shape.groups[0], sequential=True) < hessians
    besa = _plan(
        shape,
        "besa",
        options={"weight_update": "none", "target": "dense-stream"},
        refit=RefitSettings(epochs=0),
    )
    linears = sum(o * i for o, i in shape.blocks[0].values())
    state = BESA_BYTES_PER_WEIGHT * linears + BESA_BACKWARD_BYTES_PER_WEIGHT * 128 * 64  # largest: the MLP's
    assert besa.peaks["host"] == shape.total_params * 4 + 4 * 8 * 16 * 64 * 4 + state
    # sequential; training (1 epoch: unstructured); target
    assert besa.forwards == 2 * (2.0 + 0.75 + 3.0 * BesaConfig().resolved_epochs(nm=False) + 1.0)
    gpu = _plan(shape, "wanda", torch.bfloat16, runtime=RuntimeSettings(), stream=True, device="cuda:1")
    assert gpu.peaks["host"] == shape.outside_params * 2 + 2 * 8 * 16 * 64 * 2  # auto: bfloat16 on CUDA
    assert set(gpu.peaks) == {"host", "device"}
    data_free = _plan(shape, "magnitude")
    assert data_free.forwards == 0 and data_free.peaks["host"] == shape.total_params * 4 + 4 * 64 * 128
    refit = _plan(
        shape, "magnitude", refit=RefitSettings(epochs=2)
    )  # the refit runs the blocks on the windows
    assert ("refit: Adam state of the block", 3 * block * 4, "host") in refit.rows
    assert refit.forwards == 2 * (2.0 + 3.0 * 2 + 1.0)


class _Tally(Pruner):
    """A method that tells the plan its own working set and forwards."""

    def prune_block(self, work):
        raise NotImplementedError

    def method_cost(self, block):
        return MethodCost({"a tally per weight": 2 * block.weights}, forwards=1.5)


def test_the_plan_takes_a_methods_own_cost_from_its_pruner():
    shape = shape_of(make_model("llama"))
    cfg = PlanConfig(method="wanda", calibration=CalibrationSettings(nsamples=8, seqlen=16))
    pruner = _Tally(MethodConfig(), cfg.prune_config())
    plan = plan_run(shape, cfg, pruner, torch.float32)
    tally = 2 * sum(o * i for o, i in largest_block(shape).linears.values())
    assert ("a tally per weight", tally, "host") in plan.rows
    assert plan.forwards == 2 * (2.0 + 1.5)
    work, forwards = block_step(largest_block(shape), _Tally(MethodConfig(), PruneConfig(method="wanda")))
    assert work == {"a tally per weight": tally} and forwards == 3.5


def test_the_kl_stage_peak_is_the_whole_model_training_not_added_to_the_blocks():
    shape = shape_of(make_model("llama"))  # hidden 64, 2 blocks, vocab 260 (untied head)
    base = _plan(shape, "wanda")
    kl = _plan(shape, "wanda", kl=KLSettings(epochs=1, batch=4, topk=8))
    trained = sum(o * i for block in shape.blocks for o, i in block.values())
    parts = kl_stage_bytes(shape, 8, 16, 4, 4, 8)
    # two float32 moments of the kept half, a bit of mask per weight (the best copy is in a temporary file)
    assert parts["KL stage: Adam's moments of the kept weights (half), their masks"] == (
        trained // 2 * 8 + -(-trained // 8)
    )
    assert parts["KL stage: the dense targets"] == 8 * 16 * (4 * 8 + 4 * 9)
    # every block's input, one block's recomputed activations, the logits of all 64 positions (fewer than a chunk)
    assert parts["KL stage: one batch's block inputs, a block's activations, a chunk of logits"] == (
        4 * 16 * 64 * 4 * (2 + KL_SAVED_PER_TOKEN_BLOCK) + 4 * 4 * 16 * shape.vocab * 4
    )
    assert shape.vocab == 260
    assert kl.peaks["host"] == max(base.peaks["host"], sum(parts.values()))
    assert {r for r, _, _ in kl.rows} >= set(parts)


def test_the_kl_stage_is_planned_where_the_method_runs_it_by_default():
    """BESA's N:M runs end with a KL epoch unless told otherwise (``Pruner.kl_settings``); a streamed run has none."""
    shape = shape_of(make_model("llama"))
    spec = get_method("besa")

    def kl_rows(stream, **settings):
        run = PruneConfig.from_flat(method="besa", nsamples=8, seqlen=16, dtype="float32", **settings)
        cfg = PlanConfig(method="besa", stream=stream, calibration=run.calibration, runtime=run.runtime)
        plan = plan_run(shape, cfg, spec.pruner_cls(spec.config_cls(), run), torch.float32)
        return [r for r, _, _ in plan.rows if r.startswith("KL stage")]

    assert set(kl_rows(False, pattern="2:4")) == set(kl_stage_bytes(shape, 8, 16, 4, 4, 64))
    assert kl_rows(False, pattern="2:4", kl_epochs=0) == kl_rows(True, pattern="2:4") == kl_rows(False) == []


def test_cli_plan_prints_the_peaks_and_refuses_bad_input(model_dir, capsys):
    assert main(["plan", str(model_dir), "--method", "besa", "--nsamples", "4", "--seqlen", "32"]) == 0
    out = capsys.readouterr().out
    assert "peak, host" in out and "BESA's per-weight state" in out and "refit" in out  # BESA's defaults
    assert main(["plan", str(model_dir / "config.json"), "--method", "sparsegpt", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "peak, device" in out and "one group at a time" in out  # SparseGPT's default: sequential
    assert main(["plan", str(model_dir), "--method", "wanda", "--kl-epochs", "2"]) == 0
    assert "KL stage: the whole model" in capsys.readouterr().out
    assert main(["plan", str(model_dir), "--device", "tpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "unknown --device" in err[0]


def test_a_moe_block_is_planned_with_every_expert_matrix():
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=260, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    shape = model_shape(config)
    experts = {n: s for n, s in shape.blocks[0].items() if ".experts." in n}
    assert experts == {
        **{f"mlp.experts.gate_up_proj.{e}": (64, 64) for e in range(4)},
        **{f"mlp.experts.down_proj.{e}": (64, 32) for e in range(4)},
    }
    assert "mlp.gate" not in shape.blocks[0]  # the router stays dense
