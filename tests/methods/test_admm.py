import pytest
import torch

import besa
from besa.errors import BesaError
from besa.methods.configs import AdmmConfig
from besa.model.blocks import find_blocks, find_linears
from conftest import make_model, make_tokenizer

IDS = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def _weights(model):
    return {
        f"{b}.{n}": layer.weight.detach()
        for b, block in find_blocks(model)
        for n, layer in find_linears(block, model).items()
    }


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_admm_prunes_every_linear_to_its_exact_share(sparsity):
    result = besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="admm", sparsity=sparsity,
                        calib_ids=IDS, progress=False, checkpoint=False)  # fmt: skip
    for name, w in _weights(result.model).items():
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name
    assert result.report["sparsity"]["pruned_layers"] == pytest.approx(sparsity, abs=1e-3)


def test_admm_holds_nm_patterns_and_reconstructs_better_than_wanda():
    dense = make_model("llama")
    runs = {
        method: besa.prune(
            make_model("llama"),
            tokenizer=make_tokenizer(),
            method=method,
            pattern="2:4",
            calib_ids=IDS,
            progress=False,
            checkpoint=False,
        )  # fmt: skip
        for method in ("admm", "wanda")
    }
    for name, w in _weights(runs["admm"].model).items():
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name

    def error(model):
        with torch.no_grad():
            return float((model(IDS).logits - dense(IDS).logits).square().mean())

    assert error(runs["admm"].model) < error(runs["wanda"].model)


def test_admm_refuses_joint_quantization_and_bad_settings():
    with pytest.raises(BesaError, match="--quant-mode rtn"):
        besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="admm", sparsity=0.5, calib_ids=IDS,
                   wbits=4, group_size=16, quant_mode="joint", progress=False, checkpoint=False)  # fmt: skip
    with pytest.raises(BesaError, match="--admm-gradual"):
        AdmmConfig(admm_iters=4, admm_gradual=5)


def test_admm_with_round_to_nearest_quantization_keeps_the_zeros():
    result = besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="admm", sparsity=0.5,
                        calib_ids=IDS, wbits=4, group_size=16, quant_mode="rtn", progress=False,
                        checkpoint=False)  # fmt: skip
    for name, w in _weights(result.model).items():
        assert int((w == 0).sum()) >= round(0.5 * w.numel()), name
        assert len(torch.unique(w[0, :16])) <= 16, name  # on a 4-bit grid
