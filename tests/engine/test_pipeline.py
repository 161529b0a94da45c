import pytest
import torch

import besa
from besa.engine.activations import rebatch
from besa.engine.pipeline import run_sequential
from besa.engine.work import BlockWork
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from conftest import ARCHS, make_model, make_tokenizer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_engine_feeds_each_block_the_dense_models_hidden_states(arch, calib_ids):
    """With a no-op step, the inputs the engine gives block i equal the model's own hidden_states[i], and the
    outputs it propagates equal hidden_states[i+1]: capture, per-block kwargs (sliding windows, rotary) and
    batching are all right."""
    model = make_model(arch)
    with torch.no_grad():
        expected = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    seen: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def step(work: BlockWork) -> None:
        seen.append(torch.cat(list(work.inputs)))
        outputs.append(torch.cat(list(work.forward_all(keep_outputs=True))))

    run_sequential(model, calib_ids, step, torch.device("cpu"), forward_batch=4, progress=False)
    assert len(seen) == model.config.num_hidden_layers
    for i, got in enumerate(seen):
        torch.testing.assert_close(got, expected[i], rtol=1e-4, atol=1e-5)
    # the last hidden state is after the final norm in HF; compare the intermediate ones only
    for i, got in enumerate(outputs[:-1]):
        torch.testing.assert_close(got, expected[i + 1], rtol=1e-4, atol=1e-5)


def test_engine_keeps_activations_on_cpu_and_blocks_back_on_cpu(calib_ids):
    model = make_model("llama")
    devices = []

    def step(work: BlockWork) -> None:
        devices.extend(t.device.type for t in work.inputs)

    run_sequential(model, calib_ids, step, torch.device("cpu"), forward_batch=4, progress=False)
    assert set(devices) == {"cpu"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_engine_uses_pruned_outputs_as_next_inputs(calib_ids):
    """Zeroing block 0 entirely changes what block 1 sees: the propagation uses the pruned block."""
    model = make_model("llama")
    with torch.no_grad():
        dense = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    seen = []

    def step(work: BlockWork) -> None:
        seen.append(torch.cat(list(work.inputs)))
        if work.index == 0:
            for layer in work.linears.values():
                layer.weight.data.zero_()

    run_sequential(model, calib_ids, step, torch.device("cpu"), forward_batch=4, progress=False)
    # a block whose linears are all zero is the identity (residual only)
    torch.testing.assert_close(seen[1], dense[0])


def test_rebatch_recuts_stored_batches_in_order():
    chunks = [torch.arange(3), torch.arange(3, 8), torch.arange(8, 9)]
    for size in (1, 2, 4, 9, 20):
        out = list(rebatch(chunks, size))
        assert torch.equal(torch.cat(out), torch.arange(9))
        assert all(len(b) == size for b in out[:-1]) and 0 < len(out[-1]) <= size


def _zero_masks(model) -> dict[str, torch.Tensor]:
    return {
        f"{block_name}.{name}": weight_matrix(layer) == 0
        for block_name, block in find_blocks(model)
        for name, layer in find_linears(block, model).items()
    }


@pytest.fixture
def bloom_wanda_masks_at_batch_1(calib_ids) -> dict[str, torch.Tensor]:
    result = besa.prune(
        make_model("bloom"), tokenizer=make_tokenizer(), method="wanda", sparsity=0.5, calib_ids=calib_ids,
        forward_batch=1, progress=False,
    )  # fmt: skip
    return _zero_masks(result.model)


@pytest.mark.parametrize("forward_batch", [2, 4])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "besa", "besa-2:4"])
def test_bloom_prunes_at_a_forward_batch_above_one(
    method, forward_batch, calib_ids, bloom_wanda_masks_at_batch_1
):
    """BLOOM's blocks take an ALiBi bias laid out (batch * heads, 1, T): the engine widens it to every batch size
    (it once crashed at any batch above 1). Each linear ends at exactly 50% (BESA: each block, its budget; with
    2:4, each linear too), wanda's masks are those of a batch-1 run (its statistics are sums) and the pruned
    model's forward is finite. BESA trains on batches of the same size, through the same block calls."""
    name, _, pattern = method.partition("-")
    settings = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    options = {"batch_size": forward_batch} if name == "besa" else {}
    result = besa.prune(
        make_model("bloom"), tokenizer=make_tokenizer(), method=name, calib_ids=calib_ids,
        forward_batch=forward_batch, progress=False, method_options=options, **settings,
    )  # fmt: skip
    masks = _zero_masks(result.model)
    if method == "besa":
        for block_name, block in find_blocks(result.model):
            ws = [weight_matrix(layer) for layer in find_linears(block, result.model).values()]
            assert sum(int((w == 0).sum()) for w in ws) == sum(w.numel() for w in ws) // 2, block_name
    else:
        for layer_name, zeros in masks.items():
            assert int(zeros.sum()) == zeros.numel() // 2, layer_name
    if method == "wanda":
        for layer_name, zeros in masks.items():
            assert torch.equal(zeros, bloom_wanda_masks_at_batch_1[layer_name]), layer_name
    with torch.no_grad():
        assert torch.isfinite(result.model(calib_ids, use_cache=False).logits).all()
