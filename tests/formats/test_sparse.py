import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import besa
from besa.formats.sparse import LOADER, pack_weight, unpack_weight
from besa.model.loading import load_model
from conftest import make_model, make_tokenizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [13, 64])
def test_pack_unpack_is_bit_for_bit(dtype, cols):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, cols, generator=g).to(dtype)
    w[torch.rand(7, cols, generator=g) < 0.6] = 0
    w[0, 0] = -0.0  # a negative zero survives too
    bitmask, values = pack_weight(w)
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (7, (cols + 7) // 8)
    assert values.numel() == int((w != 0).sum()) + 1
    back = unpack_weight(bitmask, values, 7, cols)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sparse_folder_reads_back_bit_for_bit_smaller_on_disk(tmp_path, calib_ids, data_dir):
    """The same run saved dense and sparse: besa's loader and the documented loader give exactly the dense save's
    tensors, ``besa eval`` reads the folder, and the report records the bytes saved."""
    tokenizer = make_tokenizer()
    runs = {}
    for fmt in ("dense", "sparse"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="wanda", sparsity=0.5, calib_ids=calib_ids,
                   out=tmp_path / fmt, save_format=fmt, progress=False, checkpoint=False)  # fmt: skip
        runs[fmt] = json.loads((tmp_path / fmt / "besa_report.json").read_text())["size_on_disk"]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").state_dict()
    flat = load_file(str(tmp_path / "sparse" / "model.safetensors"))
    assert any(k.endswith(".bitmask") for k in flat) and not any(k.endswith("proj.weight") for k in flat)
    ours, _, _ = load_model(str(tmp_path / "sparse"))
    scope: dict = {}
    exec(LOADER, scope)  # the loader written into every sparse folder, without besa
    theirs = scope["load_sparse"](str(tmp_path / "sparse"))
    for loaded in (ours.state_dict(), theirs.state_dict()):
        assert loaded.keys() == dense.keys()
        assert all(torch.equal(loaded[k], dense[k]) for k in dense)
    assert "load_sparse" in (tmp_path / "sparse" / "SPARSE_FORMAT.md").read_text()
    assert runs["dense"]["format"] == "dense" and runs["sparse"]["format"] == "sparse"
    assert runs["sparse"]["dense_weights_bytes"] == runs["dense"]["dense_weights_bytes"]
    assert runs["sparse"]["saved_weights_bytes"] < 0.8 * runs["dense"]["saved_weights_bytes"]
    ppl = besa.evaluate(str(tmp_path / "sparse"), datasets=["ptb"], seqlen=8, max_windows=2, progress=False)
    ref = besa.evaluate(str(tmp_path / "dense"), datasets=["ptb"], seqlen=8, max_windows=2, progress=False)
    assert ppl == ref


def test_unknown_save_format_is_refused(tmp_path, calib_ids):
    with pytest.raises(besa.BesaError, match="unknown --save-format"):
        besa.prune(make_model("llama"), tokenizer=make_tokenizer(), method="magnitude", out=tmp_path / "o",
                   save_format="zip", progress=False)  # fmt: skip
