import copy
import json

import pytest
import torch

from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.runtime.kernels import kernels
from besa.settings.commands import SpeedConfig
from besa.tools.speed import SparseTwin, is_two_four, measure_speed, sparsify_model
from conftest import make_model

# besa's kernels on the CPU; torch's CSR where they cannot be built
CPU_KIND = "bitmask" if kernels().available else "csr"


def _prune_half(model):
    g = torch.Generator().manual_seed(0)
    for _, block in find_blocks(model):
        for layer in find_linears(block, model).values():
            w = weight_matrix(layer)
            w.masked_fill_(torch.rand(w.shape, generator=g) < 0.5, 0)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparse_twins_compute_what_the_dense_model_computes(arch):
    model = _prune_half(make_model(arch)).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    sparse = _prune_half(make_model(arch)).eval()
    sparse.load_state_dict(model.state_dict())
    kinds = sparsify_model(sparse)
    assert kinds and set(kinds.values()) == {CPU_KIND}
    assert all(isinstance(m, SparseTwin) for m in sparse.modules() if type(m).__name__ in ("Linear", "Conv1D")
               and m is not sparse.get_output_embeddings())  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(sparse(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_is_two_four():
    w = torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]])
    assert is_two_four(w) and not is_two_four(torch.ones(1, 8)) and not is_two_four(torch.zeros(1, 6))


def test_measure_speed_reports_every_pruned_linear_and_the_model_per_thread_count_and_dtype(tmp_path):
    model = _prune_half(make_model("llama"))
    before = torch.get_num_threads()
    result = measure_speed(
        model, SpeedConfig(batch=(1, 2), seqlen=8, repeats=2, decode_tokens=4, threads=(1, 2)), progress=False
    )
    assert torch.get_num_threads() == before  # the thread count is given back
    linears = sum(len(find_linears(b, model)) for _, b in find_blocks(model))
    assert len(result["layers"]) == 2 * 2 * linears and result["threads"] == [1, 2]
    assert {(r["batch"], r["threads"]) for r in result["layers"]} == {(1, 1), (2, 1), (1, 2), (2, 2)}
    bf16 = CPU_KIND == "bitmask"  # bfloat16 twins are besa's kernels' own
    for row in result["layers"]:
        assert row["dense_s"] > 0 and row["sparse_s"] > 0 and row["kind"] == CPU_KIND
        assert row["speedup"] == pytest.approx(row["dense_s"] / row["sparse_s"])
        assert ("speedup_bf16" in row) == bf16
        if bf16:
            assert row["speedup_bf16"] == pytest.approx(row["dense_bf16_s"] / row["sparse_bf16_s"])
        assert 0.3 < row["sparsity"] < 0.7
    whole = [(r["what"], r["threads"]) for r in result["model"]]
    assert whole == [(w, t) for t in (1, 2) for w in ("forward", "forward", "greedy decode 4 tokens")]
    assert all(r["sparse_bf16_s"] > 0 and r["dense_bf16_s"] > 0 for r in result["model"])
    json.dumps(result)  # serialisable as written by --json
    fp32_only = measure_speed(
        model,
        SpeedConfig(batch=(1,), seqlen=4, repeats=1, decode_tokens=0, threads=(1,), bf16=False),
        progress=False,
    )
    assert not any("dense_bf16_s" in r for r in fp32_only["layers"] + fp32_only["model"])


def test_a_dense_model_is_refused():
    with pytest.raises(BesaError, match="no pruned linears"):
        measure_speed(make_model("llama"), SpeedConfig(batch=(1,), seqlen=4, repeats=1, decode_tokens=0))


def test_speedup_command_prints_the_table_and_draws_the_chart(tmp_path, capsys):
    from besa.cli import main
    from conftest import make_tokenizer

    folder = tmp_path / "m"
    _prune_half(make_model("llama")).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    out = tmp_path / "s.json"
    code = main(["speedup", str(folder), "--batch", "1", "--seqlen", "8", "--repeats", "2", "--decode-tokens", "0",
                 "--threads", "1,2", "--json", str(out), "--png", str(tmp_path / "s.png"), "--no-progress"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0 and "self_attn.q_proj" in stdout and "forward" in stdout and "speed-up" in stdout
    assert "threads 1, 2" in stdout and "bf16 dense" in stdout
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert json.loads(out.read_text())["model"][0]["what"] == "forward"


def test_speedup_simulate_prints_cycles_per_layer_type(tmp_path, capsys):
    from besa.cli import main
    from conftest import make_tokenizer

    folder = tmp_path / "m"
    _prune_half(make_model("llama")).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    out = tmp_path / "sim.json"
    assert main(["speedup", str(folder), "--simulate", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "mlp.down_proj" in stdout and "pruned cycles" in stdout
    sim = json.loads(out.read_text())
    assert all(e["cycles"] <= e["dense_cycles"] for e in sim["by_type"].values())


@pytest.mark.parametrize("arch", ["mixtral", "llama4_text"])
def test_experts_are_timed_and_sparsified_as_the_linears_they_are_pruned_as(arch):
    import besa
    from besa.model.experts import block_expert_matrices, experts_as_linears
    from conftest import make_tokenizer
    from test_architectures import make_arch

    model = besa.prune(
        make_arch(arch),
        method="magnitude",
        sparsity=0.5,
        progress=False,
        checkpoint=False,
        tokenizer=make_tokenizer(),
    ).model
    experts = {f"{b}.{n}" for b, block in find_blocks(model) for n in block_expert_matrices(block)}
    assert len(experts) == 2 * 2 * 4  # blocks x projections x experts
    result = measure_speed(
        model, SpeedConfig(batch=(1,), seqlen=8, repeats=1, decode_tokens=2), progress=False
    )
    timed = {r["layer"] for r in result["layers"]}
    assert experts <= timed and all(r["kind"] == CPU_KIND for r in result["layers"])
    assert not any(hasattr(m, "expert") for m in model.modules())  # the experts are stacked back
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        with experts_as_linears(model, find_blocks(model), ids[:1]):
            twin = copy.deepcopy(model)  # what measure_speed does
            kinds = sparsify_model(twin)
            assert experts <= set(kinds)  # every expert now runs on its sparse twin
            sparse = twin(ids).logits
    assert torch.allclose(sparse, dense, atol=1e-4, rtol=1e-4)
