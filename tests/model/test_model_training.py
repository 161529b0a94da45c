import torch

from besa.model.blocks import find_blocks
from besa.model.training import checkpointed_blocks, final_hidden, head_splits
from conftest import VOCAB, make_model, make_softcapped_gemma3


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(0))


def test_the_head_splits_from_a_model_whose_logits_are_its_output_and_not_from_a_soft_capped_one():
    ids = _ids(2)
    model = make_model("llama")
    assert head_splits(model, ids)
    assert torch.equal(model.get_output_embeddings()(final_hidden(model, ids)), model(input_ids=ids).logits)
    assert not head_splits(make_softcapped_gemma3(), ids)


def test_checkpointed_blocks_recompute_the_same_gradient_and_leave_the_blocks_as_they_were():
    model, ids = make_model("llama"), _ids(2)
    weights = [p for p in model.parameters() if p.dim() == 2]
    plain = torch.autograd.grad(model(input_ids=ids).logits.square().mean(), weights)
    with checkpointed_blocks(model):
        assert all("forward" in block.__dict__ for _, block in find_blocks(model))
        again = torch.autograd.grad(model(input_ids=ids).logits.square().mean(), weights)
    assert all("forward" not in block.__dict__ for _, block in find_blocks(model))
    for a, b in zip(again, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
