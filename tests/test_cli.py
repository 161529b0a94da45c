"""The command line: bad input is one line on stderr, exit status 2, and nothing written."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from besa.cli import main


def _run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]


BAD_PRUNE = [
    (["/no/such/model"], "does not exist"),
    (["MODEL", "--method", "nope"], "unknown method 'nope'"),
    (["MODEL", "--calib", "nope"], "unknown calibration source 'nope'"),
    (["MODEL", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["MODEL", "--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["MODEL", "--pattern", "4:2"], "need 0 < N < M"),
    (["MODEL", "--pattern", "2:2"], "need 0 < N < M"),
    (["MODEL", "--pattern", "two:four"], "expected N:M"),
    (["MODEL", "--pattern", "3:7", "--method", "magnitude"], "does not divide the input width"),
    (["MODEL", "--pattern", "2:4", "--sparsity", "0.6"], "contradicts"),
    (["MODEL", "--method", "wanda", "--blocksize", "64"], "--blocksize does not apply to --method wanda"),
    (
        ["MODEL", "--device", "cuda:0"] if not torch.cuda.is_available() else ["MODEL", "--device", "tpu"],
        "device",
    ),
    (["MODEL", "--sparsity", "abc"], "invalid float value"),
    (["MODEL", "--max-memory", "lots"], "invalid memory size"),
    (["MODEL", "--resume"], "nothing to resume"),
    (["MODEL", "--resume", "--no-checkpoint"], "resume needs checkpoints"),
]


@pytest.mark.parametrize("argv,needle", BAD_PRUNE)
def test_bad_prune_input_exits_2_with_one_line_and_writes_nothing(
    capsys, tmp_path, model_dir, calib_txt, argv, needle
):
    out = tmp_path / "out"
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    calib = [] if "--calib" in argv else ["--calib", str(calib_txt)]  # a case may bring its own --calib
    code, _, err = _run(capsys, "prune", *argv, *calib, "--seqlen", "16", "--out", str(out), "--no-progress")
    _assert_one_line_error(code, err, needle)
    assert not out.exists() and not (tmp_path / "out.run").exists()


def test_out_not_empty_without_overwrite(capsys, tmp_path, model_dir, calib_txt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    code, _, err = _run(capsys, "prune", str(model_dir), "--calib", str(calib_txt), "--out", str(out))
    _assert_one_line_error(code, err, "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["x"]


def test_jsonl_without_text_field(capsys, tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "no text here"}) + "\n")
    code, _, err = _run(capsys, "prune", str(model_dir), "--calib", str(bad), "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "line 1 has no string field 'text'")
    assert not (tmp_path / "o").exists()


def test_missing_calibration_file(capsys, tmp_path, model_dir):
    code, _, err = _run(
        capsys, "prune", str(model_dir), "--calib", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")
    )
    _assert_one_line_error(code, err, "does not exist")


def test_eval_unknown_dataset_and_missing_model(capsys, model_dir):
    code, _, err = _run(capsys, "eval", str(model_dir), "--ppl", "nope")
    _assert_one_line_error(code, err, "unknown evaluation dataset 'nope'")
    code, _, err = _run(capsys, "eval", "./nowhere", "--ppl", "wikitext2")
    _assert_one_line_error(code, err, "does not exist")


def test_prune_then_eval_end_to_end(capsys, tmp_path, model_dir, calib_txt, data_dir):
    out = tmp_path / "pruned"
    code, stdout, _ = _run(
        capsys, "prune", str(model_dir), "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(calib_txt),
        "--nsamples", "4", "--seqlen", "32", "--blocksize", "32", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0 and "50.0000% zeros" in stdout
    report = json.loads((out / "besa_report.json").read_text())
    assert report["config"]["pattern"] == "2:4" and report["method_options"]["blocksize"] == 32
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.down_proj.weight  # fine in a test: we know this tiny model's layout
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()

    js = tmp_path / "ppl.json"
    code, stdout, _ = _run(
        capsys,
        "eval",
        str(out),
        "--ppl",
        "wikitext2,ptb",
        "--seqlen",
        "8",
        "--json",
        str(js),
        "--no-progress",
    )
    assert code == 0
    payload = json.loads(js.read_text())
    assert set(payload) == {"wikitext2", "ptb"}
    assert payload["ptb"]["seqlen"] == 8 and payload["ptb"]["tokens"] == 8 * payload["ptb"]["windows"]
    assert f"{payload['wikitext2']['ppl']:.3f}" in stdout


def test_help_has_examples(capsys):
    code, out, _ = _run(capsys, "prune", "--help")
    assert code == 0 and "examples:" in out and "--pattern" in out and "--percdamp" in out


def test_report_draws_the_allocation(capsys, tmp_path, model_dir, calib_txt):
    out = tmp_path / "pruned"
    code, _, _ = _run(
        capsys, "prune", str(model_dir), "--method", "besa", "--sparsity", "0.6", "--calib", str(calib_txt),
        "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0
    png = out / "besa_allocation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end of prune
    png.unlink()
    code, stdout, _ = _run(capsys, "report", str(out))
    assert code == 0 and png.is_file() and "mlp.down_proj" in stdout and "besa at target 0.6" in stdout


def test_report_on_a_folder_without_report(capsys, tmp_path):
    code, _, err = _run(capsys, "report", str(tmp_path))
    _assert_one_line_error(code, err, "holds no besa_report.json")


def test_two_methods_may_declare_a_flag_of_the_same_name(monkeypatch):
    """A second method with ``lr`` (as BESA has) neither breaks the parser nor steals BESA's value."""
    from dataclasses import dataclass, field

    from besa import registry
    from besa.cli.commands import cmd_prune
    from besa.cli.parser import build_parser
    from besa.methods.wanda import WandaPruner
    from besa.settings.config import MethodConfig

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass
    class OtherConfig(MethodConfig):
        lr: float | None = field(default=0.5, metadata={"help": "other: its own learning rate"})

    registry.register_method("other-lr", OtherConfig, "a test method")(
        type("OtherPruner", (WandaPruner,), {})
    )
    parser = build_parser()  # used to raise argparse.ArgumentError (conflicting option string --lr)
    args = parser.parse_args(["prune", "m", "--method", "other-lr", "--lr", "0.25", "--out", "o"])
    seen = {}

    class Called(Exception):
        pass

    def fake_prune_with(model, config, method_config, options):
        seen["method_config"] = method_config
        raise Called

    monkeypatch.setattr("besa.api.prune_with", fake_prune_with)
    with pytest.raises(Called):
        cmd_prune(args)
    assert isinstance(seen["method_config"], OtherConfig) and seen["method_config"].lr == 0.25
    besa_args = parser.parse_args(["prune", "m", "--method", "besa", "--lr", "0.05", "--out", "o"])
    with pytest.raises(Called):
        cmd_prune(besa_args)
    assert type(seen["method_config"]).__name__ == "BesaConfig" and seen["method_config"].lr == 0.05


@pytest.mark.parametrize("extra", [["--method", "magnitude"], ["--method", "wanda", "--no-checkpoint"]])
@pytest.mark.parametrize("place", ["under-a-file", "proc"])
def test_an_unwritable_out_is_refused_before_the_model_is_loaded(
    capsys, tmp_path, model_dir, calib_txt, monkeypatch, extra, place
):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    out = blocker / "sub" if place == "under-a-file" else "/proc/besa-out"

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("besa.model.loading.load_model", no_loading)
    code, _, err = _run(capsys, "prune", str(model_dir), *extra, "--calib", str(calib_txt), "--out", str(out))
    _assert_one_line_error(code, err, "cannot write --out")
    assert blocker.read_text() == "keep"


def test_help_and_argument_errors_import_no_torch():
    """`besa --help` and a bad setting answer without importing torch or transformers (seconds on a laptop)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from besa.cli import main\n"
        "for argv in (['prune', '--help'], ['eval', '--help'], ['prune', 'm', '--sparsity', '2', '--out', 'o'],\n"
        "             ['prune', 'm', '--method', 'nope', '--out', 'o']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'safetensors'})\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out[-500:]


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0")])
def test_a_command_asks_torch_for_huge_pages_unless_the_user_said_otherwise(monkeypatch, capsys, given, seen):
    """The console script sets ``THP_MEM_ALLOC_ENABLE`` for its own process (before torch is imported); a value
    already in the environment is the user's and stays."""
    from besa.cli import HUGE_PAGES

    if given is None:
        monkeypatch.delenv(HUGE_PAGES, raising=False)
    else:
        monkeypatch.setenv(HUGE_PAGES, given)
    code, _, _ = _run(capsys, "prune", "m", "--method", "nope", "--out", "o")
    assert code == 2 and os.environ[HUGE_PAGES] == seen


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_seqlen_beyond_the_models_positions_is_refused_before_loading(
    capsys, tmp_path, model_dir, calib_txt, monkeypatch, command
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --seqlen was checked")

    monkeypatch.setattr("besa.model.loading.load_model", no_loading)
    extra = ["--calib", str(calib_txt), "--out", str(tmp_path / "out")] if command == "prune" else []
    code, _, err = _run(capsys, command, str(model_dir), "--seqlen", "100000", *extra)
    _assert_one_line_error(code, err, "--seqlen 100000 is beyond the 128 positions")
    assert not (tmp_path / "out").exists()


def test_without_a_terminal_each_block_logs_a_line(tmp_path, model_dir, calib_txt):
    """Output going to a file: tqdm stays quiet, and a line per block (i/N, seconds, BESA's loss) says how far it is."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "besa.cli", "prune", str(model_dir), "--method", "besa", "--optimizer", "adamw",
           "--calib", str(calib_txt), "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    for i in (1, 2):
        assert any(f"block {i}/2 (model.layers.{i - 1}) done in" in line for line in lines), done.stderr[
            -2000:
        ]
        assert any(f"model.layers.{i - 1}: BESA loss" in line for line in lines)


def test_prune_and_eval_say_how_much_work_is_ahead(capsys, tmp_path, model_dir, calib_txt, data_dir):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "prune", str(model_dir), "--calib", str(calib_txt), "--nsamples", "3", "--seqlen",
                        "16", "--out", str(out))  # fmt: skip
    assert code == 0
    assert "3 calibration windows x 16 tokens = 48 tokens through every block" in err
    code, _, err = _run(
        capsys, "prune", str(model_dir), "--method", "magnitude", "--out", str(tmp_path / "m")
    )
    assert code == 0 and "magnitude needs no calibration data" in err
    code, _, err = _run(capsys, "eval", str(out), "--ppl", "wikitext2", "--seqlen", "8", "--max-windows", "2")
    assert code == 0 and "wikitext2: 2 windows x 8 tokens" in err


def test_eval_help_names_the_split_form(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "NAME:SPLIT (ptb:valid)" in capsys.readouterr().out


def test_eval_any_text_file_is_named_by_its_file_name(capsys, tmp_path, model_dir, data_dir):
    """``--ppl`` takes .jsonl (``text`` field) and .txt files: documents joined with blank lines, the same
    windows protocol, results keyed by the file's name; a missing or empty file is a one-line error."""
    import torch
    from transformers import AutoTokenizer

    from besa.evaluation.perplexity import eval_windows, perplexity

    docs = ["The first document has a few words.", "A second one, shorter.", "And a third to close."]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(docs))
    js = tmp_path / "ppl.json"
    code, stdout, _ = _run(capsys, "eval", str(model_dir), "--ppl", f"wikitext2,{jsonl},{txt}", "--seqlen", "4",
                           "--json", str(js), "--no-progress")  # fmt: skip
    assert code == 0 and "docs.jsonl" in stdout and "notes.txt" in stdout
    payload = json.loads(js.read_text())
    assert set(payload) == {"wikitext2", "docs.jsonl", "notes.txt"}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"])
    expected = perplexity(
        AutoModelForCausalLM.from_pretrained(model_dir), eval_windows(ids, 4), progress=False
    )
    assert payload["docs.jsonl"]["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
    assert payload["notes.txt"] == payload["docs.jsonl"]
    code, _, err = _run(capsys, "eval", str(model_dir), "--ppl", str(tmp_path / "missing.jsonl"))
    _assert_one_line_error(code, err, "evaluation file")
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = _run(capsys, "eval", str(model_dir), "--ppl", str(tmp_path / "empty.txt"))
    _assert_one_line_error(code, err, "holds no text")


def test_eval_bos_modes_are_reported_and_checked(capsys, tmp_path, model_dir, data_dir):
    js = tmp_path / "ppl.json"
    code, _, _ = _run(capsys, "eval", str(model_dir), "--ppl", "ptb", "--seqlen", "4", "--bos", "never", "--json",
                      str(js), "--no-progress")  # fmt: skip
    assert code == 0 and json.loads(js.read_text())["ptb"]["bos"] is False
    code, _, err = _run(capsys, "eval", str(model_dir), "--ppl", "ptb", "--seqlen", "4", "--bos", "always")
    _assert_one_line_error(code, err, "no BOS token")
    code, _, err = _run(capsys, "eval", str(model_dir), "--bos", "maybe")
    _assert_one_line_error(code, err, "unknown --bos")


def test_eval_zero_shot_table_and_json(capsys, tmp_path, model_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    js = tmp_path / "zs.json"
    code, stdout, _ = _run(capsys, "eval", str(model_dir), "--ppl", "none", "--tasks", "toy_choice", "--task-dir",
                           str(root / "tests" / "data" / "zeroshot"), "--json", str(js), "--no-progress")  # fmt: skip
    assert code == 0 and "toy_choice" in stdout and "mean" in stdout and "acc/acc_norm" in stdout
    payload = json.loads(js.read_text())
    assert set(payload) == {"zero_shot"} and set(payload["zero_shot"]) == {"toy_choice", "mean"}
    assert 0 <= payload["zero_shot"]["toy_choice"]["acc"] <= 1
    code, _, err = _run(capsys, "eval", str(model_dir), "--ppl", "none")
    _assert_one_line_error(code, err, "nothing to evaluate")


def test_eval_tasks_flag_alone_means_the_papers_six():
    import argparse

    from besa.cli.parser import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "m", "--tasks"]).tasks == ("paper",)
    assert parser.parse_args(["eval", "m", "--tasks", "piqa,boolq"]).tasks == ("piqa", "boolq")
    assert not hasattr(parser.parse_args(["eval", "m"]), "tasks")  # the dataclass default (none) applies
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "(default: )" not in sub.choices["eval"].format_help()


@pytest.fixture
def einsum_moe_dir(tmp_path):
    """A tiny MoE whose experts are 3-D tensors its own forward multiplies in an ``einsum`` over every expert, a
    layout no method can prune (``conftest.EinsumExperts``)."""
    from conftest import make_einsum_moe, make_tokenizer

    path = tmp_path / "tiny-einsum-moe"
    make_einsum_moe().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_weights_no_method_prunes_stop_the_run_before_work_or_stay_dense_on_purpose(
    capsys, tmp_path, einsum_moe_dir, calib_txt
):
    from conftest import one_line_error, snapshot

    out = tmp_path / "out"
    argv = [
        "prune",
        einsum_moe_dir,
        "--method",
        "wanda",
        "--calib",
        calib_txt,
        "--nsamples",
        "2",
        "--seqlen",
        "16",
    ]
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, *[str(a) for a in argv], "--out", str(out), "--no-progress")
    assert code == 2 and snapshot(tmp_path) == before
    line = one_line_error(err)
    assert (
        "model.layers.0.mlp.w_in [4, 32, 64]" in line
        and "used by einsum" in line
        and "--leave-unknown-dense" in line
    )
    code, printed, err = _run(
        capsys, *[str(a) for a in argv], "--out", str(out), "--no-progress", "--leave-unknown-dense"
    )
    assert code == 0, err
    assert (
        "6 block weights" in err and "stay dense: 4 unknown layouts, 2 routers" in err
    )  # said before the work
    report = json.loads((out / "besa_report.json").read_text())
    dense = {d["name"]: (d["kind"], d["rule"]) for d in report["weights"]["dense"]}
    assert dense["model.layers.1.mlp.router.weight"] == ("kept", "router")
    assert dense["model.layers.0.mlp.w_out"] == ("unknown", "unknown layout")
    whys = {d["name"]: d.get("why") for d in report["weights"]["dense"]}
    assert (
        whys["model.layers.0.mlp.w_out"]
        == "model.layers.0.mlp.w_out is used by einsum, not as one expert's matrix"
    )
    s = report["sparsity"]
    linears = sum(v["numel"] for v in report["layers"].values())
    assert (
        s["block_weights_numel"] > linears
        and s["block_weights_pruned_share"] == linears / s["block_weights_numel"]
    )
    assert s["block_weights"] == pytest.approx(0.5 * s["block_weights_pruned_share"], rel=1e-3)
    assert f"{s['block_weights']:.2%} of all block weights (6 block weights kept dense)" in printed
