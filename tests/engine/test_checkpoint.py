"""Checkpoints, resume, determinism and bad states of long runs (issue: runs that survive)."""

import errno
import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import besa
import besa.engine.checkpoint
import besa.engine.checkpoint_files
from besa.engine.checkpoint import RUN_FILE
from besa.errors import BesaError
from besa.settings.options import RUN_MARKER
from conftest import make_tokenizer

LAYERS = 4
OPTIONS = {"besa": {"optimizer": "adamw", "lr": 0.05}, "sparsegpt": {}, "wanda": {}}


@pytest.fixture
def deep_model_dir(tmp_path: Path) -> Path:
    """A 4-block tiny LLaMA and its tokenizer, saved as a folder a subprocess can load."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path / "deep-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))


def _prune(model_dir, method, ids, out, **kwargs):
    return besa.prune(
        str(model_dir), method=method, sparsity=0.5, calib_ids=ids, out=out, progress=False, forward_batch=2,
        method_options=OPTIONS[method], **kwargs,
    )  # fmt: skip


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from safetensors.torch import load_file
    import besa, besa.engine.checkpoint
    from besa.registry import get_method

    model_dir, method, where, kill_at, out, options = sys.argv[1:7]
    kill_at = int(kill_at)
    if where == "prune":  # killed while block `kill_at` is being pruned
        cls = get_method(method).pruner_cls
        original = cls.prune_block
        def prune_block(self, work):
            if work.index == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, work)
        cls.prune_block = prune_block
    else:  # killed inside the checkpoint of block `kill_at`, after its files, before run.json
        original = besa.engine.checkpoint.write_json_atomic
        def write_json(path, payload, **kwargs):
            if payload.get("completed") == kill_at + 1:  # run.json, the commit point
                os.kill(os.getpid(), signal.SIGKILL)
            return original(path, payload, **kwargs)
        besa.engine.checkpoint.write_json_atomic = write_json
    import json
    besa.prune(model_dir, method=method, sparsity=0.5, calib_ids=load_file(sys.argv[7])["ids"], out=out,
               progress=False, forward_batch=2, method_options=json.loads(options))
    """
)


@pytest.mark.parametrize(
    ("method", "where", "seed"),
    [("besa", "prune", 11), ("besa", "commit", 12), ("sparsegpt", "prune", 13), ("sparsegpt", "commit", 14),
     ("sparsegpt", "commit", None)],
)  # fmt: skip
def test_a_killed_run_resumes_to_bit_identical_weights(method, where, seed, deep_model_dir, ids, tmp_path):
    # a random block, fixed per case so failures reproduce; None: inside the very first checkpoint
    kill_at = 0 if seed is None else random.Random(seed).randint(1, LAYERS - 1)
    ids_path = tmp_path / "ids.safetensors"
    save_file({"ids": ids}, str(ids_path))
    out = tmp_path / "resumed"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(deep_model_dir), method, where, str(kill_at), str(out),
         json.dumps(OPTIONS[method]), str(ids_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    run_dir = tmp_path / "resumed.run"
    if kill_at:
        state = json.loads((run_dir / RUN_FILE).read_text())
        assert state["completed"] == kill_at and not out.exists()
    else:  # block 0's files are there, but no run.json: a rerun starts afresh in the same folder
        assert (run_dir / "blocks").is_dir() and not (run_dir / RUN_FILE).exists()

    resumed = _prune(deep_model_dir, method, ids, out, resume=kill_at > 0)
    reference = _prune(deep_model_dir, method, ids, tmp_path / "reference")
    assert resumed.report["run"]["resumed_blocks"] == kill_at
    assert reference.report["run"]["resumed_blocks"] == 0
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.report["layers"] == reference.report["layers"]
    if (
        method == "besa"
    ):  # the learned allocations of the blocks done before the kill come back from the checkpoint
        assert resumed.report["method"]["blocks"] == reference.report["method"]["blocks"]
    assert not run_dir.exists()  # deleted once the model is saved


def test_same_command_and_seed_give_identical_masks_twice(deep_model_dir, ids, tmp_path):
    a = _prune(deep_model_dir, "besa", ids, tmp_path / "a").model.state_dict()
    b = _prune(deep_model_dir, "besa", ids, tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k] == 0, b[k] == 0) and torch.equal(a[k], b[k]) for k in a)


def test_a_run_folder_of_another_run_is_refused(deep_model_dir, ids, tmp_path):
    run_dir = tmp_path / "run"
    _prune(deep_model_dir, "wanda", ids, None, run_dir=run_dir)  # no --out: the run folder stays
    assert json.loads((run_dir / RUN_FILE).read_text())["completed"] == LAYERS
    with pytest.raises(BesaError, match="belongs to another run.*sparsity"):
        besa.prune(
            str(deep_model_dir), method="wanda", sparsity=0.6, calib_ids=ids, run_dir=run_dir, progress=False,
            forward_batch=2,
        )  # fmt: skip
    with pytest.raises(BesaError, match="belongs to another run.*calibration"):
        _prune(deep_model_dir, "wanda", ids[:, :8], None, run_dir=run_dir)
    other = tmp_path / "other-model"
    model = transformers.AutoModelForCausalLM.from_pretrained(deep_model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    with pytest.raises(BesaError, match="belongs to another run.*model.weights"):
        _prune(other, "wanda", ids, None, run_dir=run_dir)


def test_a_foreign_folder_is_not_taken_as_a_run_folder(deep_model_dir, ids, tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "thesis.tex").write_text("precious")
    with pytest.raises(BesaError, match="holds 'thesis.tex' and no run.json"):
        _prune(deep_model_dir, "wanda", ids, None, run_dir=run_dir)
    assert (run_dir / "thesis.tex").read_text() == "precious"


def test_resume_without_a_checkpoint_and_unwritable_places_are_refused(deep_model_dir, ids, tmp_path):
    with pytest.raises(BesaError, match="nothing to resume"):
        _prune(deep_model_dir, "wanda", ids, tmp_path / "out", resume=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BesaError, match="cannot write --out .*is a file, not a folder"):
        _prune(deep_model_dir, "wanda", ids, blocker / "out")
    with pytest.raises(BesaError, match="cannot write the run folder"):
        _prune(deep_model_dir, "wanda", ids, tmp_path / "out", run_dir=blocker / "run")
    with pytest.raises(BesaError, match="exists and is not a folder"):
        _prune(deep_model_dir, "wanda", ids, tmp_path / "out", run_dir=blocker)


def test_a_full_disk_fails_clearly_and_keeps_the_last_good_checkpoint(
    deep_model_dir, ids, tmp_path, monkeypatch
):
    original = besa.engine.checkpoint_files.replace_with

    def full_disk(path, write, durable=False):
        if path.parent.name == "blocks" and "00002" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, write, durable)

    monkeypatch.setattr(besa.engine.checkpoint_files, "replace_with", full_disk)
    out = tmp_path / "out"
    needs = r"the disk is full \(it needs about [0-9.]+ KiB free\); block 1 is the last good checkpoint"
    with pytest.raises(BesaError, match="checkpoint of block 2 .*" + needs):
        _prune(deep_model_dir, "sparsegpt", ids, out)
    run_dir = tmp_path / "out.run"
    state = json.loads((run_dir / RUN_FILE).read_text())
    assert state["completed"] == 2 and not out.exists()
    assert not list(run_dir.rglob(".*.tmp"))  # no half-written file left behind
    monkeypatch.setattr(besa.engine.checkpoint_files, "replace_with", original)
    resumed = _prune(deep_model_dir, "sparsegpt", ids, out)
    reference = _prune(deep_model_dir, "sparsegpt", ids, tmp_path / "reference")
    assert resumed.report["run"]["resumed_blocks"] == 2
    a, b = resumed.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_holds_only_safetensors_and_json(deep_model_dir, ids, tmp_path):
    run_dir = tmp_path / "run"
    _prune(deep_model_dir, "besa", ids, None, run_dir=run_dir, checkpoint=True)
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != RUN_MARKER]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files)
    assert (run_dir / RUN_MARKER).stat().st_size == 0  # the marker that the folder is besa's: empty
    assert len(list((run_dir / "blocks").iterdir())) == LAYERS
    assert not [p for p in run_dir.iterdir() if p.name.startswith("acts-")]  # nothing left to propagate


def test_no_checkpoint_writes_no_run_folder(deep_model_dir, ids, tmp_path):
    _prune(deep_model_dir, "wanda", ids, tmp_path / "out", checkpoint=False)
    assert not (tmp_path / "out.run").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_the_kl_stage_resumes_from_finished_blocks_with_the_dense_models_targets(
    deep_model_dir, ids, tmp_path
):
    """The KL stage comes after the checkpointed blocks: a run folder whose blocks are all done resumes into it
    (its settings are not part of the fingerprint), and its targets are still the dense model's, taken before the
    engine restores the pruned blocks: the same losses and weights as a run from scratch."""
    run_dir = tmp_path / "run"
    _prune(deep_model_dir, "wanda", ids, None, run_dir=run_dir)  # no --out: the run folder stays
    kl = {"kl_epochs": 2, "kl_lr": 1e-3, "kl_topk": 8, "kl_holdout": 2, "kl_batch": 2}
    resumed = besa.prune(str(deep_model_dir), method="wanda", sparsity=0.5, calib_ids=ids, run_dir=run_dir,
                         resume=True, progress=False, forward_batch=2, **kl)  # fmt: skip
    fresh = besa.prune(str(deep_model_dir), method="wanda", sparsity=0.5, calib_ids=ids, progress=False,
                       forward_batch=2, checkpoint=False, **kl)  # fmt: skip
    assert resumed.report["run"]["resumed_blocks"] == LAYERS
    assert resumed.report["kl"] == fresh.report["kl"]
    a, b = resumed.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["besa", "sparsegpt"])
def test_redo_from_a_tampered_block_replays_the_good_ones_and_ends_bit_identical(
    method, deep_model_dir, ids, tmp_path, monkeypatch
):
    import besa.methods.base

    original = besa.methods.base.Pruner.run_block
    draws: dict[str, dict[int, float]] = {"stopped": {}, "redone": {}, "reference": {}}
    run = "stopped"

    def drawing(self, work):  # each block draws from the RNG, as a method that samples would
        draws[run][work.index] = torch.rand(1).item()
        if run == "stopped" and work.index == 3:
            raise KeyboardInterrupt
        return original(self, work)

    monkeypatch.setattr(besa.methods.base.Pruner, "run_block", drawing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _prune(deep_model_dir, method, ids, out)
    block = tmp_path / "out.run" / "blocks" / "00001.safetensors"
    data = bytearray(block.read_bytes())
    data[-4] ^= 0x01  # one bit of one weight
    block.write_bytes(bytes(data))
    with pytest.raises(BesaError, match=r"block 1 .*was changed.*block 0 is intact.*--redo-from 1"):
        _prune(deep_model_dir, method, ids, out)
    with pytest.raises(BesaError, match="only blocks 0-2 .* are done"):
        _prune(deep_model_dir, method, ids, out, redo_from=4)
    run = "redone"
    redone = _prune(deep_model_dir, method, ids, out, redo_from=1)
    run = "reference"
    reference = _prune(deep_model_dir, method, ids, tmp_path / "reference")
    assert sorted(draws["redone"]) == [1, 2, 3]  # block 0 was replayed, not pruned
    assert [draws["redone"][i] for i in (1, 2, 3)] == [draws["reference"][i] for i in (1, 2, 3)]
    a, b = redone.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert redone.report["layers"] == reference.report["layers"]
