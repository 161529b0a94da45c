"""``besa plan``: memory from the config alone, as sums of the tensors a run keeps."""

import pytest
import torch

from besa.cli import main
from besa.tools.plan import (
    BESA_BACKWARD_BYTES_PER_WEIGHT,
    BESA_BYTES_PER_WEIGHT,
    KL_SAVED_PER_TOKEN_BLOCK,
    activation_bytes,
    hessian_bytes,
    kl_stage_bytes,
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


def test_plan_sums_the_tensors_a_run_keeps():
    shape = shape_of(make_model("llama"))  # hidden 64, MLP 128, 2 blocks
    block = max(shape.block_params)
    plain = plan_run(
        shape, "sparsegpt", 8, 16, torch.float32, torch.bfloat16, stream=False, within_block="parallel"
    )
    ins = [i for _o, i in shape.blocks[0].values()]
    hessians = 8 * sum(i * i for i in ins) + 8 * max(i * i for i in ins)
    assert hessian_bytes(shape.blocks[0], shape.groups[0], sequential=False) == hessians
    assert activation_bytes(8, 16, 64, 4, 2) == 2 * 8 * 16 * 64 * 4
    assert plain.peaks["host"] == shape.total_params * 4 + 2 * 8 * 16 * 64 * 4 + hessians
    streamed = plan_run(shape, "sparsegpt", 8, 16, torch.float32, torch.bfloat16, stream=True)
    assert streamed.peaks["host"] == shape.outside_params * 2 + block * 4 + 2 * 8 * 16 * 64 * 4 + hessians
    # the least-squares solve after the sweep: a float32 Hessian and six float32 (rows, in) copies of the largest
    solve = max(4 * i * i + 24 * min(o, 1024) * i for o, i in shape.blocks[0].values())
    with_lsq = hessian_bytes(shape.blocks[0], shape.groups[0], sequential=False, lsq=True)
    assert with_lsq == 8 * sum(i * i for i in ins) + max(8 * max(i * i for i in ins), solve) > hessians
    # sequential holds one group's Hessians at a time: never more than all of them
    assert hessian_bytes(shape.blocks[0], shape.groups[0], sequential=True) < hessians
    besa = plan_run(shape, "besa", 8, 16, torch.float32, torch.float32, stream=False, dense_stream=True,
                    weight_update="none")  # fmt: skip
    linears = sum(o * i for o, i in shape.blocks[0].values())
    state = BESA_BYTES_PER_WEIGHT * linears + BESA_BACKWARD_BYTES_PER_WEIGHT * 128 * 64  # largest: the MLP's
    assert besa.peaks["host"] == shape.total_params * 4 + 4 * 8 * 16 * 64 * 4 + state
    gpu = plan_run(shape, "wanda", 8, 16, torch.bfloat16, torch.bfloat16, stream=True, device="cuda")
    assert gpu.peaks["host"] == shape.outside_params * 2 + 2 * 8 * 16 * 64 * 2
    assert set(gpu.peaks) == {"host", "device"}
    data_free = plan_run(
        shape, "magnitude", 8, 16, torch.float32, torch.float32, stream=False, uses_data=False
    )
    assert data_free.forwards == 0 and data_free.peaks["host"] == shape.total_params * 4 + 4 * 64 * 128


def test_the_kl_stage_peak_is_the_whole_model_training_not_added_to_the_blocks():
    shape = shape_of(make_model("llama"))  # hidden 64, 2 blocks, vocab 260 (untied head)
    base = plan_run(shape, "wanda", 8, 16, torch.float32, torch.float32, stream=False)
    kl = plan_run(shape, "wanda", 8, 16, torch.float32, torch.float32, stream=False, kl_epochs=1, kl_batch=4,
                  kl_topk=8)  # fmt: skip
    trained = sum(o * i for block in shape.blocks for o, i in block.values())
    parts = kl_stage_bytes(shape, 8, 16, 4, 4, 8)
    assert parts["KL stage: Adam state of the blocks' linears"] == 3 * trained * 4
    assert parts["KL stage: the dense targets"] == 8 * 16 * (4 * 8 + 4 * 9)
    assert parts["KL stage: one batch's activations and logits"] == (
        4 * 16 * 64 * 4 * KL_SAVED_PER_TOKEN_BLOCK * 2 + 3 * 4 * 16 * shape.vocab * 4
    )
    assert shape.vocab == 260
    assert kl.peaks["host"] == max(base.peaks["host"], sum(parts.values()))
    assert {r for r, _, _ in kl.rows} >= set(parts)


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
