import pytest
import torch

import besa
from besa.engine.activations import ActivationStore, MemoryBudget
from conftest import make_model


def test_store_spills_beyond_the_budget_and_reads_back_exactly(tmp_path):
    batches = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    one = batches[0].numel() * 4
    budget = MemoryBudget(limit=2 * one, spill_root=tmp_path)
    store = ActivationStore(budget, batches)
    assert len(store) == 5 and store.spilled == 3 and store.num_samples == 10
    assert budget.used == 2 * one and budget.spilled_batches == 3 and budget.spilled_bytes == 3 * one
    for got, want in zip(store, batches, strict=True):
        assert torch.equal(got, want)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    store.release()
    assert budget.used == 0 and not any(f.exists() for f in files)
    budget.cleanup()
    assert not any(tmp_path.iterdir())


def test_unlimited_budget_keeps_everything_in_ram_and_records_the_peak():
    budget = MemoryBudget()
    a = ActivationStore(budget, [torch.zeros(4, 4)])
    b = ActivationStore(budget, [torch.zeros(4, 4)])
    assert a.spilled == b.spilled == 0 and budget.peak == 128
    a.release()
    assert budget.used == 64 and budget.peak == 128


@pytest.mark.parametrize("method", ["wanda", "besa"])
def test_spilling_changes_nothing_in_the_result(method, tokenizer, calib_ids, tmp_path):
    results = []
    for max_memory in (None, 1024):  # 1 KiB: nearly every batch goes to disk
        r = besa.prune(
            make_model("llama"), tokenizer=tokenizer, method=method, sparsity=0.5, calib_ids=calib_ids,
            forward_batch=2, progress=False, max_memory=max_memory, run_dir=tmp_path / f"run-{max_memory}",
        )  # fmt: skip
        results.append(r)
    spilled = results[1].report["memory"]["activations"]
    assert results[0].report["memory"]["activations"]["spilled_batches"] == 0
    assert spilled["spilled_batches"] > 0 and spilled["budget_mib"] == pytest.approx(1024 / 2**20)
    a, b = (r.model.state_dict() for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "run-1024" / "spill").exists() or not any(
        (tmp_path / "run-1024" / "spill").iterdir()
    )
