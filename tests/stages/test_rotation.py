import pytest
import torch

import besa
from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears
from besa.stages.rotation import (
    fold_rotation,
    is_rms_norm,
    norm_scale,
    normalised_covariance,
    pca_basis,
    trace_stream,
    unit_norm,
)
from conftest import make_model, make_tokenizer

IDS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def _with_random_norms(arch):
    """A tiny model whose norms have non-trivial scales (a fresh model's are all 1 or 0)."""
    model = make_model(arch)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if is_rms_norm(module):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
    return model


def _random_orthogonal(d, seed=1):
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q.float()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_folded_rotation_leaves_the_dense_models_outputs_unchanged(arch):
    model = _with_random_norms(arch)
    before = _logits(model)
    blocks = [name for name, _ in find_blocks(model)]
    facts = fold_rotation(model, blocks, _random_orthogonal(64), IDS[:1, :8])
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    # each block: q, k, v, gate, up read a norm; o and down write to the stream; the head reads the final norm
    assert facts["readers"] == 5 * len(blocks) + 1 and facts["writers"] == 2 * len(blocks)
    assert facts["norms"] == 2 * len(blocks) + 1
    for module in model.modules():  # every norm that was folded is now scale-free
        if is_rms_norm(module) and module.weight.shape[0] == 64:
            torch.testing.assert_close(norm_scale(module), torch.ones(64))


def test_a_tied_head_is_untied_and_the_embedding_turned():
    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before, embedding = _logits(model), model.model.embed_tokens.weight.detach().clone()
    q = _random_orthogonal(64)
    facts = fold_rotation(model, [n for n, _ in find_blocks(model)], q, IDS[:1, :8])
    assert facts["untied_head"] == 1 and model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding @ q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_a_norm_after_a_writer_is_refused():
    """Gemma 3's sandwich norms normalise each writer's output before the stream: no rotation folds there."""
    model = _with_random_norms("gemma3")
    with pytest.raises(BesaError, match="does not fold"):
        fold_rotation(model, [n for n, _ in find_blocks(model)], _random_orthogonal(64), IDS[:1, :8])


def test_the_stream_is_traced_by_tensors_not_names():
    model = make_model("llama")
    stream = trace_stream(model, [n for n, _ in find_blocks(model)], IDS[:1, :8])
    assert sorted(stream.readers["model.layers.0.input_layernorm"]) == [
        f"model.layers.0.self_attn.{p}_proj" for p in "kqv"
    ]
    assert stream.readers["model.norm"] == ["lm_head"]
    assert (
        "model.layers.1.mlp.down_proj" in stream.writers
        and "model.layers.1.self_attn.o_proj" in stream.writers
    )


def test_a_norm_that_adds_one_itself_is_made_scale_free():
    model = make_model("gemma3")
    norm = next(m for m in model.modules() if is_rms_norm(m) and m.weight.shape[0] == 64)
    with torch.no_grad():
        norm.weight.fill_(0.3)
    torch.testing.assert_close(norm_scale(norm), torch.full((64,), 1.3))  # Gemma: (1 + weight)
    unit_norm(norm)
    assert torch.equal(norm.weight, torch.zeros(64))


def test_pca_basis_is_orthogonal_sorted_and_signed():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 17)
    cov = normalised_covariance(x)
    rms = x.double().square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(cov, (x.double() / rms).t() @ (x.double() / rms))
    q, values = pca_basis(cov)
    torch.testing.assert_close(q.t() @ q, torch.eye(16, dtype=torch.float64))
    spread = torch.diagonal(q.t() @ cov @ q)
    assert (spread[:-1] >= spread[1:] - 1e-9).all()
    torch.testing.assert_close(values, spread)
    assert (q[q.abs().argmax(0), torch.arange(16)] > 0).all()


def test_rotate_pca_prunes_exactly_and_alone_keeps_the_function():
    dense = _with_random_norms("llama")
    before, embedding = _logits(dense), dense.model.embed_tokens.weight.detach().clone()
    kept = besa.prune(dense, tokenizer=make_tokenizer(), method="wanda", sparsity=0.0, calib_ids=IDS, rotate="pca",
                      progress=False, checkpoint=False)  # fmt: skip
    torch.testing.assert_close(_logits(kept.model), before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        kept.model.model.embed_tokens.weight, embedding, atol=1e-3
    )  # turned, not skipped
    result = besa.prune(_with_random_norms("llama"), tokenizer=make_tokenizer(), method="sparsegpt", sparsity=0.6,
                        calib_ids=IDS, rotate="pca", progress=False, checkpoint=False)  # fmt: skip
    assert result.report["rotation"]["writers"] == 4
    for _, block in find_blocks(result.model):
        for name, layer in find_linears(block, result.model).items():
            assert int((layer.weight == 0).sum()) == round(0.6 * layer.weight.numel()), name
    with pytest.raises(BesaError, match="--rotate"):
        besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="wanda", calib_ids=IDS, rotate="qr",
                   progress=False, checkpoint=False)  # fmt: skip


def test_a_rotated_model_with_a_tied_head_saves_and_loads_as_it_ran(tmp_path):
    import transformers

    model = _with_random_norms("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    result = besa.prune(model, tokenizer=make_tokenizer(), method="wanda", sparsity=0.5, calib_ids=IDS, rotate="pca",
                        progress=False, checkpoint=False, out=tmp_path / "out")  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded), _logits(result.model))


def test_a_data_free_method_still_rotates_on_the_calibration_windows():
    """Magnitude reads no data, but the rotation is chosen from the windows: they are read for it, not skipped."""
    dense = _with_random_norms("llama")
    before = _logits(dense)
    result = besa.prune(dense, tokenizer=make_tokenizer(), method="magnitude", sparsity=0.0, calib_ids=IDS,
                        rotate="pca", progress=False, checkpoint=False)  # fmt: skip
    assert result.report["rotation"]["writers"] == 4
    torch.testing.assert_close(_logits(result.model), before, rtol=1e-4, atol=1e-4)
