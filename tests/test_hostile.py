"""Hostile inputs and faults against what ``besa prune`` writes: every case is one line on stderr, a non-zero exit,
and the input model, unrelated files and any earlier output byte-identical afterwards (bad model and text files
are in ``test_hostile_files.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from besa.settings.options import RUN_FILE
from conftest import one_line_error, run_cli, snapshot

FAST = ["--method", "magnitude", "--sparsity", "0.5", "--no-progress"]
CALIBRATED = ["--method", "wanda", "--nsamples", "2", "--seqlen", "16", "--no-progress"]


@pytest.fixture
def parent(tmp_path: Path, model_dir: Path) -> Path:
    """A folder holding the input model and an unrelated file of the user's."""
    folder = tmp_path / "parent"
    folder.mkdir()
    model_dir.rename(folder / "model")
    (folder / "notes.txt").write_text("My notes about many things, used as calibration text too. " * 40)
    return folder


def _refused(capsys, root: Path, *argv, needle: str, code: int = 2) -> str:
    """Run ``besa ARGV``; assert one line with ``needle``, exit ``code``, and nothing below ``root`` changed."""
    before = snapshot(root)
    got, _, err = run_cli(capsys, *argv)
    line = one_line_error(err)
    assert got == code, err
    assert needle in line, line
    assert snapshot(root) == before
    return line


OVERLAPS = [
    # (--out, extra flags, needle): relative to the parent folder that holds model/ and notes.txt
    (".", ["--overwrite"], "holds the input model"),
    (".", [], "holds the input model"),
    ("model", ["--overwrite"], "is the input model"),
    ("model", [], "is the input model"),
    ("model/pruned", [], "lies inside the input model"),
    ("link-to-model", ["--overwrite"], "is the input model"),  # a symlink: resolved
    ("elsewhere", ["--run-dir", "model/run"], "--run-dir"),
    ("elsewhere", ["--run-dir", "."], "holds the input model"),
    ("elsewhere", ["--run-dir", "elsewhere"], "is --out"),
    ("elsewhere", ["--run-dir", "elsewhere/run"], "lies inside --out"),
]


@pytest.mark.parametrize("out,flags,needle", OVERLAPS)
def test_out_and_run_dir_never_touch_the_input_model(capsys, parent, out, flags, needle):
    (parent / "link-to-model").symlink_to(parent / "model", target_is_directory=True)
    flags = [str(parent / f) if i and flags[i - 1] == "--run-dir" else f for i, f in enumerate(flags)]
    args = [
        "prune",
        parent / "model",
        *CALIBRATED,
        "--calib",
        parent / "notes.txt",
        "--out",
        parent / out,
        *flags,
    ]
    _refused(capsys, parent, *args, needle=needle)
    assert not (parent / "elsewhere").exists() and not (parent / "elsewhere.run").exists()


def test_out_holding_the_calibration_file_is_refused(capsys, parent, tmp_path):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "besa_report.json").write_text("{}")
    (out / "calib.txt").write_text("calibration text " * 50)
    args = ["prune", parent / "model", *CALIBRATED, "--calib", out / "calib.txt", "--out", out, "--overwrite"]
    _refused(capsys, tmp_path, *args, needle="holds the calibration file")


def test_overwrite_refuses_a_folder_besa_did_not_write_and_names_what_it_would_delete(
    capsys, parent, tmp_path
):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (theirs / name).write_text(name)
    args = ["prune", parent / "model", *FAST, "--out", theirs, "--overwrite"]
    line = _refused(capsys, tmp_path, *args, needle="was not written by besa")
    assert "'a.txt', 'b.txt', 'c.txt' and 1 more" in line


def test_overwrite_replaces_an_earlier_besa_output_and_a_failed_rerun_leaves_it_as_it_was(
    capsys, parent, tmp_path
):
    out = tmp_path / "out"
    assert run_cli(capsys, "prune", parent / "model", *FAST, "--out", out)[0] == 0
    assert (
        run_cli(capsys, "prune", parent / "model", *FAST, "--sparsity", "0.6", "--out", out, "--overwrite")[0]
        == 0
    )
    report = json.loads((out / "besa_report.json").read_text())
    assert report["config"]["sparsity"] == 0.6
    args = ["prune", parent / "model", *FAST, "--forward-batch", "0", "--out", out, "--overwrite"]
    line = _refused(capsys, tmp_path, *args, needle="--forward-batch must be a positive integer")
    assert "forward_batch" not in line


def _stop_at_block(monkeypatch, index: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
    """Make Wanda raise ``exc`` when it reaches block ``index``: a run stopped midway, its run folder kept."""
    import besa.methods.base

    original = besa.methods.base.Pruner.run_block

    def run_block(self, work):
        if work.index == index:
            raise exc
        return original(self, work)

    monkeypatch.setattr(besa.methods.base.Pruner, "run_block", run_block)


@pytest.fixture
def stopped_run(capsys, parent, tmp_path, monkeypatch) -> tuple[list, Path, Path]:
    """(the prune command, its --out, its run folder) after Ctrl-C at block 1 of 2: block 0 is checkpointed."""
    out = tmp_path / "out"
    argv = [
        "prune",
        str(parent / "model"),
        *CALIBRATED,
        "--calib",
        str(parent / "notes.txt"),
        "--out",
        str(out),
    ]
    with monkeypatch.context() as m:
        _stop_at_block(m, 1)
        code, _, err = run_cli(capsys, *argv)
    run_dir = tmp_path / "out.run"
    assert code == 130
    command = "besa " + " ".join([*argv[:1], *argv[1:], "--resume"])
    assert one_line_error(err) == (
        f"besa prune: interrupted; 1 finished block kept in {str(run_dir)!r}: continue with: {command}"
    )
    assert json.loads((run_dir / RUN_FILE).read_text())["completed"] == 1 and not out.exists()
    return argv, out, run_dir


def test_ctrl_c_midway_says_how_to_resume_and_that_command_finishes_the_run(capsys, stopped_run, tmp_path):
    argv, out, run_dir = stopped_run
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert json.loads((out / "besa_report.json").read_text())["run"]["resumed_blocks"] == 1
    assert not run_dir.exists()


def test_ctrl_c_at_start_up_is_one_line(capsys, monkeypatch, parent, tmp_path):
    import besa.cli

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(besa.cli, "build_parser", interrupted)
    code, _, err = run_cli(capsys, "prune", parent / "model", *FAST, "--out", tmp_path / "out")
    assert code == 130 and one_line_error(err) == "besa prune: interrupted; nothing was written"
    monkeypatch.undo()
    monkeypatch.setattr(besa.methods.magnitude.MagnitudePruner, "prepare", interrupted)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "prune", parent / "model", *FAST, "--out", tmp_path / "out")
    assert code == 130 and "nothing was" in one_line_error(err)
    assert snapshot(tmp_path) == before


def _edit_run(run_dir: Path, **changes) -> None:
    state = json.loads((run_dir / RUN_FILE).read_text())
    if "record" in changes:
        state["blocks"][0]["record"] = changes.pop("record")
    state.update(changes)
    (run_dir / RUN_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"activations": "VICTIM"}, "activations names"),  # an absolute path to a folder of the user's
        ({"activations": "../victim"}, "activations names"),
        ({"activations": "acts-00001/../../victim"}, "activations names"),
        ({"completed": 7}, "completed is 7, not a count of blocks from 0 to 2"),
        ({"completed": "1"}, "completed is '1'"),
        ({"blocks": []}, "lists 0 blocks for 1 completed"),
        ({"batches": -1}, "batches is -1"),
        ({"format": 1}, "made by another version of besa"),
        ({"fingerprint": ["not", "a", "dict"]}, "belongs to another run"),
        ({"record": {"layer_targets": [1]}}, "damaged"),  # block 0's record: its file is intact
    ],
)
def test_an_edited_run_json_is_refused_and_nothing_outside_the_run_folder_is_read_or_deleted(
    capsys, stopped_run, tmp_path, changes, needle
):
    argv, out, run_dir = stopped_run
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "inputs-00000.safetensors").write_bytes(
        (run_dir / "acts-00001" / "inputs-00000.safetensors").read_bytes()
    )
    (victim / "precious.txt").write_text("keep me\n")
    changes = {k: str(victim) if v == "VICTIM" else v for k, v in changes.items()}
    _edit_run(run_dir, **changes)
    line = _refused(capsys, tmp_path, *argv, "--resume", needle=needle)
    assert "damaged" in line or "another version" in line or "another run" in line


def _flip_bytes(path: Path, at: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "file,where,needle",
    [
        ("blocks/00000.safetensors", "end", "the checkpoint of block 0 (00000.safetensors) was changed"),
        ("blocks/00000.safetensors", "header", "the checkpoint of block 0 (00000.safetensors) was changed"),
        (
            "acts-00001/inputs-00000.safetensors",
            "end",
            "the activations of block 1 (inputs-00000.safetensors)",
        ),
        ("acts-00001/rng.safetensors", "end", "the activations of block 1 (rng.safetensors)"),
    ],
)
def test_a_tampered_checkpoint_is_caught_on_resume_and_names_the_block_to_redo_from(
    capsys, stopped_run, tmp_path, file, where, needle
):
    argv, out, run_dir = stopped_run
    path = run_dir / file
    _flip_bytes(path, len(path.read_bytes()) - 12 if where == "end" else 10)
    line = _refused(capsys, tmp_path, *argv, "--resume", needle=needle)
    block = int(line.split("--redo-from ")[1].split()[0])
    assert block == (0 if "blocks/" in file else 1)
    code, _, err = run_cli(capsys, *argv, "--redo-from", block)
    assert code == 0, err
    reference = tmp_path / "reference"
    assert run_cli(capsys, *argv[:-1], reference)[0] == 0
    got, want = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_remove_keeps_a_file_of_the_users_in_the_run_folder(capsys, stopped_run, tmp_path):
    argv, out, run_dir = stopped_run
    (run_dir / "mine.txt").write_text("not besa's\n")
    assert run_cli(capsys, *argv, "--resume")[0] == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["mine.txt"]


def test_a_link_in_the_run_folder_is_refused_and_its_target_untouched(capsys, stopped_run, tmp_path):
    argv, out, run_dir = stopped_run
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    (run_dir / "spill").symlink_to(victim, target_is_directory=True)
    _refused(capsys, tmp_path, *argv, "--resume", needle="holds a link 'spill'")


FILE_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from besa.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    "where,flags,what",
    [
        ("output", ["--no-checkpoint"], "the pruned model"),
        ("checkpoint", [], "the checkpoint of block 0"),
        ("spill", ["--no-checkpoint", "--max-memory", "1KiB"], "spilled activations"),
    ],
)
def test_a_full_disk_is_one_line_saying_how_much_space_is_needed(parent, tmp_path, where, flags, what):
    out, temp = tmp_path / "out", tmp_path / "temp"
    temp.mkdir()
    flags = [*CALIBRATED, "--calib", str(parent / "notes.txt"), *flags]
    before = snapshot(parent)
    child = subprocess.run(
        [sys.executable, "-c", FILE_LIMIT, str(64 * 1024 if where != "spill" else 4096), "prune",
         str(parent / "model"), *flags, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BESA_LOG_LEVEL": "ERROR", "TMPDIR": str(temp)},
    )  # fmt: skip
    assert child.returncode == 2, child.stderr
    line = one_line_error(child.stderr)
    assert f"cannot write {what}" in line and "a file-size limit was reached (it needs about" in line, line
    assert not out.exists() and snapshot(parent) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary sibling left
    assert not list(temp.iterdir())  # the spill folder is gone


def test_auto_map_is_dropped_when_its_code_is_not_saved(capsys, parent, tmp_path):
    config = json.loads((parent / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (parent / "model" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", parent / "model", *FAST, "--out", out)
    assert code == 0, err
    assert "auto_map" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize(
    "stream,needle",
    [
        (True, "'../outside.safetensors', not a file of its own folder"),  # besa's own reader
        (False, "points outside the model directory"),  # transformers' loader refuses it too
    ],
)
def test_a_shard_index_naming_a_file_outside_the_model_folder_is_refused(
    capsys, parent, tmp_path, stream, needle
):
    model = parent / "model"
    names = list(load_file(str(model / "model.safetensors")))
    (parent / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(names, "../outside.safetensors")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    flags = ["--stream"] if stream else []
    args = ["prune", model, *FAST, *flags, "--out", tmp_path / "out"]
    _refused(capsys, tmp_path, *args, needle=needle)


def test_a_sparse_folder_naming_weights_outside_it_is_refused(capsys, parent, tmp_path):
    out = tmp_path / "sparse"
    assert run_cli(capsys, "prune", parent / "model", *FAST, "--save-format", "sparse", "--out", out)[0] == 0
    meta = json.loads((out / "sparse_format.json").read_text())
    (out / meta["weights"]).rename(tmp_path / "outside.safetensors")
    meta["weights"] = "../outside.safetensors"
    (out / "sparse_format.json").write_text(json.dumps(meta))
    args = [
        "eval",
        out,
        "--ppl",
        parent / "notes.txt",
        "--seqlen",
        "16",
        "--max-windows",
        "1",
        "--no-progress",
    ]
    _refused(capsys, tmp_path, *args, needle="names '../outside.safetensors', not a file of its own folder")


def test_links_inside_the_run_folder_never_lead_a_write_or_a_read_elsewhere(capsys, stopped_run, tmp_path):
    argv, out, run_dir = stopped_run
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    # a leftover temporary name that points at the user's file: the next write replaces the name, not the file
    (run_dir / "blocks" / ".00001.safetensors.tmp").symlink_to(victim)
    (run_dir / "acts-00001" / ".sha256.json.tmp").symlink_to(victim)
    code, _, err = run_cli(capsys, *argv, "--resume", "--keep-run-dir")
    assert code == 0, err
    assert victim.read_text() == "keep me\n"
    # a block file that is a link (to the user's file, or to a device) is damage, never read
    block = run_dir / "blocks" / "00000.safetensors"
    block.unlink()
    block.symlink_to(victim)
    again = [*argv[:-1], str(tmp_path / "again"), "--run-dir", str(run_dir), "--resume"]
    _refused(capsys, tmp_path, *again, needle="00000.safetensors is not a regular file")


def test_a_user_folder_with_run_json_or_a_fake_report_is_not_besas_to_overwrite_or_clean(
    capsys, parent, tmp_path
):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "run.json").write_text("{}")  # a common name: no proof besa wrote the folder
    (theirs / "besa_report.json").write_text("not a report")
    args = ["prune", parent / "model", *FAST, "--out", theirs, "--overwrite"]
    _refused(capsys, tmp_path, *args, needle="was not written by besa")
    mine = (
        tmp_path / "mine"
    )  # a run folder of the user's own, with names besa also uses, but not besa's marker
    (mine / "blocks").mkdir(parents=True)
    (mine / "blocks" / "thesis.tex").write_text("precious")
    args = ["prune", parent / "model", *CALIBRATED, "--calib", parent / "notes.txt", "--out", tmp_path / "out",
            "--run-dir", mine]  # fmt: skip
    _refused(capsys, tmp_path, *args, needle="holds 'blocks' and no run.json")


def test_the_resume_command_after_ctrl_c_names_the_real_run_folder_and_redoes_nothing(
    capsys, parent, tmp_path, monkeypatch
):
    out = f"{tmp_path / 'out'}/"  # a trailing slash: the run folder is still out.run beside it
    argv = ["prune", str(parent / "model"), *CALIBRATED, "--calib", str(parent / "notes.txt"), "--out", out]
    with monkeypatch.context() as m:
        _stop_at_block(m, 1)
        assert run_cli(capsys, *argv)[0] == 130
        code, _, err = run_cli(capsys, *argv, "--redo-from", "0")
    line = one_line_error(err)
    assert code == 130 and f"kept in {str(tmp_path / 'out.run')!r}" in line
    assert line.endswith(f"continue with: besa {' '.join(argv)} --resume")  # no --redo-from 0 in it


def test_a_corrupt_gzip_body_is_one_line(capsys, parent, tmp_path):
    import gzip

    data = bytearray(gzip.compress(b'{"text": "some calibration text"}\n' * 200))
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "calib.jsonl.gz"
    bad.write_bytes(bytes(data))
    args = ["prune", parent / "model", *CALIBRATED, "--calib", bad, "--out", tmp_path / "out"]
    _refused(capsys, tmp_path, *args, needle="cannot read")
