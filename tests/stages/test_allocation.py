"""Allocations: OWL's math, and every allocation with every method and weight update (exact counts)."""

import pytest
import torch

import besa
from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.stages.allocation import outlier_ratio, owl_rates


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([10.0, 1.0, 1.0, 1.0])]
    # mean 1.9: only the 10 is above 3 x 1.9; above 1 x 1.9 as well
    assert outlier_ratio(scores, 3.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 5.3) == 0.0


def test_owl_rates_average_to_the_target_within_lambda_and_spare_outlier_blocks():
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03]
    rates = owl_rates(ratios, 0.7, 0.08)
    assert sum(rates) / len(rates) == pytest.approx(0.7)
    assert max(rates) - min(rates) == pytest.approx(0.16)
    assert all(0.54 - 1e-12 <= r <= 0.86 + 1e-12 for r in rates)  # within target +- 2 lambda
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [rates[i] for i in order] == sorted(rates, reverse=True)  # more outliers, fewer zeros
    assert owl_rates([0.02, 0.02], 0.5, 0.1) == [0.5, 0.5]


def _deep_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # give the blocks different outlier structure, so OWL's rates differ
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, : 4 * i + 1] *= 8.0
    model.config.use_cache = False
    return model.eval()


FAST = {"optimizer": "adamw", "lr": 0.05}
COMBINATIONS = [
    ("magnitude", {}),  # selection magnitude, no weight update
    ("wanda", {}),  # selection Wanda, no weight update
    ("sparsegpt", {}),  # OBS saliency + OBS update
    *[
        ("besa", {**FAST, "metric": metric, "weight_update": update})  # learned rows x selection x update
        for metric in ("wanda", "magnitude", "sparsegpt")
        for update in ("none", "obs")
    ],
    ("besa", {**FAST, "granularity": "layer"}),
]


@pytest.mark.parametrize("allocation", ["uniform", "owl"])
@pytest.mark.parametrize(("method", "options"), COMBINATIONS)
@pytest.mark.parametrize("wbits", [16, 4])
def test_every_allocation_combines_with_every_selection_and_weight_update(
    allocation, method, options, wbits, tokenizer, calib_ids
):
    result = besa.prune(
        _deep_llama(), tokenizer=tokenizer, method=method, sparsity=0.6, calib_ids=calib_ids, progress=False,
        allocation=allocation, owl_m=2.0, owl_lambda=0.1, method_options=options, wbits=wbits, group_size=32,
    )  # fmt: skip
    report = result.report["allocation"]
    assert report["name"] == allocation
    rates = report["block_rates"] or {}
    if allocation == "owl":
        assert len(rates) == 4 and len(set(rates.values())) > 1
        assert sum(rates.values()) / 4 == pytest.approx(0.6)
        assert max(rates.values()) - min(rates.values()) == pytest.approx(0.2)
    for block_name, block in find_blocks(result.model):
        rate = rates.get(block_name, 0.6)
        zeros = total = 0
        for name, layer in find_linears(block, result.model).items():
            w = weight_matrix(layer)
            target = round(result.report["layers"][f"{block_name}.{name}"]["target"] * w.numel())
            if method != "besa":  # layerwise methods: every linear holds exactly its block's share
                assert target == round(rate * w.numel())
            pruned = int((w == 0).sum())
            slack = (
                w.numel() // 20 if wbits < 16 else 0
            )  # rounding to 4 bits sends a few small survivors to 0
            assert target <= pruned <= target + slack, name
            zeros, total = zeros + target, total + w.numel()
        assert zeros == pytest.approx(rate * total, abs=len(find_linears(block, result.model)))


def test_owl_refuses_an_nm_pattern_and_an_impossible_lambda():
    with pytest.raises(BesaError, match="N:M"):
        besa.PruneConfig.from_flat(pattern="2:4", allocation="owl")
    with pytest.raises(BesaError, match="--owl-lambda"):
        besa.PruneConfig.from_flat(sparsity=0.9, allocation="owl", owl_lambda=0.06)
    with pytest.raises(BesaError, match="unknown --allocation"):
        besa.PruneConfig.from_flat(allocation="learned")


@pytest.mark.parametrize(("method", "options"), [("sparsegpt", {}), ("besa", FAST)])
def test_owl_budget_is_exact_over_the_whole_model(method, options, tokenizer, calib_ids):
    # the blocks' shares differ, their total is the target's: every layer's count rounds once, nothing else drifts
    result = besa.prune(
        _deep_llama(), tokenizer=tokenizer, method=method, sparsity=0.6, calib_ids=calib_ids, progress=False,
        allocation="owl", owl_m=2.0, owl_lambda=0.1, method_options=options,
    )  # fmt: skip
    zeros = total = layers = 0
    for _, block in find_blocks(result.model):
        for layer in find_linears(block, result.model).values():
            w = weight_matrix(layer)
            zeros, total, layers = zeros + int((w == 0).sum()), total + w.numel(), layers + 1
    assert abs(zeros - 0.6 * total) <= layers / 2
    shares = result.report["allocation"]["block_rates"]
    assert len(set(shares.values())) > 1
