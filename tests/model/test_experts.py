"""Mixture-of-Experts experts are layers: every expert of every fused experts module is pruned like a linear of its
own, on the tokens its router sends it (``besa.model.experts``)."""

from __future__ import annotations

import pytest
import torch
import transformers

import besa
from besa.model.blocks import classify_block_weights, find_blocks, find_linears
from besa.model.decorated_experts import besa_experts, expert_matrices, fused_experts, uses_besa_experts
from besa.model.experts import ExpertLinear, block_expert_matrices, learn_expert_layouts, unfused_experts
from conftest import make_tokenizer

COMMON = dict(
    vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128,
)  # fmt: skip
MOES = {
    # fused [E, 2I, H] / [E, H, I], a bare-parameter router
    "mixtral": lambda **kw: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            **COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **kw
        )
    ),
    # a shared expert (plain linears) and its one-output gate beside the routed experts
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            **kw,
        )
    ),  # fmt: skip
    # transposed [E, H, 2I], interleaved gate and up, biases, a clamped gate of its own
    "gpt_oss": lambda **kw: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            **COMMON,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
            **kw,
        )
    ),  # fmt: skip
}


def make_moe(arch: str, seed: int = 0, **config) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = MOES[arch](**config)
    model.config.use_cache = False
    return model.eval()


def _ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", list(MOES))
def test_the_besa_loop_and_the_unfused_experts_compute_the_eager_forward_bit_for_bit(arch):
    model = make_moe(arch)
    ids = _ids(2, 16)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
        with uses_besa_experts(model):
            looped = model(ids).logits
            _, block = find_blocks(model)[0]
            before = {k: v.clone() for k, v in block.state_dict().items()}
            with unfused_experts(block) as names:
                linears = find_linears(block, model)
                assert set(names) <= set(linears) and all(isinstance(linears[n], ExpertLinear) for n in names)
                assert len(names) == 2 * 4  # gate_up (or up) and down of 4 experts
                unfused = model(ids).logits
            after = block.state_dict()
    assert torch.equal(looped, eager) and torch.equal(unfused, eager)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(after[k].stride() == before[k].stride() for k in before)


def test_the_besa_loop_sends_each_expert_exactly_its_routed_tokens():
    model = make_moe("mixtral")
    experts = fused_experts(find_blocks(model)[0][1])[0][1]
    hidden = torch.randn(10, 64)
    index = torch.tensor([[0, 1]] * 5 + [[2, 0]] * 5)
    weights = torch.full((10, 2), 0.5)
    seen: dict[str, int] = {}
    with torch.no_grad(), unfused_experts(experts):
        for name, layer in experts.named_modules():
            if isinstance(layer, ExpertLinear):
                layer.register_forward_pre_hook(
                    lambda _m, a, name=name: seen.__setitem__(name, a[0].shape[0])
                )
        besa_experts(experts, hidden, index, weights)
    assert seen == {
        "gate_up_proj.0": 10,
        "down_proj.0": 10,
        "gate_up_proj.1": 5,
        "down_proj.1": 5,
        "gate_up_proj.2": 5,
        "down_proj.2": 5,
    }  # fmt: skip  (expert 3 gets no token: never called)


CASES = [
    ("wanda", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
    ("sparsegpt", {"pattern": "2:4"}), ("besa", {"sparsity": 0.5, "method_options": {"optimizer": "adamw"}}),
]  # fmt: skip


def _is_2_4(w: torch.Tensor) -> bool:
    return bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


@pytest.mark.parametrize("arch", list(MOES))
@pytest.mark.parametrize("method,settings", CASES, ids=lambda c: str(c))
def test_every_expert_reaches_the_target_routers_stay_dense_and_the_save_reloads(
    arch, method, settings, tokenizer, tmp_path
):
    model = make_moe(arch)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = besa.prune(
        model, tokenizer=tokenizer, method=method, calib_ids=_ids(), expert_min_tokens=0, progress=False,
        checkpoint=False, out=tmp_path / "out", **settings,
    )  # fmt: skip
    report = result.report
    for _, block in find_blocks(model):
        (_, experts), *_ = fused_experts(block)
        for key, w in expert_matrices(experts).items():
            if "pattern" in settings:
                assert _is_2_4(w), key
            elif method == "besa":  # a learned allocation: the block holds the target, not each matrix
                assert 0.3 < float((w == 0).float().mean()) < 0.7, key
            else:
                assert float((w == 0).float().mean()) == 0.5, key
    tokens = report["weights"]["expert_tokens"]
    first_up = [n for n in tokens if n.startswith("model.layers.0.") and ".down_proj." not in n]
    assert sum(tokens[n] for n in first_up) == 4 * 32 * 2  # every window's tokens, top-2
    assert not report["weights"]["fallback"]
    for name, before in dense.items():  # routers dense; nothing non-zero comes out all zeros
        after = dict(model.named_parameters())[name]
        assert not (before.count_nonzero() and not after.count_nonzero()), name
        if name.endswith("mlp.router.weight") or name.endswith("mlp.gate.weight"):
            assert torch.equal(after, before), name
    routers = [d["name"] for d in report["weights"]["dense"] if d["rule"] == "router"]
    assert len(routers) >= 2
    layers = report["layers"]
    assert sum(1 for n in layers if ".experts." in n) == 2 * 2 * 4  # blocks x projections x experts
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    got = dict(reloaded.named_parameters())
    assert all(torch.equal(got[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(reloaded(_ids(1, 16)).logits).all()


@pytest.mark.parametrize(
    "least", [16, 0]
)  # 0: no threshold, but an expert with no token at all still falls back
def test_experts_the_router_sends_nothing_fall_back_to_magnitude_and_the_report_says_so(tokenizer, least):
    model = make_moe("mixtral")
    for _, block in find_blocks(model):  # every token to expert 0 (twice): experts 1-3 see none
        block.mlp.gate.register_forward_hook(
            lambda _m, _a, out: (out[0], torch.full_like(out[1], 0.5), torch.zeros_like(out[2]))
        )
    dense = {
        f"{b}.mlp.experts.{k}": w.clone()
        for b, block in find_blocks(model)
        for k, w in expert_matrices(block.mlp.experts).items()
    }
    result = besa.prune(
        model, tokenizer=tokenizer, method="sparsegpt", sparsity=0.5, calib_ids=_ids(), progress=False,
        checkpoint=False, expert_min_tokens=least,
    )  # fmt: skip
    weights = result.report["weights"]
    for block in ("model.layers.0", "model.layers.1"):
        for proj in ("gate_up_proj", "down_proj"):
            assert weights["expert_tokens"][f"{block}.mlp.experts.{proj}.0"] == 4 * 32 * 2
            assert f"{block}.mlp.experts.{proj}.0" not in weights["fallback"]
            for e in (1, 2, 3):
                name = f"{block}.mlp.experts.{proj}.{e}"
                assert weights["expert_tokens"][name] == 0
                assert weights["fallback"][name].startswith("magnitude: 0 routed calibration tokens")
                w = expert_matrices(model.get_submodule(f"{block}.mlp.experts"))[f"{proj}.{e}"]
                assert (
                    float((w == 0).float().mean()) == 0.5 and result.report["layers"][name]["target"] == 0.5
                )
                magnitude = dense[name].abs()  # the larger half of every row survives, unchanged
                kept = w != 0
                assert torch.equal(w[kept], dense[name][kept])
                low = torch.where(kept, magnitude, torch.inf).min(dim=1).values
                high = torch.where(kept, -torch.inf, magnitude).max(dim=1).values
                assert (low >= high).all()


@pytest.mark.parametrize("stats", ["routed", "pooled"])
def test_expert_statistics_come_from_the_routed_tokens_or_from_all_of_them(stats, tokenizer, monkeypatch):
    from besa.methods.wanda import WandaPruner

    seen: list[int] = []  # the tokens behind each expert linear's statistics, in pruning order
    real = WandaPruner.prune_layer

    def spy(self, layer, layer_stats, rate):
        if isinstance(layer, ExpertLinear):
            seen.append(layer_stats.tokens)
        return real(self, layer, layer_stats, rate)

    monkeypatch.setattr(WandaPruner, "prune_layer", spy)
    model = make_moe("mixtral")
    result = besa.prune(
        model, tokenizer=tokenizer, method="wanda", sparsity=0.5, calib_ids=_ids(), expert_stats=stats,
        progress=False, checkpoint=False,
    )  # fmt: skip
    routed = result.report["weights"]["expert_tokens"]
    assert len(seen) == 2 * 2 * 4 and sum(routed.values()) == 2 * 2 * (4 * 32 * 2)
    if stats == "pooled":  # every expert saw every token of the block
        assert set(seen) == {4 * 32}
    else:  # each saw its own share: the counts the report gives
        assert sorted(seen) == sorted(routed.values()) and len(set(seen)) > 1


def test_a_stopped_moe_run_resumes_and_redoes_to_bit_identical_experts(tokenizer, tmp_path, monkeypatch):
    import besa.methods.base

    original = besa.methods.base.Pruner.run_block

    def stop_at_1(self, work):
        if work.index == 1:
            raise KeyboardInterrupt
        return original(self, work)

    path = tmp_path / "moe"
    make_moe("qwen2_moe").save_pretrained(path)
    tokenizer.save_pretrained(path)
    settings = dict(method="sparsegpt", sparsity=0.5, calib_ids=_ids(), progress=False, expert_min_tokens=0)
    with monkeypatch.context() as m:
        m.setattr(besa.methods.base.Pruner, "run_block", stop_at_1)
        with pytest.raises(KeyboardInterrupt):
            besa.prune(str(path), out=tmp_path / "out", **settings)
    resumed = besa.prune(str(path), out=tmp_path / "out", **settings)
    redone = besa.prune(str(path), run_dir=tmp_path / "kept", keep_run_dir=True, **settings)
    again = besa.prune(str(path), run_dir=tmp_path / "kept", redo_from=1, **settings)  # block 0 replayed
    reference = besa.prune(str(path), out=tmp_path / "reference", **settings)
    assert resumed.report["run"]["resumed_blocks"] == 1
    want = reference.model.state_dict()
    for model in (resumed.model, redone.model, again.model):
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.report["weights"]["expert_tokens"] == reference.report["weights"]["expert_tokens"]


def test_experts_are_saved_quantized_and_sparse_and_compressed_tensors_refuses_them_up_front(
    tokenizer, tmp_path
):
    from safetensors.torch import load_file

    from besa.formats.quant import QuantSpec, dequantize_codes
    from besa.model.loading import load_model

    settings = dict(tokenizer=tokenizer, method="wanda", sparsity=0.5, calib_ids=_ids(), progress=False)
    model = make_moe("mixtral")
    besa.prune(model, wbits=4, group_size=32, save_quantized=True, out=tmp_path / "q", **settings)
    codes = load_file(str(tmp_path / "q" / "quantized.safetensors"))
    experts = model.get_submodule("model.layers.1.mlp.experts")
    for key, w in expert_matrices(experts).items():  # every expert's codes give back its weights exactly
        name = f"model.layers.1.mlp.experts.{key}"
        back = dequantize_codes(codes[f"{name}.codes"], codes[f"{name}.scales"], codes[f"{name}.zeros"].float(),
                                QuantSpec(4, 32))  # fmt: skip
        assert torch.equal(back, w.float())
    sparse = make_moe("mixtral")
    besa.prune(sparse, save_format="sparse", out=tmp_path / "sparse", **settings)
    reloaded, _, _ = load_model(str(tmp_path / "sparse"))
    got, want = reloaded.state_dict(), sparse.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(besa.BesaError, match="cannot pack Mixture-of-Experts experts .*zero points"):
        besa.prune(make_moe("mixtral"), wbits=4, group_size=32, save_format="compressed-tensors",
                   out=tmp_path / "ct", **settings)  # fmt: skip
    assert not (tmp_path / "ct").exists()


def test_a_data_free_method_prunes_every_expert_by_its_own_rule_without_counting_tokens(tokenizer):
    model = make_moe("mixtral")
    result = besa.prune(model, tokenizer=tokenizer, method="magnitude", sparsity=0.5, progress=False)
    weights = result.report["weights"]
    assert weights["expert_tokens"] == {} and weights["fallback"] == {}
    for _, block in find_blocks(model):
        for key, w in expert_matrices(block.mlp.experts).items():
            assert float((w == 0).float().mean()) == 0.5, key


# --- experts no class records: Llama 4's bmm over every expert, DBRX's 2-D stacks, JetMoE's F.linear per expert ---

UNDECORATED = {  # arch -> (expert parameters of block 0, each expert's (out, in) matrix shape)
    "llama4_text": (
        {"feed_forward.experts.gate_up_proj": (64, 64), "feed_forward.experts.down_proj": (64, 32)}
    ),
    "dbrx": {"ffn.experts.mlp.w1": (32, 64), "ffn.experts.mlp.v1": (32, 64), "ffn.experts.mlp.w2": (64, 32)},
    "jetmoe": {
        "mlp.input_linear.weight": (64, 64),
        "mlp.output_linear.weight": (64, 32),
        "self_attention.experts.input_linear.weight": (64, 64),
        "self_attention.experts.output_linear.weight": (64, 64),
    },  # fmt: skip
}


def _undecorated(arch: str) -> transformers.PreTrainedModel:
    from test_architectures import make_arch

    model = make_arch(arch)
    learn_expert_layouts(model, find_blocks(model), torch.arange(1, 17).unsqueeze(0))
    return model


@pytest.mark.parametrize("arch", list(UNDECORATED))
def test_a_forward_shows_each_stack_s_layout_and_the_unfused_block_computes_the_same(arch):
    model = _undecorated(arch)
    ids = _ids(2, 16)
    _, block = find_blocks(model)[0]
    matrices = block_expert_matrices(block)
    shapes = {key.rsplit(".", 1)[0].removesuffix("_experts"): tuple(w.shape) for key, w in matrices.items()}
    assert shapes == UNDECORATED[arch]  # (out, in) as the forward multiplies them, square stacks included
    assert {w.rule for w in classify_block_weights(model) if w.name.removeprefix(find_blocks(model)[0][0] + ".")
            in UNDECORATED[arch]} == {"experts"}  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows: dict[str, int] = {}
    with torch.no_grad():
        dense = model(ids).logits
        with unfused_experts(block) as names:
            linears = find_linears(block, model)
            assert set(names) <= set(linears) and all(isinstance(linears[n], ExpertLinear) for n in names)
            for name in names:
                linears[name].register_forward_pre_hook(
                    lambda _m, a, name=name: rows.__setitem__(
                        name, rows.get(name, 0) + a[0].shape[:-1].numel()
                    )
                )
            unfused = model(ids).logits
            for name in names:
                linears[name]._forward_pre_hooks.clear()
            # pruning an unfused expert's linear is what the model computes with, and what goes back to the stack
            first = sorted(names)[0]
            linears[first].weight[:, ::2] = 0
            pruned = model(ids).logits
        after_step = model(ids).logits
    assert torch.equal(unfused, dense)  # the same products, bit for bit
    assert torch.equal(pruned, after_step) and not torch.equal(pruned, dense)
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    owner = first.rsplit(".", 1)[0].removesuffix("_experts")
    assert list(model.state_dict()) == list(before) and changed == [f"{find_blocks(model)[0][0]}.{owner}"]
    # every expert's linears see only the tokens routed to it: k routed slots per token in all
    top_k = model.config.num_experts_per_tok if arch != "dbrx" else model.config.ffn_config.moe_top_k
    for param in UNDECORATED[arch]:
        if param.startswith(("feed_forward.", "ffn.", "mlp.")):
            seen = sum(n for name, n in rows.items() if name.startswith(param + "_experts."))
            assert seen == 2 * 16 * top_k, (param, seen)


def test_a_stack_multiplied_in_a_way_besa_cannot_follow_stops_the_run_before_work(tmp_path):
    from test_architectures import make_arch

    model = make_arch("jetmoe")
    experts = model.model.layers[0].mlp.output_linear  # its own forward, now an einsum over every expert
    experts.forward = lambda inputs, expert_size: (
        torch.einsum("ti,eoi->to", inputs, experts.weight) / experts.num_experts
    )
    with pytest.raises(besa.BesaError) as err:
        besa.prune(model, method="wanda", sparsity=0.5, calib_ids=_ids(), progress=False, checkpoint=False,
                   tokenizer=make_tokenizer(), out=tmp_path / "out")  # fmt: skip
    message = str(err.value)
    assert "\n" not in message and "model.layers.0.mlp.output_linear.weight" in message
    assert "einsum" in message and "--leave-unknown-dense" in message
    assert not (tmp_path / "out").exists()


def test_a_stack_used_otherwise_during_a_step_stops_the_step_rather_than_compute_with_stale_weights():
    model = _undecorated("jetmoe")
    _, block = find_blocks(model)[0]
    with unfused_experts(block):
        experts = block.mlp.output_linear
        experts.forward = lambda inputs, expert_size: inputs @ experts.weight.sum(0).t()
        with pytest.raises(besa.BesaError, match="mlp.output_linear.*is used by sum"), torch.no_grad():
            model(_ids(1, 8))
    del experts.forward
    with torch.no_grad():
        assert torch.isfinite(model(_ids(1, 8)).logits).all()  # the hooks are gone with the step


def test_pooled_expert_statistics_are_refused_for_stacks_the_model_multiplies_itself(tmp_path):
    from test_architectures import make_arch

    with pytest.raises(besa.BesaError, match="--expert-stats pooled .*routed"):
        besa.prune(make_arch("dbrx"), method="wanda", sparsity=0.5, calib_ids=_ids(), progress=False,
                   checkpoint=False, expert_stats="pooled", tokenizer=make_tokenizer(), out=tmp_path / "out")  # fmt: skip


def test_a_model_whose_short_forward_fails_leaves_its_stacks_unknown_with_the_reason():
    from test_architectures import make_arch

    model = make_arch("dbrx")

    def broken(*args, **kwargs):
        raise RuntimeError("needs pixel_values")

    model.forward = broken
    learn_expert_layouts(model, find_blocks(model), torch.arange(1, 17).unsqueeze(0))
    unknown = [w for w in classify_block_weights(model) if w.kind == "unknown"]
    assert len(unknown) == 2 * 3  # w1, v1, w2 of both blocks
    assert all(w.why == "a short forward to see how it is multiplied failed (RuntimeError: needs pixel_values)"
               for w in unknown)  # fmt: skip


def test_the_expert_min_tokens_default_is_the_one_the_benchmark_decided():
    import json
    from pathlib import Path

    from besa.settings.config import PruneConfig

    measured = json.loads(
        (
            Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "expert_min_tokens.json"
        ).read_text()
    )
    assert PruneConfig().experts.min_tokens == measured["default"] == 4
