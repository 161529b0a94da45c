import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import besa
from besa.errors import BesaError
from conftest import make_model, make_tokenizer

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (8, 32), (4, 0)])
def test_compressed_tensors_folder_loads_with_from_pretrained_bit_for_bit(
    tmp_path, calib_ids, bits, group_size
):
    """The same quantized run saved dense and as compressed-tensors: plain ``from_pretrained`` of the compressed
    folder gives exactly the dense save's (dequantized, pruned) weights, in a smaller file."""
    tokenizer = make_tokenizer()
    sizes = {}
    for fmt in ("dense", "compressed-tensors"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="sparsegpt", sparsity=0.5, calib_ids=calib_ids,
                   wbits=bits, group_size=group_size, out=tmp_path / fmt, save_format=fmt, progress=False,
                   checkpoint=False)  # fmt: skip
        sizes[fmt] = json.loads((tmp_path / fmt / "besa_report.json").read_text())["size_on_disk"]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").state_dict()
    config = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors").state_dict()
    assert loaded.keys() == dense.keys()
    for key in dense:
        assert torch.equal(loaded[key], dense[key]), key
    q = loaded["model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean() >= 0.5  # the pruned zeros stay exact zeros on the grid
    assert sizes["compressed-tensors"]["saved_weights_bytes"] < 0.6 * sizes["dense"]["saved_weights_bytes"]


def test_compressed_tensors_refuses_what_it_cannot_hold(tmp_path, calib_ids):
    tokenizer = make_tokenizer()
    with pytest.raises(BesaError, match="add --wbits"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="magnitude", out=tmp_path / "a",
                   save_format="compressed-tensors", progress=False)  # fmt: skip
    with pytest.raises(BesaError, match="does not divide 64 .*use --group-size 32"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="magnitude", wbits=4, group_size=48,
                   out=tmp_path / "b", save_format="compressed-tensors", progress=False)  # fmt: skip
    with pytest.raises(BesaError, match="stores nn.Linear layers"):
        besa.prune(make_model("gpt2"), tokenizer=tokenizer, method="magnitude", wbits=4, group_size=16,
                   out=tmp_path / "c", save_format="compressed-tensors", progress=False)  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "abc")
