import pytest
import torch
from transformers.pytorch_utils import Conv1D

from besa.errors import BesaError
from besa.modeling import find_blocks, find_linears, set_weight_matrix, weight_matrix
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
