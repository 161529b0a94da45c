"""Recipe files: every run writes its resolved recipe, and running that recipe again gives the same bits."""

import pytest
import yaml
from safetensors.torch import load_file

from besa.cli import main
from besa.errors import BesaError
from besa.settings.recipe import RECIPE_NAME, load_recipe


@pytest.fixture
def calib_txt(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("Some calibration text about many things, sentences and numbers 1 2 3. " * 40)
    return path


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "sparsegpt", "--pattern", "2:4", "--blocksize", "32"],
        [
            "--method",
            "besa",
            "--sparsity",
            "0.6",
            "--optimizer",
            "adamw",
            "--lr",
            "0.05",
            "--granularity",
            "layer",
        ],
        ["--method", "wanda", "--sparsity", "0.5", "--wbits", "4", "--group-size", "32"],
    ],
)
def test_a_saved_recipe_reruns_the_run_bit_for_bit(tmp_path, model_dir, calib_txt, flags):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "16", "--no-progress"]
    assert main(["prune", str(model_dir), *flags, *common, "--out", str(first)]) == 0
    recipe = yaml.safe_load((first / RECIPE_NAME).read_text())
    assert recipe["method"] == flags[1] and recipe["prune"]["nsamples"] == 4
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--recipe",
                str(first / RECIPE_NAME),
                "--out",
                str(second),
                "--no-progress",
            ]
        )
        == 0
    )
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert (second / RECIPE_NAME).read_text() == (first / RECIPE_NAME).read_text()


def test_flags_given_with_a_recipe_override_it(tmp_path, model_dir, calib_txt):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"besa_recipe: 1\nmethod: wanda\nprune: {{sparsity: 0.5, calib: {calib_txt}, nsamples: 2, seqlen: 16}}\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--recipe",
                str(path),
                "--sparsity",
                "0.25",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert yaml.safe_load((out / RECIPE_NAME).read_text())["prune"]["sparsity"] == 0.25
    path.write_text(
        f"besa_recipe: 1\nmethod: sparsegpt\nprune: {{calib: {calib_txt}, nsamples: 2, seqlen: 16}}\n"
        "options: {blocksize: 64, percdamp: 0.05}\n"
    )
    out = tmp_path / "out2"
    argv = [
        "prune",
        str(model_dir),
        "--recipe",
        str(path),
        "--blocksize",
        "32",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    options = yaml.safe_load((out / RECIPE_NAME).read_text())["options"]
    assert options == {
        "blocksize": 32,
        "mask_block": 128,
        "percdamp": 0.05,
        "lsq_iters": 20,
        "obs_target": "pruned",
    }  # the flag wins, the rest: recipe (or the defaults)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("besa_recipe: 1\nprune: {sparsty: 0.5}\n", "unknown recipe key 'prune.sparsty'"),
        (
            "besa_recipe: 1\nmethod: besa\noptions: {blocksize: 64}\n",
            "unknown recipe key 'options.blocksize'",
        ),
        ("besa_recipe: 1\nstages: {}\n", "unknown recipe key 'stages'"),
        ("besa_recipe: 1\nprune: {sparsity: lots}\n", "'prune.sparsity' must be of type float"),
        ("besa_recipe: 1\nprune: {nsamples: 2.5}\n", "'prune.nsamples' must be of type int"),
        ("besa_recipe: 1\nmethod: nope\n", "unknown method 'nope'"),
        ("method: wanda\n", "'besa_recipe: 1' is missing"),
        ("besa_recipe: 1\nprune: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_key(tmp_path, model_dir, capsys, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(BesaError, match=needle.replace("[", r"\[")):
        load_recipe(path)
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), "--recipe", str(path), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0]
    assert not out.exists()


def test_a_run_on_given_token_ids_records_them_and_needs_them_back(tmp_path, tokenizer, calib_ids, capsys):
    import besa
    from conftest import make_model

    first = tmp_path / "first"
    besa.prune(
        make_model("llama"),
        tokenizer=tokenizer,
        method="sparsegpt",
        calib_ids=calib_ids,
        out=first,
        progress=False,
    )
    recipe = load_recipe(first / RECIPE_NAME)
    assert recipe.calibration_ids.startswith("sha256:")
    with pytest.raises(BesaError, match="pass the same calib_ids"):
        besa.prune(
            make_model("llama"), tokenizer=tokenizer, recipe=recipe, calib_ids=calib_ids[:3], progress=False
        )
    again = besa.prune(
        make_model("llama"), tokenizer=tokenizer, recipe=recipe, calib_ids=calib_ids, progress=False
    )
    saved = _tensors(first)
    assert all(saved[k].equal(v) for k, v in again.model.state_dict().items() if k in saved)


def test_the_builtin_paper_recipe_is_besa_as_the_paper_runs_it(tmp_path, model_dir, calib_txt):
    """``--recipe besa-paper`` pins the paper's settings whatever the defaults; flags beside it still override."""
    from besa.settings.recipe import builtin_recipes, load_recipe

    assert "besa-paper" in builtin_recipes()
    recipe = load_recipe("besa-paper")
    assert recipe.method == "besa"
    assert recipe.options["optimizer"] == "prodigy" and recipe.options["weight_update"] == "none"
    assert recipe.options["target"] == "pruned-input" and recipe.options["epochs"] == 1
    assert recipe.prune["refit_epochs"] == 0 and (recipe.prune["nsamples"], recipe.prune["seqlen"]) == (
        128,
        2048,
    )
    out = tmp_path / "out"
    argv = ["prune", str(model_dir), "--recipe", "besa-paper", "--calib", str(calib_txt), "--nsamples", "2",
            "--seqlen", "16", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((out / RECIPE_NAME).read_text())
    assert saved["method"] == "besa" and saved["options"]["optimizer"] == "prodigy"
    assert saved["prune"]["nsamples"] == 2 and saved["prune"]["refit_epochs"] == 0


def test_an_unknown_recipe_names_the_builtin_ones(tmp_path, model_dir, capsys):
    assert main(["prune", str(model_dir), "--recipe", "besa-papr", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert (
        "cannot read recipe 'besa-papr'" in err and "besa-paper" in err and len(err.strip().splitlines()) == 1
    )


def test_the_builtin_sparsegpt_paper_recipe_is_the_papers_sweep_without_the_solve(tokenizer, calib_ids):
    """``--recipe sparsegpt-paper``: one dense pass per block, 128-column mask blocks, no least-squares solve: the
    weights of those flags given by hand, and not those of besa's SparseGPT defaults (group by group, solved)."""
    import besa
    from conftest import make_model

    recipe = load_recipe("sparsegpt-paper")
    assert recipe.method == "sparsegpt" and recipe.prune["within_block"] == "parallel"
    assert recipe.options["lsq_iters"] == 0 and recipe.options["mask_block"] == 128
    by_recipe = besa.prune(
        make_model("llama"), tokenizer=tokenizer, recipe=recipe, calib_ids=calib_ids, progress=False
    ).model.state_dict()
    by_hand = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="sparsegpt", calib_ids=calib_ids, progress=False,
        within_block="parallel", method_options={"lsq_iters": 0, "mask_block": 128},
    ).model.state_dict()  # fmt: skip
    default = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="sparsegpt", calib_ids=calib_ids, progress=False
    ).model.state_dict()
    linears = [k for k in by_hand if k.endswith("proj.weight")]
    assert all(by_recipe[k].equal(by_hand[k]) for k in linears)
    assert not all(default[k].equal(by_hand[k]) for k in linears)
