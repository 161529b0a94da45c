"""Same settings, same results: every tensor a run saves, for each method and mode, against a digest recorded
before (``tests/golden/digests.json``): its exact count of zeros and its sum, absolute sum, sum of squares and a
position-weighted sum (each entry times a fixed weight of its flat index), which sees the same values moved to other
places.

The sums are compared to a relative 1e-4, not bit for bit: CPUs of different makers round the same float32
arithmetic differently (the digests once were sha256 of the bytes, and a run on another vendor's CPU changed them
with no change of code). A change that is meant to alter results re-records them with
``BESA_RECORD_DIGESTS=1 pytest tests/test_golden.py`` and says why in its commit; any other change must leave every
digest as it is.
"""

from __future__ import annotations

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


RTOL = 1e-4


POSITION_PERIOD = 13
"""The position weights are ``index % 13 - 6``: a permutation of the values, or a zero moved, changes their sum."""


def tensor_digest(tensor: torch.Tensor) -> dict[str, float]:
    """The exact zero count and four float64 sums of one tensor: what the golden runs compare."""
    t = tensor.detach().to(torch.float64).flatten()
    position = (torch.arange(t.numel(), dtype=torch.int64) % POSITION_PERIOD - POSITION_PERIOD // 2).to(t)
    return {
        "zeros": int((tensor == 0).sum()),
        "sum": float(t.sum()),
        "abs": float(t.abs().sum()),
        "sq": float((t * t).sum()),
        "pos": float((t * position).sum()),
    }


def digests_differ(got: dict[str, float], expected: dict[str, float]) -> bool:
    if got["zeros"] != expected["zeros"]:
        return True
    scale = max(expected["abs"], 1e-12)  # a signed sum near 0 is compared on the tensor's own scale
    return (
        abs(got["sum"] - expected["sum"]) > RTOL * scale
        or abs(got["abs"] - expected["abs"]) > RTOL * scale
        or abs(got["pos"] - expected["pos"]) > RTOL * scale * (POSITION_PERIOD // 2)
        or abs(got["sq"] - expected["sq"]) > RTOL * max(expected["sq"], 1e-12)
    )


def saved_digests(case: dict, tokenizer, calib_ids: torch.Tensor, out: Path) -> dict[str, dict[str, float]]:
    """The digest of every tensor in every safetensors file that the run writes to ``out``."""
    kwargs = {"sparsity": 0.5 if "pattern" not in case else None, **case}
    besa.prune(
        make_model("llama"), tokenizer=tokenizer, calib_ids=calib_ids, progress=False, out=out,
        save_quantized="wbits" in case, **kwargs,
    )  # fmt: skip
    return {
        f"{file.name}:{name}": tensor_digest(tensor)
        for file in sorted(out.glob("*.safetensors"))
        for name, tensor in sorted(load_file(str(file)).items())
    }


def test_digests_see_a_moved_zero_a_changed_weight_and_a_permutation_but_not_float_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[w.abs() < 0.5] = 0
    base = tensor_digest(w)
    assert not digests_differ(tensor_digest(w * (1 + 1e-6)), base)
    zero = (w == 0).nonzero()[0]
    kept = (w != 0).nonzero()[0]
    moved = w.clone()
    moved[tuple(zero)], moved[tuple(kept)] = 0.3, 0.0  # as many zeros, one of them elsewhere
    assert tensor_digest(moved)["zeros"] == base["zeros"] and digests_differ(tensor_digest(moved), base)
    changed = w.clone()
    changed[3] *= 1.05
    assert digests_differ(tensor_digest(changed), base)
    swapped = w.clone()  # the same values, zeros included, two of them exchanged
    swapped[0, 0], swapped[0, 1] = 1.5, -1.5
    permuted = swapped.clone()
    permuted[0, 0], permuted[0, 1] = swapped[0, 1], swapped[0, 0]
    same = ["zeros", "sum", "abs", "sq"]
    assert [tensor_digest(permuted)[k] for k in same] == [tensor_digest(swapped)[k] for k in same]
    assert digests_differ(tensor_digest(permuted), tensor_digest(swapped))
    assert digests_differ({**base, "zeros": base["zeros"] + 1}, base)


@pytest.mark.parametrize("name", list(CASES))
def test_saved_tensors_match_the_recorded_digests(name, tokenizer, calib_ids, tmp_path):
    got = saved_digests(CASES[name], tokenizer, calib_ids, tmp_path / "out")
    if os.environ.get("BESA_RECORD_DIGESTS"):
        recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
        recorded[name] = got
        DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
    expected = json.loads(DIGESTS.read_text())[name]
    assert got.keys() == expected.keys()
    changed = [k for k in got if digests_differ(got[k], expected[k])]
    assert not changed, f"{len(changed)} of {len(got)} saved tensors changed, first: {changed[:3]}"
