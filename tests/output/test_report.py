"""The report and its picture: the mask's own count beside the counted zeros, whole-numbered block labels."""

import torch

import besa
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.output.plotting import allocation_figure
from conftest import make_model


def _model_with_dense_zeros():
    model = make_model("llama")
    with torch.no_grad():
        for _, block in find_blocks(model):
            for layer in find_linears(block, model).values():
                weight_matrix(layer)[:, 1::8] = 0.0  # zeros the dense model already has
    return model


def test_the_masks_own_count_is_reported_beside_the_counted_zeros(tokenizer, calib_ids):
    result = besa.prune(_model_with_dense_zeros(), tokenizer=tokenizer, method="wanda", pattern="2:4",
                        calib_ids=calib_ids, progress=False)  # fmt: skip
    sparsity = result.report["sparsity"]
    assert sparsity["masked"] == 0.5  # exact: 2 of every 4, whatever the weights
    assert sparsity["pruned_layers"] >= 0.5  # counted zeros include dense zeros the mask kept
    for name, layer in result.report["layers"].items():
        assert layer["masked"] == layer["numel"] // 2, name


def test_the_per_block_panel_labels_blocks_with_whole_numbers(tokenizer, calib_ids):
    import matplotlib.pyplot as plt

    result = besa.prune(make_model("gemma3"), tokenizer=tokenizer, method="magnitude", sparsity=0.5,
                        progress=False)  # fmt: skip
    fig = allocation_figure(result.report)
    per_block = fig.axes[-1] if fig.axes[-1].get_title() == "per block" else fig.axes[1]
    ticks = [t for t in per_block.get_yticks() if 0 <= t <= 2]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_heatmap_columns_name_an_experts_projection_and_number():
    from besa.output.plotting import short_layer_name

    assert short_layer_name("self_attn.q_proj") == "q_proj"
    assert short_layer_name("mlp.experts.down_proj.3") == "down_proj.3"
    assert short_layer_name("c_fc") == "c_fc"
