import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from besa.errors import BesaError
from besa.model.blocks import (
    classify_block_weights,
    find_blocks,
    find_linears,
    num_experts,
    set_weight_matrix,
    unknown_weights,
    weight_matrix,
)
from conftest import ARCHS, make_model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_find_blocks_matches_config_depth(arch):
    model = make_model(arch)
    blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    names = [n for n, _ in blocks]
    assert names == sorted(names, key=lambda n: int(n.rsplit(".", 1)[1]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_find_linears_excludes_head_and_covers_attention_and_mlp(arch):
    model = make_model(arch)
    head = model.get_output_embeddings()
    _, block = find_blocks(model)[0]
    linears = find_linears(block, model)
    assert head not in linears.values()
    assert len(linears) >= 4  # attention in/out and two MLP projections at least
    total = sum(weight_matrix(m).numel() for m in linears.values())
    block_matrix_params = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    assert total == block_matrix_params  # every 2-D weight of the block is a prunable linear


def test_find_blocks_error_names_the_model():
    with pytest.raises(BesaError, match="Linear"):
        find_blocks(torch.nn.Linear(2, 2))


def test_conv1d_weight_matrix_is_out_by_in_view():
    layer = Conv1D(nf=6, nx=4)  # in 4, out 6; stored (4, 6)
    w = weight_matrix(layer)
    assert w.shape == (6, 4)
    new = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    set_weight_matrix(layer, new)
    assert torch.equal(layer.weight.data, new.t())
    x = torch.randn(3, 4)
    assert torch.allclose(layer(x), x @ new.t() + layer.bias, atol=1e-6)


def _moe(kind: str) -> torch.nn.Module:
    """A tiny Mixture-of-Experts model: Mixtral (fused experts, a linear router) or Qwen2-MoE (fused experts, a
    linear router, a shared expert and its one-output gate)."""
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4))
    config = transformers.Qwen2MoeConfig(
        **common, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64
    )
    return transformers.Qwen2MoeForCausalLM(config)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_weight_of_a_dense_model_is_pruned_by_rule(arch):
    weights = classify_block_weights(make_model(arch))
    assert weights and all(w.kind == "pruned" and w.rule == "linear" for w in weights)
    assert unknown_weights(weights) == []


@pytest.mark.parametrize(
    "kind,kept",
    [
        ("mixtral", {"mlp.gate.weight": "router"}),
        ("qwen2moe", {"mlp.gate.weight": "router", "mlp.shared_expert_gate.weight": "router"}),
    ],
)
def test_moe_routers_are_kept_and_fused_experts_are_pruned_as_experts(kind, kept):
    model = _moe(kind)
    weights = classify_block_weights(model)
    by_name = {w.name.split(".", 3)[3]: w for w in weights if w.name.startswith("model.layers.0.")}
    assert {n: w.rule for n, w in by_name.items() if w.kind == "kept"} == kept
    assert not [n for n, w in by_name.items() if w.kind == "unknown"]
    experts = {n: w.rule for n, w in by_name.items() if w.rule == "experts"}
    assert experts == {"mlp.experts.gate_up_proj": "experts", "mlp.experts.down_proj": "experts"}
    assert all(by_name[n].kind == "pruned" for n in experts)
    assert by_name["mlp.experts.gate_up_proj"].shape == tuple(
        model.model.layers[0].mlp.experts.gate_up_proj.shape
    )
    _, block = find_blocks(model)[0]
    linears = find_linears(block, model)
    assert not set(kept) & {f"{n}.weight" for n in linears} and "self_attn.q_proj" in linears
    # --prune-routers hands over the routers built as linears (Qwen2-MoE's shared-expert gate); a router that is a
    # bare parameter (both models' mlp.gate here) stays kept: no method prunes a bare parameter
    as_linears = {f"{n}.weight" for n in find_linears(block, model, routers=True)} & set(kept)
    assert as_linears == ({"mlp.shared_expert_gate.weight"} if kind == "qwen2moe" else set())
    flagged = {w.name.split(".", 3)[3]: w.kind for w in classify_block_weights(model, routers=True)}
    assert all(flagged[n] == ("pruned" if n in as_linears else "kept") for n in kept)
    assert num_experts(model.config) == 4 and num_experts(make_model("llama").config) is None


def test_a_projection_with_as_many_outputs_as_experts_outside_the_moe_block_is_no_router():
    # one key/value head of width 8 beside 8 experts: k_proj and v_proj are [8, 64] like the router
    config = transformers.MixtralConfig(
        vocab_size=260, hidden_size=64, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config)
    weights = {w.name: (w.kind, w.rule) for w in classify_block_weights(model)}
    assert weights["model.layers.0.self_attn.k_proj.weight"] == ("pruned", "linear")
    assert weights["model.layers.0.self_attn.v_proj.weight"] == ("pruned", "linear")
    assert weights["model.layers.0.mlp.gate.weight"] == ("kept", "router")
    assert {"self_attn.k_proj", "self_attn.v_proj"} <= set(find_linears(find_blocks(model)[0][1], model))


def test_a_router_is_found_by_the_count_its_moe_block_states_when_the_config_states_none():
    from conftest import make_einsum_moe

    model = make_einsum_moe()
    weights = {w.name: (w.kind, w.rule) for w in classify_block_weights(model)}
    assert weights["model.layers.0.mlp.router.weight"] == ("kept", "router")
    assert weights["model.layers.0.self_attn.q_proj.weight"] == ("pruned", "linear")
