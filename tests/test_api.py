import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import besa
from besa.errors import BesaError
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from conftest import ARCHS, make_model


def _pruned_linears(model):
    return {
        f"{bn}.{ln}": layer
        for bn, block in find_blocks(model)
        for ln, layer in find_linears(block, model).items()
    }


def _snapshot_unpruned(model):
    pruned = {id(layer.weight) for layer in _pruned_linears(model).values()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in pruned}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_linear_hits_the_exact_target_and_the_rest_stays_dense(arch, method, tokenizer, calib_ids):
    model = make_model(arch)
    before = _snapshot_unpruned(model)
    result = besa.prune(
        model,
        tokenizer=tokenizer,
        method=method,
        sparsity=0.5,
        calib_ids=calib_ids,
        forward_batch=4,
        progress=False,
    )
    linears = _pruned_linears(result.model)
    assert len(linears) == len(result.report["layers"]) > 0
    for name, layer in linears.items():
        w = weight_matrix(layer)
        assert int((w == 0).sum()) == w.numel() // 2, name
        assert result.report["layers"][name]["sparsity"] == pytest.approx(0.5)
    for name, p in result.model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), f"{name} changed but is not a pruned linear"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_group(method, pattern, tokenizer, calib_ids):
    n, m = map(int, pattern.split(":"))
    result = besa.prune(
        make_model("llama"),
        tokenizer=tokenizer,
        method=method,
        pattern=pattern,
        calib_ids=calib_ids,
        progress=False,
    )
    assert result.report["sparsity"]["target"] == n / m
    for name, layer in _pruned_linears(result.model).items():
        w = weight_matrix(layer)
        assert ((w == 0).reshape(w.shape[0], -1, m).sum(-1) == n).all(), name


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.9])
def test_wanda_other_targets_are_exact(sparsity, tokenizer, calib_ids):
    result = besa.prune(
        make_model("qwen2"), tokenizer=tokenizer, method="wanda", sparsity=sparsity, calib_ids=calib_ids,
        progress=False,
    )  # fmt: skip
    for layer in _pruned_linears(result.model).values():
        w = weight_matrix(layer)
        assert int((w == 0).sum()) == round(sparsity * w.numel())


def test_wanda_masks_depend_on_the_activations(tokenizer):
    """Wanda must use the activations: its masks differ from magnitude pruning's on the same weights."""
    model = make_model("llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = besa.prune(
        model, tokenizer=tokenizer, method="wanda", sparsity=0.5, calib_ids=ids, progress=False
    )
    magnitude = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="magnitude", sparsity=0.5, progress=False
    )
    wanda_masks = [weight_matrix(m) == 0 for m in _pruned_linears(result.model).values()]
    mag_masks = [weight_matrix(m) == 0 for m in _pruned_linears(magnitude.model).values()]
    assert any(not torch.equal(a, b) for a, b in zip(wanda_masks, mag_masks, strict=True))


def test_save_reload_round_trip_and_generate(tmp_path, tokenizer, calib_ids):
    out = tmp_path / "pruned"
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="sparsegpt", sparsity=0.5, calib_ids=calib_ids,
        out=out, progress=False,
    )  # fmt: skip
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "besa_report.json").read_text())
    assert report["sparsity"]["pruned_layers"] == pytest.approx(0.5)
    assert report["config"]["method"] == "sparsegpt"
    assert {"torch", "transformers", "besa"} <= set(report["versions"])
    assert report["timings_s"]["prune"] > 0 and len(report["timings_s"]["per_block"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(
        result.model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    generated = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_save_refuses_non_empty_out_without_overwrite(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BesaError, match="not empty"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="magnitude", out=out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(BesaError, match="was not written by besa .*would delete 'keep.txt'"):
        besa.prune(
            make_model("llama"),
            tokenizer=tokenizer,
            method="magnitude",
            out=out,
            overwrite=True,
            progress=False,
        )
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()  # an empty folder, then one besa wrote: both are replaced
    for sparsity in (0.5, 0.6):
        besa.prune(
            make_model("llama"), tokenizer=tokenizer, method="magnitude", sparsity=sparsity, out=out,
            overwrite=True, progress=False,
        )  # fmt: skip
        assert json.loads((out / "besa_report.json").read_text())["config"]["sparsity"] == sparsity


def test_interrupted_save_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model = make_model("llama")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        besa.prune(model, tokenizer=tokenizer, method="magnitude", out=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pattern_that_does_not_divide_a_width_is_refused(tokenizer):
    with pytest.raises(BesaError, match="does not divide the input width 64"):
        besa.prune(
            make_model("llama"), tokenizer=tokenizer, method="magnitude", pattern="3:7", progress=False
        )


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(BesaError, match="magnitude, sparsegpt, wanda"):
        besa.prune("smollm2-135m", method="nope")


def test_evaluate_a_saved_folder_reports_the_protocol_fields(data_dir, model_dir):
    res = besa.evaluate(str(model_dir), datasets=["wikitext2"], seqlen=8, progress=False)["wikitext2"]
    assert res["seqlen"] == 8 and res["tokens"] == res["windows"] * 8 and res["ppl"] > 1


@pytest.mark.parametrize(("bos", "added"), [("auto", True), ("never", False), ("always", True)])
def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_one(bos, added, tmp_path, calib_txt):
    """``--bos auto`` with a tokenizer that adds BOS: every calibration window is BOS + seqlen - 1 text tokens
    (the windows the first block sees), and the report says so."""
    from conftest import make_tokenizer

    model = make_model("llama")
    ids_seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, a: ids_seen.append(a[0].clone()))
    result = besa.prune(model, tokenizer=make_tokenizer(bos=True), method="wanda", calib=str(calib_txt),
                        nsamples=3, seqlen=12, bos=bos, progress=False, checkpoint=False)  # fmt: skip
    ids = torch.cat(ids_seen)  # every forward of the embeddings (the capture may run more than once)
    assert ids.shape[1] == 12 and len({tuple(r) for r in ids.tolist()}) == 3
    assert bool((ids[:, 0] == 258).all()) == added and bool((ids[:, 1:] == 258).any()) is False
    assert result.report["config"]["bos_added"] is added
