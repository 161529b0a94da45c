"""A ``--save-format sparse`` folder run on its sparse modules: the pruned linears never dense, greedy decode token
for token the dense weights' own, through the Python API and ``besa generate``."""

import pytest
import torch

import besa
from besa.cli import main
from besa.errors import BesaError
from besa.model.loading import load_model
from besa.runtime.linear import SparseLinear
from besa.runtime.load import load_sparse, sparse_bytes
from conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def sparse_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "wanda50"
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="wanda", sparsity=0.5, calib_ids=ids,
               out=str(out), save_format="sparse", progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize("crossover", [0, 2])
def test_greedy_decode_on_sparse_modules_gives_the_dense_weights_tokens(sparse_folder, crossover):
    model, tokenizer = load_sparse(sparse_folder, crossover=crossover)
    pruned = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert besa.load_sparse is load_sparse and len(pruned) == 14
    assert not any(type(m) is torch.nn.Linear and "layers" in n for n, m in model.named_modules())
    assert all(m.crossover == crossover for m in pruned)
    held, dense = sparse_bytes(model)
    assert held / dense < 0.6  # 50% kept in float32: values + 1 bit a weight + row offsets
    reference, _, _ = load_model(str(sparse_folder))
    reference.config.use_cache = True
    prompt = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        want = reference.generate(prompt, max_new_tokens=24, do_sample=False)
        got = model.generate(prompt, max_new_tokens=24, do_sample=False)
        assert torch.equal(got, want)
        torch.testing.assert_close(model(prompt).logits, reference(prompt).logits, rtol=1e-4, atol=1e-4)
    assert tokenizer is not None


def test_decode_reuses_the_cache_one_token_a_step(sparse_folder):
    """The saved config keeps the cache on (pruning turns it off only for its own forwards), and a decode step
    feeds the sparse linears the new token alone, not the whole sequence again."""
    import json

    assert json.loads((sparse_folder / "config.json").read_text())["use_cache"] is True
    model, _ = load_sparse(sparse_folder, crossover=0)
    seen: list[int] = []
    first = next(m for m in model.modules() if isinstance(m, SparseLinear))
    first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-2]))
    with torch.no_grad():
        model.generate(torch.tensor([[1, 5, 9, 20, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert seen == [5, 1, 1, 1]


def test_bfloat16_values_decode_like_the_bfloat16_dense_model(sparse_folder):
    model, _ = load_sparse(sparse_folder, dtype=torch.bfloat16, crossover=0)
    assert all(
        m.packed.values.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, SparseLinear)
    )
    reference, _, _ = load_model(str(sparse_folder), dtype=torch.bfloat16)
    prompt = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, reference(prompt).logits, rtol=0.05, atol=0.05)


def test_a_dense_folder_is_refused_in_one_line(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(BesaError, match="not a sparse model folder"):
        load_sparse(tmp_path / "dense")


def test_besa_generate_prints_text_speed_memory_and_checks_the_tokens(sparse_folder, capsys):
    code = main(
        ["generate", str(sparse_folder), "--prompt", "ab ab", "--max-new-tokens", "8", "--check-dense"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "8 tokens in" in out and "tokens/s" in out and "peak resident memory" in out
    assert "greedy tokens equal the dense weights' greedy decode" in out
    assert main(["generate", str(sparse_folder), "--max-new-tokens", "0"]) == 2


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "wanda50w4"
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="wanda", sparsity=0.5, calib_ids=ids,
               wbits=4, group_size=32, out=str(out), save_format="sparse", save_quantized=True,
               progress=False)  # fmt: skip
    return out


def test_the_folders_own_wbits_codes_run_as_the_saved_weights(quantized_folder, caplog):
    model, _ = load_sparse(quantized_folder, bits=4, crossover=0)
    reference, _, _ = load_model(str(quantized_folder))
    pruned = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert pruned and all(m.packed.bits == 4 and m.packed.values.dtype == torch.uint8 for _, m in pruned)
    for name, module in pruned:  # the codes are the saved weights exactly, pruned zeros included
        assert torch.equal(module.packed.dense(), reference.get_submodule(name).weight)
    held, dense = sparse_bytes(model)
    assert held < dense  # against dense 4-bit codes with the same scales
    prompt = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        want = reference.generate(prompt, max_new_tokens=16, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=16, do_sample=False), want)
    other, _ = load_sparse(
        quantized_folder, bits=8, group_size=16, crossover=0
    )  # not the folder's: rounded now
    assert "holds 4-bit codes" in caplog.text and "rounded at load" in caplog.text
    for name, module in other.named_modules():
        if isinstance(module, SparseLinear):
            assert module.packed.bits == 8 and module.packed.group_chunks == 1
            saved = reference.get_submodule(name).weight
            torch.testing.assert_close(
                module.packed.dense(), saved, rtol=0, atol=float(saved.abs().max()) / 255
            )


def test_float_values_rounded_to_8_bit_codes_at_load_decode_like_their_dense_weights(sparse_folder, capsys):
    model, _ = load_sparse(sparse_folder, bits=8, group_size=16, crossover=0)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert all(m.packed.bits == 8 and m.packed.group_chunks == 1 for m in layers)
    code = main(["generate", str(sparse_folder), "--prompt", "ab ab", "--max-new-tokens", "8", "--bits", "8",
                 "--group-size", "16", "--check-dense"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "at 8 bits" in out and "greedy tokens equal" in out, out
    assert main(["generate", str(sparse_folder), "--bits", "3"]) == 2
