import json

from besa.engine.record import BlockResult, RunRecord


def test_a_blocks_checkpoint_json_brings_back_its_refit_and_facts():
    """What a resumed run reads back for a finished block is what the block produced (through JSON, as on disk)."""
    record = RunRecord()
    refit = {
        "train": [0.5, 0.1],
        "held_out": [0.6, 0.4, 0.45],
        "held_out_windows": 4,
        "epochs": 2,
    }
    record.add(
        "model.layers.0",
        BlockResult(rates={"model.layers.0.mlp.up_proj": 0.5}, facts={"k": 1}, refit=refit),
    )
    on_disk = json.loads(json.dumps(record.block_json("model.layers.0")))
    again = RunRecord()
    again.restore_json("model.layers.0", on_disk)
    assert again.refit == {"model.layers.0": refit}
    assert again.facts == {"model.layers.0": {"k": 1}}
    assert again.rates == record.rates
