import torch

from besa.methods.configs import WandaConfig
from besa.run import PruneRun
from besa.settings.config import PruneConfig
from besa.settings.options import RunOptions
from conftest import make_model, make_tokenizer


def test_each_step_leaves_what_the_next_one_needs(tmp_path):
    """prepare -> load -> calibrate -> run_stages -> finish, each step's facts on the run object."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    config = PruneConfig.from_flat(method="wanda", sparsity=0.5, forward_batch=2)
    run = PruneRun(
        make_model("llama"), config, WandaConfig(), RunOptions(out=str(tmp_path / "out"), progress=False),
        tokenizer=make_tokenizer(), calib_ids=ids,
    )  # fmt: skip
    run.prepare()
    assert run.pruner.needs_calibration and run.where.out == tmp_path / "out" and run.documents is None
    assert not (tmp_path / "out").exists()  # nothing is written before the work
    run.load()
    assert run.weights and {w.kind for w in run.weights} == {"pruned"}
    run.calibrate()
    assert run.folder is not None and run.budget is not None and torch.equal(run.calib_ids, ids)
    run.run_stages()
    assert set(run.record.rates) == {w.name.removesuffix(".weight") for w in run.weights}
    for name, w in run.model.named_parameters():
        if w.dim() == 2 and ".layers." in name:
            assert (w == 0).float().mean().item() == 0.5, name
    report = run.finish(t_start=0.0)
    assert report["config"]["method"] == "wanda" and report["sparsity"]["masked"] == 0.5
    assert (tmp_path / "out" / "besa_report.json").is_file() and (
        tmp_path / "out" / "besa_recipe.yaml"
    ).is_file()
    assert not run.folder.path.exists()  # the run folder goes once the output is written
