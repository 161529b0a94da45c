"""Data parallel over torchrun (gloo, 2 processes on the CPU): the same pruned model as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from besa.engine.distributed import World, shard_windows
from besa.errors import BesaError
from conftest import make_tokenizer


def test_each_rank_gets_whole_forward_batches_in_turn():
    ids = torch.arange(12).unsqueeze(1)
    assert shard_windows(ids, 2, World(0, 2)).flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_windows(ids, 2, World(1, 2)).flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_windows(ids, 2, World(0, 1)) is ids
    with pytest.raises(BesaError, match="multiple of 8"):
        shard_windows(torch.arange(12).unsqueeze(1), 4, World(0, 2))


@pytest.fixture
def deep_model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path / "deep-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _prune(
    model_dir: Path, out: Path, flags: list[str], data_dir: Path, processes: int
) -> subprocess.CompletedProcess:
    env = {**os.environ, "BESA_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    besa = ["-m", "besa", "prune", str(model_dir), "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "16",
            "--forward-batch", "2", "--out", str(out), "--no-progress", *flags]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [sys.executable, *(launcher if processes > 1 else []), *besa]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _said(done: subprocess.CompletedProcess) -> str:
    """What a failed run said: every line of besa's own, then the end of the output."""
    lines = [line for line in done.stderr.splitlines() if "besa" in line.lower() and "elastic" not in line]
    return "\n".join(lines[:20]) + "\n...\n" + done.stderr[-1500:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_processes_give_one_process_weights_bit_for_bit(method, deep_model_dir, data_dir, tmp_path):
    one = _prune(deep_model_dir, tmp_path / "one", ["--method", method], data_dir, 1)
    two = _prune(deep_model_dir, tmp_path / "two", ["--method", method], data_dir, 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "two" / "besa_report.json").read_text())
    assert report["sparsity"]["pruned_layers"] == 0.5 and report["run"]["processes"] == 2
    assert not (tmp_path / "two.run").exists()


def test_besa_on_two_processes_learns_the_masks_of_one_process_with_their_summed_batch(
    deep_model_dir, data_dir, tmp_path
):
    flags = ["--method", "besa", "--optimizer", "adamw", "--lr", "0.05", "--refit-epochs", "0"]
    one = _prune(deep_model_dir, tmp_path / "one", [*flags, "--batch-size", "4"], data_dir, 1)
    two = _prune(deep_model_dir, tmp_path / "two", [*flags, "--batch-size", "2"], data_dir, 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    layers = json.loads((tmp_path / "one" / "besa_report.json").read_text())["layers"]
    same = sum(int(((a[f"{n}.weight"] == 0) == (b[f"{n}.weight"] == 0)).sum()) for n in layers)
    total = sum(a[f"{n}.weight"].numel() for n in layers)
    assert same / total >= 0.999


KILLER = """
import os, signal, sys
import torch
from besa.registry import get_method

cls = get_method("sparsegpt").pruner_cls
original = cls.prune_block

def prune_block(self, work):
    if work.index == 2 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, work)

cls.prune_block = prune_block
from besa.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_rank_stops_the_run_clearly_and_a_rerun_resumes(deep_model_dir, data_dir, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "BESA_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    args = ["prune", str(deep_model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "8",
            "--seqlen", "16", "--forward-batch", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode != 0 and not out.exists()
    assert "another process of this torchrun run stopped" in killed.stderr, killed.stderr[-3000:]
    state = json.loads((tmp_path / "out.run" / "run.json").read_text())
    assert state["completed"] == 2
    resumed = _prune(deep_model_dir, out, ["--method", "sparsegpt", "--resume"], data_dir, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "besa_report.json").read_text())["run"]["resumed_blocks"] == 2
    one = _prune(deep_model_dir, tmp_path / "one", ["--method", "sparsegpt"], data_dir, 1)
    assert one.returncode == 0
    a, b = _weights(tmp_path / "one"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["mixtral", "llama4"])
def moe_model_dir(request, tmp_path: Path) -> Path:
    """A tiny Mixture of Experts: Mixtral's experts are a decorated fused class, Llama 4's stacks its own forward
    multiplies in one ``bmm`` (``besa.model.experts``)."""
    from conftest import make_llama4

    torch.manual_seed(0)
    if request.param == "llama4":
        model = make_llama4()
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=260, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        ))  # fmt: skip
    path = tmp_path / request.param
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_two_processes_prune_every_expert_as_one_process_does(moe_model_dir, data_dir, tmp_path):
    flags = [
        "--method",
        "sparsegpt",
        "--expert-min-tokens",
        "24",
    ]  # some experts fall back, on every rank alike
    one = _prune(moe_model_dir, tmp_path / "one", flags, data_dir, 1)
    two = _prune(moe_model_dir, tmp_path / "two", flags, data_dir, 2)
    assert one.returncode == 0, _said(one)
    assert two.returncode == 0, _said(two)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, second = (
        json.loads((tmp_path / f / "besa_report.json").read_text())["weights"] for f in ("one", "two")
    )
    assert first["expert_tokens"] == second["expert_tokens"]  # every rank's routed tokens, summed
    assert sum(first["expert_tokens"].values()) > 0 and first["fallback"] == second["fallback"]
    experts = [
        n
        for n in json.loads((tmp_path / "two" / "besa_report.json").read_text())["layers"]
        if ".experts." in n
    ]
    assert len(experts) == 2 * 2 * 4  # blocks x projections x experts, all counted
