import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import besa
from besa.methods.besa.layer import RateLogits
from besa.methods.besa.rates import candidate_rates, tilted_logits
from besa.methods.besa.training import masked
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.model.experts import block_expert_matrices
from conftest import make_llama4, make_tokenizer


class _TupleLinear(nn.Linear):
    """An ``nn.Linear`` subclass whose own forward returns a tuple, as a Mixture-of-Experts router does."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)
        return torch.sigmoid(logits), logits


def _rate_logits(layer: nn.Module) -> RateLogits:
    """A row-wise BESA allocation of ``layer`` with uneven logits, set up for one training step."""
    w = weight_matrix(layer)
    rates = candidate_rates(10, 0.3, 0.7)
    theta = tilted_logits(rates, 0.5).expand(w.shape[0], -1).clone()
    rate_logits = RateLogits("layer", layer, torch.argsort(w.abs(), dim=1, stable=True), rates, theta)
    with torch.no_grad():
        rate_logits.theta.add_(
            torch.randn(rate_logits.theta.shape, generator=torch.Generator().manual_seed(1))
        )
    rate_logits.prepare_step()
    return rate_logits


def test_a_masked_linear_subclass_keeps_its_own_forward_with_the_masked_weight():
    """BESA's training forward runs the layer's own forward (here one that returns a tuple) on the masked weight;
    the gradients reach BESA's logits, not the weight, and the layer is itself again afterwards."""
    torch.manual_seed(0)
    layer = _TupleLinear(8, 6)
    dense = layer.weight.detach().clone()
    rate_logits = _rate_logits(layer)
    mask = rate_logits.mask().detach()
    assert 0 < int((mask == 0).sum()) < mask.numel()
    x = torch.randn(5, 8)
    with torch.enable_grad(), masked({"layer": rate_logits}):
        out = layer(x)
        assert isinstance(out, tuple) and len(out) == 2
        scores, logits = out
        expected = F.linear(x, dense * mask, layer.bias)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(scores, torch.sigmoid(expected))
        (scores.sum() + logits.square().sum()).backward()
    assert rate_logits.theta.grad is not None and rate_logits.theta.grad.abs().sum() > 0
    assert layer.weight.grad is None
    assert isinstance(layer._parameters["weight"], nn.Parameter) and torch.equal(layer.weight, dense)
    assert "forward" not in vars(layer)
    torch.testing.assert_close(layer(x)[1], F.linear(x, dense, layer.bias))


def test_a_masked_conv1d_applies_the_mask_in_its_transposed_layout():
    """``Conv1D`` keeps its weight (in, out): the masked (out, in) matrix goes back into that layout."""
    torch.manual_seed(0)
    layer = Conv1D(nf=6, nx=8)
    nn.init.normal_(layer.bias)
    rate_logits = _rate_logits(layer)
    mask = rate_logits.mask().detach()  # (out, in)
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), masked({"layer": rate_logits}):
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, weight_matrix(layer) * mask, layer.bias))


@pytest.mark.parametrize("forward_batch", [1, 2])
def test_besa_prunes_llama4_with_its_router_whose_forward_returns_a_tuple(forward_batch, calib_ids):
    """Llama 4's router is an ``nn.Linear`` subclass returning (scores, logits); pruned with the rest (its experts,
    stacked in parameters its own forward multiplies in one ``bmm``, pruned per expert), BESA's masked training
    forward keeps that output, and the run ends at the target."""
    model = make_llama4()
    router_outputs: list[object] = []
    routers = [m for m in model.modules() if type(m).__name__ == "Llama4Router"]
    assert routers and all(isinstance(m, nn.Linear) for m in routers)
    for router in routers:  # what the router returns while BESA's masked forward stands in for its own
        router.register_forward_hook(
            lambda module, _args, out: router_outputs.append(out) if "forward" in vars(module) else None
        )
    result = besa.prune(
        model, tokenizer=make_tokenizer(), method="besa", sparsity=0.5, calib_ids=calib_ids,
        forward_batch=forward_batch, progress=False, prune_routers=True,
        method_options={"batch_size": forward_batch},
    )  # fmt: skip
    assert router_outputs and all(isinstance(out, tuple) and len(out) == 2 for out in router_outputs)
    for block_name, block in find_blocks(result.model):
        linears = find_linears(block, result.model, routers=True)
        assert "feed_forward.router" in linears, block_name
        ws = [weight_matrix(layer) for layer in linears.values()] + list(
            block_expert_matrices(block).values()
        )
        assert len(ws) == len(linears) + 2 * 4  # gate_up and down of 4 experts
        assert sum(int((w == 0).sum()) for w in ws) == sum(w.numel() for w in ws) // 2, block_name
    with torch.no_grad():
        assert torch.isfinite(result.model(calib_ids, use_cache=False).logits).all()
