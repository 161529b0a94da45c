"""Same settings, same bits: every tensor a run saves, for each method and mode, against digests recorded before the
stage redesign (``tests/golden/digests.json``).

A change that is meant to alter results re-records them with ``BESA_RECORD_DIGESTS=1 pytest tests/test_golden.py``
and says why in its commit; any other change must leave every digest as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import besa
from conftest import make_model

DIGESTS = Path(__file__).parent / "golden" / "digests.json"
BESA_FAST = {"optimizer": "adamw", "lr": 0.05}

CASES: dict[str, dict] = {
    "magnitude-50": {"method": "magnitude"},
    "wanda-50": {"method": "wanda"},
    "sparsegpt-50": {"method": "sparsegpt"},
    "magnitude-2:4": {"method": "magnitude", "pattern": "2:4"},
    "wanda-2:4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "besa-row": {"method": "besa", "method_options": BESA_FAST},
    "besa-layer": {"method": "besa", "method_options": {**BESA_FAST, "granularity": "layer"}},
    "besa-default": {"method": "besa"},
    "besa-paper-form": {"method": "besa", "method_options": {"optimizer": "prodigy", "weight_update": "none"},
                        "refit_epochs": 0},
    "besa-dense-stream": {"method": "besa", "method_options": {**BESA_FAST, "target": "dense-stream"}},
    "besa-obs": {"method": "besa", "method_options": {**BESA_FAST, "weight_update": "obs"}},
    "besa-2:4": {"method": "besa", "pattern": "2:4", "method_options": {**BESA_FAST, "weight_update": "obs"}},
    "wanda-w4": {"method": "wanda", "wbits": 4, "group_size": 32},
    "sparsegpt-w4-joint": {"method": "sparsegpt", "wbits": 4, "group_size": 32},
    "sparsegpt-w4-rtn": {"method": "sparsegpt", "wbits": 4, "group_size": 32, "quant_mode": "rtn"},
    "besa-w4-joint": {"method": "besa", "wbits": 4, "group_size": 32, "method_options": BESA_FAST},
    "besa-w4-joint-frozen": {
        "method": "besa", "wbits": 4, "group_size": 32, "method_options": {**BESA_FAST, "weight_update": "none"},
    },
    "besa-w4-rtn": {"method": "besa", "wbits": 4, "group_size": 32, "quant_mode": "rtn", "method_options": BESA_FAST},
}  # fmt: skip


def saved_digests(case: dict, tokenizer, calib_ids: torch.Tensor, out: Path) -> dict[str, str]:
    """sha256 of every tensor in every safetensors file that the run writes to ``out``."""
    kwargs = {"sparsity": 0.5 if "pattern" not in case else None, **case}
    besa.prune(
        make_model("llama"), tokenizer=tokenizer, calib_ids=calib_ids, progress=False, out=out,
        save_quantized="wbits" in case, **kwargs,
    )  # fmt: skip
    digests = {}
    for file in sorted(out.glob("*.safetensors")):
        for name, tensor in sorted(load_file(str(file)).items()):
            raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            digests[f"{file.name}:{name}"] = hashlib.sha256(raw).hexdigest()
    return digests


@pytest.mark.parametrize("name", list(CASES))
def test_saved_tensors_match_the_recorded_digests(name, tokenizer, calib_ids, tmp_path):
    got = saved_digests(CASES[name], tokenizer, calib_ids, tmp_path / "out")
    if os.environ.get("BESA_RECORD_DIGESTS"):
        recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
        recorded[name] = got
        DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
    expected = json.loads(DIGESTS.read_text())[name]
    assert got.keys() == expected.keys()
    changed = [k for k in got if got[k] != expected[k]]
    assert not changed, f"{len(changed)} of {len(got)} saved tensors changed, first: {changed[:3]}"
