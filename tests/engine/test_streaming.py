"""Streamed pruning (``--stream``): one block in memory, the same weights as an unstreamed run, resumable."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import besa
import besa.run
from besa.engine.source_weights import INDEX_NAME, ShardIndex
from besa.engine.streaming import shard_name
from besa.errors import BesaError
from besa.model.blocks import find_blocks
from besa.registry import get_method
from conftest import make_tokenizer

LAYERS = 4
OPTIONS = {
    "besa": {"optimizer": "adamw", "lr": 0.05, "epochs": 1},
    "sparsegpt": {},
    "wanda": {},
    "magnitude": {},
}


def _save_source(path: Path, dtype: torch.dtype = torch.float32, shard: str | None = "40KB") -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 4-block tiny LLaMA saved in several safetensors shards with an index."""
    return _save_source(tmp_path / "source")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))


def _prune(source, method, ids, out, **kwargs):
    return besa.prune(
        str(source), method=method, sparsity=0.5, calib_ids=ids, out=out, progress=False, forward_batch=2,
        method_options=OPTIONS[method], **kwargs,
    )  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "besa"])
def test_streamed_run_gives_the_unstreamed_weights_bit_for_bit(method, source, ids, tmp_path):
    assert (source / INDEX_NAME).is_file()  # the source itself is sharded
    plain = _prune(source, method, ids, tmp_path / "plain")
    streamed = _prune(source, method, ids, tmp_path / "streamed", stream=True)
    want, got = _weights(tmp_path / "plain"), _weights(tmp_path / "streamed")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert streamed.report["layers"] == plain.report["layers"]
    assert streamed.report["sparsity"] == plain.report["sparsity"]
    assert streamed.report["sparsity"]["pruned_layers"] == 0.5
    assert streamed.model is None
    # the standard sharded layout: one shard per block plus one for the rest, named in the index
    index = json.loads((tmp_path / "streamed" / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [shard_name(i, LAYERS + 1) for i in range(1, LAYERS + 2)]
    assert load_file(str(tmp_path / "streamed" / shard_name(1, LAYERS + 1))).keys() == {
        k for k in index["weight_map"] if k.startswith("model.layers.0.")
    }
    assert streamed.report["size_on_disk"]["shards"] == LAYERS + 1
    assert not (tmp_path / "streamed.run").exists()


def test_only_the_block_being_pruned_is_in_memory(source, ids, tmp_path, monkeypatch):
    seen: list[list[bool]] = []
    opened = []
    cls = get_method("wanda").pruner_cls
    original, open_streamed = cls.prune_block, besa.run.open_streamed

    def opening(*args, **kwargs):
        opened.append(open_streamed(*args, **kwargs))
        return opened[-1]

    def prune_block(self, work):
        model = opened[0][0]
        seen.append([all(p.device.type != "meta" for p in b.parameters()) for _, b in find_blocks(model)])
        return original(self, work)

    monkeypatch.setattr(cls, "prune_block", prune_block)
    monkeypatch.setattr(besa.run, "open_streamed", opening)
    _prune(source, "wanda", ids, tmp_path / "out", stream=True)
    assert seen == [[j == i for j in range(LAYERS)] for i in range(LAYERS)]


def test_a_bf16_checkpoint_is_computed_in_fp32_and_written_back_in_bf16(tmp_path, ids):
    source = _save_source(tmp_path / "bf16", torch.bfloat16)
    plain = _prune(source, "sparsegpt", ids, tmp_path / "plain")  # loads the whole model in fp32
    _prune(source, "sparsegpt", ids, tmp_path / "streamed", stream=True)
    want, got = _weights(tmp_path / "plain"), _weights(tmp_path / "streamed")
    assert {t.dtype for t in want.values()} == {torch.float32}
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == "bfloat16"
    stored = ShardIndex.open(source).read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"], stored)  # outside the blocks: as stored
    zeros = sum(int((got[f"{k}.weight"] == 0).sum()) for k in plain.report["layers"])
    assert zeros == plain.report["sparsity"]["pruned_layers_zeros"]  # no survivor rounded to zero unnoticed


def test_owl_allocation_streams_its_statistics_pass_too(source, ids, tmp_path):
    plain = _prune(source, "wanda", ids, tmp_path / "plain", allocation="owl")
    streamed = _prune(source, "wanda", ids, tmp_path / "streamed", allocation="owl", stream=True)
    assert streamed.report["allocation"] == plain.report["allocation"]
    want, got = _weights(tmp_path / "plain"), _weights(tmp_path / "streamed")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_failed_streamed_run_resumes_to_the_same_weights(source, ids, tmp_path, monkeypatch):
    cls = get_method("sparsegpt").pruner_cls
    original = cls.prune_block

    def failing(self, work):
        if work.index == 2:
            raise RuntimeError("killed")
        return original(self, work)

    monkeypatch.setattr(cls, "prune_block", failing)
    with pytest.raises(RuntimeError, match="killed"):
        _prune(source, "sparsegpt", ids, tmp_path / "out", stream=True)
    state = json.loads((tmp_path / "out.run" / "run.json").read_text())
    assert state["completed"] == 2 and not (tmp_path / "out").exists()
    monkeypatch.setattr(cls, "prune_block", original)
    resumed = _prune(source, "sparsegpt", ids, tmp_path / "out", stream=True, resume=True)
    assert resumed.report["run"]["resumed_blocks"] == 2
    _prune(source, "sparsegpt", ids, tmp_path / "reference")
    want, got = _weights(tmp_path / "reference"), _weights(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (
        resumed.report["layers"]
        == json.loads((tmp_path / "reference" / "besa_report.json").read_text())["layers"]
    )


def test_streaming_refuses_what_it_cannot_do(source, ids, tmp_path):
    cases = [
        ({}, "give --out"),
        ({"out": tmp_path / "a", "checkpoint": False}, "drop --no-checkpoint"),
        ({"out": tmp_path / "b", "save_format": "sparse"}, "dense shards"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BesaError, match=message):
            besa.prune(str(source), method="wanda", calib_ids=ids, progress=False, stream=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source)
    with pytest.raises(BesaError, match="reads the model from its files"):
        besa.prune(model, tokenizer=make_tokenizer(), method="wanda", calib_ids=ids, out=tmp_path / "c",
                   progress=False, stream=True)  # fmt: skip
    bin_only = tmp_path / "bin-only"  # old-style pickled weights cannot be memory-mapped block by block
    bin_only.mkdir()
    (bin_only / "config.json").write_text((source / "config.json").read_text())
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    with pytest.raises(BesaError, match="holds pickle weights only"):
        besa.prune(str(bin_only), method="wanda", calib_ids=ids, out=tmp_path / "d", progress=False,
                   stream=True)  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_cli_stream_flag_prunes_and_refuses_in_one_line(source, data_dir, tmp_path, capsys):
    from besa.cli import main

    out = tmp_path / "cli-out"
    code = main(["prune", str(source), "--method", "wanda", "--nsamples", "2", "--seqlen", "16", "--stream",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0 and (out / INDEX_NAME).is_file()
    report = json.loads((out / "besa_report.json").read_text())
    assert report["sparsity"]["pruned_layers"] == 0.5
    capsys.readouterr()
    code = main(["prune", str(source), "--stream", "--no-checkpoint", "--out", str(tmp_path / "x")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "drop --no-checkpoint" in err[0]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_moe_checkpoint_that_stores_each_expert_apart_streams_to_the_unstreamed_weights(
    arch, method, ids, tmp_path
):
    # transformers 5 writes Mixtral's experts apart (block_sparse_moe.experts.<e>.w1/w2/w3) and fuses them on loading
    from test_architectures import make_arch

    source = tmp_path / "source"
    make_arch(arch).save_pretrained(source, max_shard_size="100KB")
    make_tokenizer().save_pretrained(source)
    stored = set(json.loads((source / INDEX_NAME).read_text())["weight_map"])
    plain = _prune(source, method, ids, tmp_path / "plain", expert_min_tokens=0)
    streamed = _prune(source, method, ids, tmp_path / "streamed", stream=True, expert_min_tokens=0)
    want, got = _weights(tmp_path / "plain"), _weights(tmp_path / "streamed")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert streamed.report["layers"] == plain.report["layers"]
    assert streamed.report["sparsity"] == plain.report["sparsity"]
    assert streamed.report["weights"]["expert_tokens"] == plain.report["weights"]["expert_tokens"]
    experts = [n for n in streamed.report["layers"] if ".experts." in n]
    assert len(experts) == 2 * 2 * 4 and all(streamed.report["layers"][n]["sparsity"] == 0.5 for n in experts)
    if arch == "mixtral":
        assert any(".block_sparse_moe.experts.0.w1." in k for k in stored)  # the source did store them apart


def test_streaming_refuses_experts_only_a_whole_forward_shows(ids, tmp_path):
    from conftest import make_llama4

    source = tmp_path / "llama4"
    make_llama4().save_pretrained(source)
    make_tokenizer().save_pretrained(source)
    with pytest.raises(
        BesaError, match="--stream cannot prune model.layers.0.feed_forward.experts.gate_up_proj"
    ):
        _prune(source, "wanda", ids, tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists()
