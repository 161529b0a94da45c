"""A table of architectures: tiny random models of dense and Mixture-of-Experts families, built from their config
classes in the installed transformers, each pruned in-process by wanda, sparsegpt, 2:4 sparsegpt and besa; every
weight a method prunes reaches its target, nothing is destroyed, the forward stays finite and the save reloads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

import besa
from besa.model.blocks import classify_block_weights, find_blocks, find_linears, weight_matrix
from besa.model.decorated_experts import expert_matrices
from besa.model.experts import block_expert_matrices
from conftest import make_tokenizer

# fmt: off
BASE = dict(
    vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# fmt: on
GQA = dict(BASE, num_key_value_heads=2)
MOE = dict(GQA, num_experts_per_tok=2)

# fmt: off
DENSE: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(GQA, intermediate_size=128)),
    "mistral": ("MistralConfig", dict(GQA, intermediate_size=128, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(GQA, intermediate_size=128)),
    "qwen3": ("Qwen3Config", dict(GQA, intermediate_size=128, head_dim=16)),
    "gemma": ("GemmaConfig", dict(GQA, intermediate_size=128, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(GQA, intermediate_size=128, head_dim=16, sliding_window=8)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(GQA, intermediate_size=128, head_dim=16, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi": ("PhiConfig", dict(BASE, intermediate_size=128)),
    "phi3": ("Phi3Config", dict(GQA, intermediate_size=128)),
    "gpt2": ("GPT2Config", dict(BASE)),  # Conv1D: weights stored (in, out)
    "gpt_neox": ("GPTNeoXConfig", dict(BASE, intermediate_size=128)),
    "gptj": ("GPTJConfig", dict(BASE, rotary_dim=8)),
    "opt": ("OPTConfig", dict(BASE, ffn_dim=128, word_embed_proj_dim=64)),
    "falcon": ("FalconConfig", dict(BASE)),
    "starcoder2": ("Starcoder2Config", dict(GQA, intermediate_size=128)),
    "olmo": ("OlmoConfig", dict(GQA, intermediate_size=128)),
    "olmo2": ("Olmo2Config", dict(GQA, intermediate_size=128)),
    "cohere": ("CohereConfig", dict(GQA, intermediate_size=128)),
    "granite": ("GraniteConfig", dict(GQA, intermediate_size=128)),
    "stablelm": ("StableLmConfig", dict(GQA, intermediate_size=128)),
    "smollm3": ("SmolLM3Config", dict(GQA, intermediate_size=128)),
    "glm4": ("Glm4Config", dict(GQA, intermediate_size=128, head_dim=16)),
    "ernie4_5": ("Ernie4_5Config", dict(GQA, intermediate_size=128, head_dim=16)),
    "bloom": ("BloomConfig", dict(BASE)),
}
MOES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             num_experts=4),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, head_dim=16),
    ),
    "mixtral": ("MixtralConfig", dict(MOE, intermediate_size=32, num_local_experts=4)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(MOE, intermediate_size=32, num_local_experts=4, head_dim=16, sliding_window=16,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "llama4_text": (
        "Llama4TextConfig",
        dict(MOE, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
             interleave_moe_layer_step=1, head_dim=16),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(MOE, intermediate_size=32, num_local_experts=4)),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(MOE, intermediate_size=32, num_local_experts=4, shared_intermediate_size=32),
    ),
    "dbrx": (
        "DbrxConfig",
        dict(vocab_size=260, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
             attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    ),
    "jamba": (
        "JambaConfig",
        dict(MOE, intermediate_size=32, num_experts=4, expert_layer_period=1, expert_layer_offset=0,
             attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2),
    ),
    "olmoe": ("OlmoeConfig", dict(MOE, intermediate_size=32, num_experts=4)),
    "phimoe": ("PhimoeConfig", dict(MOE, intermediate_size=32, num_local_experts=4)),
    "jetmoe": (
        "JetMoeConfig",
        dict(MOE, intermediate_size=32, num_local_experts=4, kv_channels=16, num_key_value_heads=4),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
             moe_num_shared_experts=1, moe_layer_start_index=0),
    ),
    "dots1": (
        "Dots1Config",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    ),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(MOE, intermediate_size=32, num_experts=4, moe_topk=2, head_dim=16)),
    "flex_olmo": ("FlexOlmoConfig", dict(MOE, intermediate_size=32, num_experts=4)),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             num_experts=4, head_dim=16, layer_types=["linear_attention", "full_attention"],
             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    ),
    "minimax": (
        "MiniMaxConfig",
        dict(MOE, intermediate_size=32, num_local_experts=4, head_dim=16,
             layer_types=["linear_attention", "full_attention"]),
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_dense_layers=1,
             layer_types=["conv", "full_attention"]),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16),
    ),
    "qwen3_5_moe_text": (  # 8 value heads: in_proj_a/in_proj_b, one output per head, are not taken for routers
        "Qwen3_5MoeTextConfig",
        dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, head_dim=16,
             layer_types=["linear_attention", "full_attention"], linear_num_value_heads=8,
             linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    ),
    "minimax_m2": ("MiniMaxM2Config", dict(MOE, intermediate_size=32, num_local_experts=4, head_dim=16)),
    "exaone_moe": (
        "ExaoneMoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, sliding_window=16),
    ),
    "afmoe": (
        "AfmoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_dense_layers=1,
             num_shared_experts=1, head_dim=16, sliding_window=16),
    ),
    "solar_open": (
        "SolarOpenConfig",
        dict(MOE, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
             head_dim=16),
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig", dict(MOE, intermediate_size=32, num_experts=4, head_dim=16, sliding_window=16)
    ),
    "hy_v3": (
        "HYV3Config",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_shared_experts=1,
             head_dim=16),
    ),
    "param2moe": (
        "Param2MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             n_group=1, topk_group=1, first_k_dense_replace=1, head_dim=16),
    ),
    "minicpm5_moe": (
        "MiniCPM5MoeConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             n_group=1, topk_group=1, head_dim=16),
    ),
    "granitemoehybrid": (  # Mamba-2 and attention
        "GraniteMoeHybridConfig",
        dict(MOE, intermediate_size=32, num_local_experts=4, shared_intermediate_size=32,
             layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2),
    ),
    "nemotron_h": (  # one block each of Mamba-2, attention and MoE
        "NemotronHConfig",
        dict(GQA, layers_block_type=["mamba", "attention", "moe"], head_dim=16, intermediate_size=32,
             moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_routed_experts=4,
             num_experts_per_tok=2, n_group=1, topk_group=1, mamba_num_heads=4,
             mamba_head_dim=32, n_groups=1, ssm_state_size=8),
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        dict(MOE, intermediate_size=64, moe_intermediate_size=32, num_local_experts=4, n_shared_experts=1,
             n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, layer_types=["linear_attention", "full_attention"],
             linear_head_dim=16, linear_num_heads=8),
    ),
}
# fmt: on

# More of the installed transformers' Mixture-of-Experts (and hybrid) models, each from the shared tiny defaults below,
# filtered to the fields its config takes, and a few settings of its own
TINY = dict(
    vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, shared_intermediate_size=32,
    max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2, moe_topk=2,
    moe_k=2, top_k_experts=2, num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=16, first_k_dense_replace=1,
)  # fmt: skip
INDEXER = dict(index_topk=8, index_head_dim=16, index_n_heads=2)
LINEAR = dict(
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16
)
MORE = {  # model type -> its own settings
    "aria_text": dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
    "axk1": dict(mlp_layer_types=["dense", "sparse"]),
    "axk2": dict(mlp_layer_types=["dense", "sparse"], num_key_value_heads=4, **INDEXER),
    "bailing_hybrid": {},
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8),
    "beam": dict(mlp_layer_types=["dense", "sparse"]),
    "deepseek_v32": dict(num_key_value_heads=4, **INDEXER),
    "dots3_note_text": dict(num_key_value_heads=4, **INDEXER),
    "ergo": dict(first_dense_intermediate_size=64, num_dense_blocks=1),
    "flint": dict(mlp_only_layers=[0]),
    "gemma4_text": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, hidden_size_per_layer_input=16,
                        vocab_size_per_layer_input=260, layer_types=["sliding_attention", "full_attention"]),
    "granitemoe_swa": {},
    "kolibri1": {},
    "laguna": {},
    "lara_mini": dict(LINEAR),
    "mellum": {},
    "mimo_v2_flash": {},
    "minimax_m3_vl_text": {},
    "qwen4_exp_text": dict(LINEAR),
    "sarvam_mla": {},
    "sarvam_moe": {},
}  # fmt: skip


def _tiny(model_type: str, **own: Any) -> tuple[str, dict[str, Any]]:
    """(config class name, keywords): ``TINY`` limited to what the config class takes, then ``own``."""
    import inspect

    cls = transformers.CONFIG_MAPPING[model_type]
    fields = getattr(cls, "__dataclass_fields__", None) or inspect.signature(cls.__init__).parameters
    return cls.__name__, {**{k: v for k, v in TINY.items() if k in fields}, **own}


MOES.update({name: _tiny(name, **own) for name, own in MORE.items() if name in transformers.CONFIG_MAPPING})
ARCHS = {**DENSE, **MOES}


def make_arch(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny model of ``arch`` from its config class, deterministic random weights, in eval mode."""
    cls, kwargs = ARCHS[arch]
    config = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # a matrix the init leaves all zeros (AFMoE's router) gets small random values, as a trained one has
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.count_nonzero():
                p.normal_(0.0, 0.02)
    model.config.use_cache = False
    return model.eval()


CASES = {
    "wanda": dict(method="wanda", sparsity=0.5),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "besa": dict(method="besa", sparsity=0.5, method_options={"optimizer": "adamw"}),
}


def _ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


def _pruned_matrices(model: torch.nn.Module) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """Block -> every matrix a method prunes in it: each linear's (out, in) weight and each expert's matrix of every
    fused experts module, by a name of its own -> (the parameter that holds it, the matrix)."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for block_name, block in find_blocks(model):
        mine = found.setdefault(block_name, {})
        for name, layer in find_linears(block, model).items():
            mine[f"{block_name}.{name}"] = (f"{block_name}.{name}.weight", weight_matrix(layer))
        for key, w in block_expert_matrices(block).items():  # <param>.<e> or <param>_experts.<e>
            param = key.rsplit(".", 1)[0].removesuffix("_experts")
            mine[f"{block_name}.{key}"] = (f"{block_name}.{param}", w)
    return found


def _is_2_4(w: torch.Tensor) -> bool:
    return bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_is_pruned_to_its_target_and_reloads(arch, case, tmp_path):
    settings = CASES[case]
    model = make_arch(arch)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = besa.prune(
        model, tokenizer=make_tokenizer(), calib_ids=_ids(), progress=False, checkpoint=False,
        expert_min_tokens=0, out=tmp_path / "out", **settings,
    )  # fmt: skip
    matrices = _pruned_matrices(model)
    checked = {param for found in matrices.values() for param, _ in found.values()}
    assert checked == {w.name for w in classify_block_weights(model) if w.kind != "kept"}
    # left dense by the stated rule only: a linear whose forward never runs (Jamba's dt_proj, used as a matrix)
    left = result.report["weights"]["left_dense"]
    assert set(left.values()) <= {"its forward never ran on the calibration windows"}, left
    for found in matrices.values():
        for name in [n for n in left if n in found]:
            assert torch.equal(found.pop(name)[1], dense[f"{name}.weight"]), name  # exactly as it was
    if (
        arch == "jamba"
    ):  # its dt_proj weight is used as a matrix, its forward never called: never zeroed whole
        assert {n for n in left if n.endswith("mamba.dt_proj")} and all(
            n.endswith("mamba.dt_proj") for n in left
        )
    for block, found in matrices.items():
        for name, (_, w) in found.items():
            if "pattern" in settings:
                assert _is_2_4(w), name
            elif case == "besa":  # every row's rate is learned within the target +- rate_window (0.2)
                assert 0.3 - 1e-9 <= float((w == 0).double().mean()) <= 0.7 + 1e-9, name
            else:
                assert int((w == 0).sum()) * 2 == w.numel(), name
        if case == "besa":  # a learned allocation: the block holds the target, not each matrix
            zeros = sum(int((w == 0).sum()) for _, w in found.values())
            assert zeros / sum(w.numel() for _, w in found.values()) == pytest.approx(0.5, abs=1e-3), block
    after = dict(model.named_parameters())
    for name, before in dense.items():  # nothing that was non-zero comes out all zeros
        assert not (before.count_nonzero() and not after[name].count_nonzero()), name
    with torch.no_grad():
        assert torch.isfinite(model(_ids(2, 16)).logits).all()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    got = dict(reloaded.named_parameters())
    assert set(got) == set(after)
    assert [n for n, p in after.items() if not torch.equal(got[n], p)] == []


def test_the_refit_takes_an_expert_that_one_batch_routes_no_token():
    # 8 experts, top-1, 8-token windows, one window per refit step: every expert gets tokens, not in every window
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.MixtralConfig(
            **dict(MOE, num_hidden_layers=1, intermediate_size=32, num_local_experts=8, num_experts_per_tok=1)
        )
    ).eval()
    model.config.use_cache = False
    result = besa.prune(
        model, tokenizer=make_tokenizer(), method="sparsegpt", sparsity=0.5, calib_ids=_ids(8, 8), progress=False,
        checkpoint=False, expert_min_tokens=1, refit_epochs=1, refit_batch=1,
    )  # fmt: skip
    weights = result.report["weights"]
    assert not weights["fallback"] and not weights["left_dense"] and result.report["refit"]
    for key, w in expert_matrices(model.model.layers[0].mlp.experts).items():
        assert int((w == 0).sum()) * 2 == w.numel(), key


REFUSED = {  # model type -> (its own settings, what the one line says)
    "zaya": (dict(num_experts_per_tok=1), "hand the next block something besides hidden states"),
    "glm_moe_dsa": (
        dict(num_key_value_heads=4, **INDEXER),
        "hand the next block something besides hidden states",
    ),
    "kolibri1_1": (dict(index_num_heads=2), "hand the next block something besides hidden states"),
    "gemma3n_text": (
        dict(
            num_kv_shared_layers=0,
            vocab_size_per_layer_input=260,
            hidden_size_per_layer_input=16,
            layer_types=["sliding_attention", "full_attention"],
            activation_sparsity_pattern=[0.0, 0.0],
        ),
        "take hidden states of shape [4, 2, 32, 64] for a batch of 2, the batch not first",
    ),  # fmt: skip
    "hrm_text": (
        {},
        "holds two stacks of HrmTextDecoderLayer blocks (model.L_module.layers and model.H_module.layers)",
    ),
}


@pytest.mark.parametrize("arch", [a for a in REFUSED if a in transformers.CONFIG_MAPPING])
def test_blocks_besa_cannot_run_one_at_a_time_are_refused_in_one_line_before_any_work(arch, tmp_path):
    own, said = REFUSED[arch]
    cls, kwargs = _tiny(arch, **own)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()
    model.config.use_cache = False
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(besa.BesaError) as err:
        besa.prune(model, tokenizer=make_tokenizer(), calib_ids=_ids(), method="wanda", sparsity=0.5,
                   progress=False, checkpoint=False, out=tmp_path / "out")  # fmt: skip
    assert said in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
