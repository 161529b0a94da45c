"""Same settings, same results: every tensor a run saves, for each method and mode, against what was recorded.

What is recorded, per case and saved tensor (``BESA_RECORD_DIGESTS=1 pytest tests/test_golden.py`` writes
both):

- ``tests/golden/digests.json``: its exact count of zeros and four float64 sums: plain, absolute, squared and
  position-weighted (each entry times a fixed weight of its flat index, which sees the same values moved
  elsewhere);
- ``tests/golden/masks.json``: for each tensor with zeros, where they are (``numpy.packbits`` of the
  ``tensor == 0`` booleans, zlib, base64).

What is compared (``TensorGap``, ``case_gaps``), each as a fraction:

- per tensor: ``sums``, the largest difference of the four sums relative to the tensor's own scale (its
  absolute sum, its sum of squares; the position-weighted one over 6 times the absolute sum, its largest
  weight); ``zeros``, the difference of zero counts over the tensor's size; ``mask``, the fraction of its
  positions where one run has a zero and the other not (1 - the agreeing fraction);
- per case: ``case_zeros`` and ``case_mask``, the same two over all saved tensors together. Rounding flips a
  few entries here and there; a real change (other calibration, another rule) moves entries in every tensor,
  so the whole case sees it where the noisiest single tensor would not.

Two promises, two kinds of test:

- Same machine, same settings: bit for bit. Two runs in one process save byte-identical tensors
  (``test_a_second_run_in_the_same_process_saves_the_same_bytes``); and on the kind of CPU and kernel that made
  the record (``tests/golden/recorded_on.json``: vendor, family, model, torch's kernel choice and version) every
  case must match it exactly (``EXACT``), so a single moved weight fails there even where the tolerances below
  would let it pass.
- Another CPU: the same results up to float rounding, which the runs amplify (SparseGPT's least-squares solve,
  BESA's training, a weight that rounds to the other side of a quantization step, a near tie in a mask). The
  record is that of an AMD EPYC (Zen 4) with torch's own choice of kernel (AVX512) and 1 thread. Each case
  (``tolerance``) is held to ``max(FLOOR, MARGIN * max(measured, reported))`` for each metric:

  * ``measured`` (``tests/golden/noise.json``, written by ``tests/golden/measure_noise.py`` in about 4
    minutes): the case's largest gap from the record when rerun on the recording machine under each other
    kernel choice and thread count: ``ATEN_CPU_CAPABILITY`` = default, avx2, avx512, each on 1 to 4 threads.
    The thread counts stand for what cannot be varied here: MKL takes one code path on an AMD CPU whatever
    ``MKL_ENABLE_INSTRUCTIONS`` or ``ONEDNN_MAX_CPU_ISA`` say (tried: same bits), and another vendor's GEMM
    kernels add up in other orders, as more threads do. (avx2 gives the bits of avx512 here at every thread
    count; the scalar kernels and the thread count change them.) Worst per family, sums / one tensor's mask /
    the whole case's mask: magnitude and wanda 5e-8 (the scalar kernels draw the random model an ulp apart)
    and no flip; sparsegpt 8e-3 / 12% (2:4, a case of near ties) / 1.3%; besa 8e-3 / 0.4% / 0.05%; the
    RTN-quantized sparsegpt and besa cases 2e-2 / 5% / 0.6%; the jointly quantized ones 2e-4 / one entry.
    Settings left out of the measurement (5, 6 and 8 threads, scalar and avx512 kernels) stayed within 56% of
    every tolerance.
  * ``reported``: the other vendor (issue 33: a fresh Intel Xeon with AVX-512 and AMX, against these records).
    The 10 cases of ``INTEL_FAILED`` failed there with sums off by 5e-5 to 3e-3 (which case gave which was not
    reported, so each gets 3e-3: ``INTEL_SUMS``), and BESA masks had one zero more or less in a few layers
    (4088 vs 4087 in a tensor of 8192: ``INTEL_FLIP`` = 1/8192 of the zero count, and at least as much of the
    mask). The other 9 cases passed there under the former comparison (sums to 1e-4, exact zero counts).
  * No case of a family (the method, ``-w4`` when it quantizes) that flips entries anywhere, measured here or
    reported there, is held to an exact zero count or mask: each gets at least ``INTEL_FLIP``.
  * ``MARGIN`` = 4: room for a CPU (or a library build) that rounds a little worse than all of those.
  * ``FLOOR``: the sums are never compared tighter than the former relative 1e-4, which held on both vendors
    for the cases with no gap; zero counts and masks have no floor, so magnitude and wanda, which flip
    nothing, keep exact zero counts and masks.

  ``.ci/run`` runs this file a second time under ``ATEN_CPU_CAPABILITY=default``, so a cross-kernel break
  shows before it lands.

Tolerances this wide let a single moved weight of a SparseGPT or BESA tensor hide in the noise (a magnitude or
wanda case still sees it). ``test_a_changed_seed_or_rule_is_flagged`` shows what they do catch, for the
loosest cases too: a model built from another seed, calibration drawn from another seed, and a neighbouring
rule (wanda for magnitude, SparseGPT's 16-column mask block, BESA's layer granularity for its row one, RTN for
joint quantization), each compared with the recorded case, must fail.

A change that is meant to alter results re-records the digests and masks with ``BESA_RECORD_DIGESTS=1 pytest
tests/test_golden.py`` (on the machine named above, or say which in the commit) and says why in its commit;
any other change must leave them as they are. A new case, or a record made on another machine, needs the noise
measured again: ``.venv/bin/python tests/golden/measure_noise.py``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import besa
from conftest import make_model

GOLDEN = Path(__file__).parent / "golden"
DIGESTS = GOLDEN / "digests.json"
MASKS = GOLDEN / "masks.json"
NOISE = GOLDEN / "noise.json"
RECORD = bool(os.environ.get("BESA_RECORD_DIGESTS"))
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
    # the patterns learned (the N:M default before issue 37 moved it to ADMM's own patterns and added the KL stage),
    # as recorded
    "besa-2:4": {"method": "besa", "pattern": "2:4", "refit_target": "dense-stream", "refit_epochs": 2, "kl_epochs": 0,
                 "method_options": {**BESA_FAST, "weight_update": "obs", "epochs": 1, "metric": "sparsegpt"}},
    "wanda-w4": {"method": "wanda", "wbits": 4, "group_size": 32},
    "sparsegpt-w4-joint": {"method": "sparsegpt", "wbits": 4, "group_size": 32},
    "sparsegpt-w4-rtn": {"method": "sparsegpt", "wbits": 4, "group_size": 32, "quant_mode": "rtn"},
    "besa-w4-joint": {"method": "besa", "wbits": 4, "group_size": 32, "method_options": BESA_FAST},
    "besa-w4-joint-frozen": {
        "method": "besa", "wbits": 4, "group_size": 32, "method_options": {**BESA_FAST, "weight_update": "none"},
    },
    "besa-w4-rtn": {"method": "besa", "wbits": 4, "group_size": 32, "quant_mode": "rtn", "method_options": BESA_FAST},
}  # fmt: skip


def family(name: str) -> str:
    """The method of a case, with ``-w4`` when it quantizes."""
    case = CASES[name]
    return case["method"] + ("-w4" if "wbits" in case else "")


TENSOR_METRICS = ("sums", "zeros", "mask")
CASE_METRICS = ("case_zeros", "case_mask")
METRICS = TENSOR_METRICS + CASE_METRICS
MARGIN = 4.0
"""Tolerance over the worst gap measured or reported (see the module docstring)."""
FLOOR = dict.fromkeys(METRICS, 0.0) | {"sums": 1e-4}
"""The sums are never compared tighter than the former relative 1e-4; zero counts and masks may be exact."""
INTEL_FAILED = frozenset(
    ["sparsegpt-50", "sparsegpt-2:4", "sparsegpt-w4-rtn", "besa-row", "besa-layer", "besa-default",
     "besa-dense-stream", "besa-obs", "besa-2:4", "besa-w4-rtn"]
)  # fmt: skip
"""Issue 33: the cases that failed on a fresh Intel Xeon (AVX-512, AMX) under the former comparison."""
INTEL_SUMS = 3e-3
"""Issue 33: the largest relative difference of a digest sum in the cases that failed there (5e-5 to 3e-3)."""
INTEL_FLIP = 1 / 8192
"""Issue 33: BESA masks with 4087 zeros where 4088 were recorded, in tensors of 8192 entries: one zero of 8192
more or less, so at least one of 8192 positions disagreeing."""
INTEL_FLIPPED = frozenset({"besa", "besa-w4"})
"""The families whose zero counts moved there."""


def measured_noise() -> dict[str, dict[str, float]]:
    """Case -> metric -> its worst gap over the kernels and thread counts of ``measure_noise.py``."""
    return json.loads(NOISE.read_text())["cases"]


def tolerance(name: str, noise: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """``max(FLOOR, MARGIN * max(measured, reported))`` for each metric of case ``name`` (see the module)."""
    noise = measured_noise() if noise is None else noise
    assert name in noise, (
        f"no measured noise for {name!r}: run `.venv/bin/python tests/golden/measure_noise.py`"
    )
    fam = family(name)
    flips = fam in INTEL_FLIPPED or any(
        noise[other][m] > 0
        for other in CASES
        if other in noise and family(other) == fam
        for m in ("zeros", "mask")
    )
    reported = {"sums": INTEL_SUMS if name in INTEL_FAILED else 0.0}
    if flips:
        reported |= dict.fromkeys(METRICS[1:], INTEL_FLIP)
    return {m: max(FLOOR[m], MARGIN * max(noise[name][m], reported.get(m, 0.0))) for m in METRICS}


RECORDED_ON = GOLDEN / "recorded_on.json"
EXACT = dict.fromkeys(METRICS, 0.0)
"""The tolerances on the recording kind of CPU and kernel: none (the runs there reproduce the record bit for bit,
so a single moved weight, which the cross-vendor tolerances of the SparseGPT and BESA cases let pass, fails)."""


def kernel_identity() -> dict[str, str]:
    """What decides the float rounding of a run: the CPU (vendor, family, model), torch's kernel choice
    (``ATEN_CPU_CAPABILITY``) and torch's version; the tests run on 1 thread (conftest)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    found = {}
    for key in ("vendor_id", "cpu family", "model", "model name"):
        match = re.search(rf"^{key}\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
        found[key] = match.group(1).strip() if match else ""
    return found | {"capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def on_the_recording_kernel() -> bool:
    return RECORDED_ON.exists() and json.loads(RECORDED_ON.read_text()) == kernel_identity()


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


def zero_mask(tensor: torch.Tensor) -> np.ndarray:
    """Where ``tensor`` is zero, flat, as booleans."""
    return (tensor.detach() == 0).flatten().numpy()


def pack_mask(mask: np.ndarray) -> str:
    """A boolean mask as text: packed bits, zlib, base64."""
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode("ascii")


def unpack_mask(text: str, numel: int) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits, count=numel).astype(bool)


def mask_record(tensor: torch.Tensor) -> dict | None:
    """What ``masks.json`` keeps of a tensor: its size and where its zeros are (None for a tensor without)."""
    mask = zero_mask(tensor)
    return {"numel": int(mask.size), "bits": pack_mask(mask)} if mask.any() else None


def sums_gap(got: dict[str, float], expected: dict[str, float]) -> float:
    """The largest difference of the four sums, each relative to the tensor's own scale: the signed sums
    (which may be near 0) to its absolute sum (the position-weighted one to 6 times that, its largest weight),
    the sum of squares to itself."""
    scale = max(expected["abs"], 1e-12)
    return max(
        abs(got["sum"] - expected["sum"]) / scale,
        abs(got["abs"] - expected["abs"]) / scale,
        abs(got["pos"] - expected["pos"]) / (scale * (POSITION_PERIOD // 2)),
        abs(got["sq"] - expected["sq"]) / max(expected["sq"], 1e-12),
    )


@dataclass(frozen=True)
class TensorGap:
    """How far one saved tensor is from its record: ``sums`` (relative), how many more or fewer zeros it
    has (``zero_diff``) and at how many of its ``numel`` positions it has a zero where the record has none or
    the other way round (``disagree``)."""

    sums: float
    zero_diff: int
    disagree: int
    numel: int

    @property
    def zeros(self) -> float:
        return self.zero_diff / max(self.numel, 1)

    @property
    def mask(self) -> float:
        return self.disagree / max(self.numel, 1)


def tensor_gap(tensor: torch.Tensor, expected: dict[str, float], expected_mask: dict | None) -> TensorGap:
    """``tensor`` against its recorded digest and zero mask (``None``: it had no zeros)."""
    got = tensor_digest(tensor)
    mask = zero_mask(tensor)
    if expected_mask is None:
        disagree = int(mask.sum())
    else:
        assert expected_mask["numel"] == mask.size, (
            f"recorded {expected_mask['numel']} entries, got {mask.size}"
        )
        disagree = int((mask != unpack_mask(expected_mask["bits"], mask.size)).sum())
    return TensorGap(sums_gap(got, expected), abs(got["zeros"] - expected["zeros"]), disagree, int(mask.size))


def worst_gaps(gaps: dict[str, TensorGap]) -> dict[str, float]:
    """Each metric of a case: the worst tensor's for the per-tensor ones, all tensors at once for case_*."""
    numel = max(sum(g.numel for g in gaps.values()), 1)
    return {
        **{m: max((getattr(g, m) for g in gaps.values()), default=0.0) for m in TENSOR_METRICS},
        "case_zeros": sum(g.zero_diff for g in gaps.values()) / numel,
        "case_mask": sum(g.disagree for g in gaps.values()) / numel,
    }


def differences(gaps: dict[str, TensorGap], tol: dict[str, float]) -> list[tuple[str, str, float, float]]:
    """What is over tolerance ``tol``, as (tensor or ``*`` for the whole case, metric, gap, tolerance): empty
    when the case matches its record."""
    whole = worst_gaps(gaps)
    return [
        (key, m, getattr(gap, m), tol[m])
        for key, gap in gaps.items()
        for m in TENSOR_METRICS
        if getattr(gap, m) > tol[m]
    ] + [("*", m, whole[m], tol[m]) for m in CASE_METRICS if whole[m] > tol[m]]


def saved_tensors(
    case: dict, tokenizer, calib_ids: torch.Tensor, out: Path, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every tensor in every safetensors file that the run of ``case`` (on the tiny LLaMA built from ``seed``)
    writes to ``out``, as ``file:name``."""
    kwargs = {"sparsity": 0.5 if "pattern" not in case else None, **case}
    besa.prune(
        make_model("llama", seed=seed), tokenizer=tokenizer, calib_ids=calib_ids, progress=False, out=out,
        save_quantized="wbits" in case, **kwargs,
    )  # fmt: skip
    return {
        f"{file.name}:{name}": tensor
        for file in sorted(out.glob("*.safetensors"))
        for name, tensor in sorted(load_file(str(file)).items())
    }


def case_gaps(tensors: dict[str, torch.Tensor], name: str) -> dict[str, TensorGap]:
    """Every saved tensor against the record of case ``name``."""
    digests, masks = json.loads(DIGESTS.read_text())[name], json.loads(MASKS.read_text())[name]
    assert tensors.keys() == digests.keys(), (
        f"saved tensors differ: {sorted(tensors.keys() ^ digests.keys())}"
    )
    return {key: tensor_gap(t, digests[key], masks.get(key)) for key, t in tensors.items()}


def record_case(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write the digests and zero masks of ``tensors`` as the record of case ``name``."""
    for path, entry in (
        (DIGESTS, {key: tensor_digest(t) for key, t in tensors.items()}),
        (MASKS, {key: m for key, t in tensors.items() if (m := mask_record(t)) is not None}),
    ):
        saved = json.loads(path.read_text()) if path.exists() else {}
        saved[name] = entry
        path.write_text(json.dumps(dict(sorted(saved.items())), indent=1) + "\n")


def calib_ids_from(seed: int) -> torch.Tensor:
    """Calibration windows drawn as conftest's ``calib_ids`` fixture draws them (from seed 0)."""
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(seed))


def test_calib_ids_from_seed_0_are_the_fixtures(calib_ids):
    assert torch.equal(calib_ids_from(0), calib_ids) and not torch.equal(calib_ids_from(1), calib_ids)


def test_tolerances_are_the_margin_over_the_worst_measured_or_reported_gap():
    quiet = dict.fromkeys(METRICS, 0.0)
    noise = {"magnitude-50": quiet, "wanda-w4": quiet, "besa-paper-form": quiet, "sparsegpt-w4-joint": quiet}
    noise |= {"sparsegpt-w4-rtn": quiet | {"sums": 0.01, "mask": 0.02}, "besa-row": quiet | {"sums": 1e-5}}
    assert tolerance("magnitude-50", noise) == FLOOR  # no gap anywhere: exact zeros and masks
    assert tolerance("wanda-w4", noise) == FLOOR
    flip = MARGIN * INTEL_FLIP
    besa = {"sums": MARGIN * INTEL_SUMS} | {m: flip for m in METRICS[1:]}  # failed on Intel, flipped there
    assert tolerance("besa-row", noise) == besa
    assert tolerance("besa-paper-form", noise) == besa | {"sums": FLOOR["sums"]}  # passed, but BESA flips
    rtn = tolerance("sparsegpt-w4-rtn", noise)
    assert rtn == {"sums": 0.04, "zeros": flip, "mask": 0.08, "case_zeros": flip, "case_mask": flip}
    # the joint case flips nothing, the RTN one of its family does: not exact
    assert tolerance("sparsegpt-w4-joint", noise) == {"sums": FLOOR["sums"]} | {m: flip for m in METRICS[1:]}
    for name in CASES:  # every case is measured, and what was seen on Intel fits with the margin to spare
        tol = tolerance(name)
        assert tol["sums"] >= (MARGIN * INTEL_SUMS if name in INTEL_FAILED else FLOOR["sums"])
        if family(name) in INTEL_FLIPPED:
            assert all(tol[m] >= MARGIN * INTEL_FLIP for m in METRICS[1:])


def test_gaps_see_a_moved_zero_a_changed_weight_and_a_permutation_but_not_float_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[w.abs() < 0.5] = 0
    exact = tolerance("magnitude-50")  # exact zeros and masks, sums to the floor
    loosest = {m: max(tolerance(name)[m] for name in CASES) for m in METRICS}

    def flagged(t: torch.Tensor, tol: dict[str, float], reference: torch.Tensor = w) -> list[str]:
        gaps = {"w": tensor_gap(t, tensor_digest(reference), mask_record(reference))}
        return sorted({metric for _, metric, _, _ in differences(gaps, tol)})

    assert flagged(w, exact) == [] and flagged(w * (1 + 1e-6), exact) == []
    zero, kept = (w == 0).nonzero()[0], (w != 0).nonzero()[0]
    moved = w.clone()
    moved[tuple(zero)], moved[tuple(kept)] = 0.3, 0.0  # as many zeros, one of them elsewhere
    assert tensor_digest(moved)["zeros"] == tensor_digest(w)["zeros"]
    assert {"mask", "case_mask"} <= set(flagged(moved, exact))
    changed = w.clone()
    changed[3] *= 1.05
    assert flagged(changed, exact) == ["sums"]
    swapped = w.clone()  # the same values, zeros included, two of them exchanged
    swapped[0, 0], swapped[0, 1] = 1.5, -1.5
    permuted = swapped.clone()
    permuted[0, 0], permuted[0, 1] = swapped[0, 1], swapped[0, 0]
    same = ["zeros", "sum", "abs", "sq"]
    assert [tensor_digest(permuted)[k] for k in same] == [tensor_digest(swapped)[k] for k in same]
    assert flagged(permuted, exact, swapped) == ["sums"]
    one_more = w.clone()
    one_more[tuple(kept)] = 0.0
    assert {"zeros", "mask", "case_zeros", "case_mask"} <= set(flagged(one_more, exact))
    assert flagged(torch.zeros(8), exact, torch.ones(8)) == sorted(METRICS)
    # Under the loosest tolerances of all cases one weight hides in the noise; a redrawn tensor does not.
    assert flagged(moved, loosest) == []
    redrawn = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    redrawn[redrawn.abs() < 0.5] = 0
    assert "case_mask" in flagged(redrawn, loosest)
    assert flagged(w * 1.25, loosest) == ["sums"]
    assert unpack_mask(pack_mask(zero_mask(w)), w.numel()).tolist() == zero_mask(w).tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_saved_tensors_match_the_recorded_digests(name, tokenizer, calib_ids, tmp_path):
    tensors = saved_tensors(CASES[name], tokenizer, calib_ids, tmp_path / "out")
    if RECORD:
        record_case(name, tensors)
        RECORDED_ON.write_text(json.dumps(kernel_identity(), indent=1) + "\n")
    # on the kind of CPU and kernel that made the record (and a fresh record) no gap at all: bit for bit
    tol = EXACT if RECORD or on_the_recording_kernel() else tolerance(name)
    gaps = case_gaps(tensors, name)
    found = differences(gaps, tol)
    assert not found, f"{name} differs from its record in {len(found)} ways, first: {found[:4]}"


@pytest.mark.parametrize("name", ["sparsegpt-50", "besa-row"])
def test_a_second_run_in_the_same_process_saves_the_same_bytes(name, tokenizer, calib_ids, tmp_path):
    first = saved_tensors(CASES[name], tokenizer, calib_ids, tmp_path / "first")
    second = saved_tensors(CASES[name], tokenizer, calib_ids, tmp_path / "second")
    assert first.keys() == second.keys()
    differ = [
        key
        for key in first
        if first[key].dtype != second[key].dtype
        or first[key].shape != second[key].shape
        or not torch.equal(
            first[key].contiguous().view(torch.uint8), second[key].contiguous().view(torch.uint8)
        )
    ]
    assert not differ, f"a second run changed {len(differ)} tensors, first: {differ[:3]}"


MUTATIONS: dict[str, tuple[str, dict, dict[str, int]]] = {
    # id: (the recorded case compared with, the case run instead, model seed / calibration seed if not 0)
    "wanda-for-magnitude": ("magnitude-50", CASES["wanda-50"], {}),
    "sparsegpt-calib-seed": ("sparsegpt-50", CASES["sparsegpt-50"], {"calib_seed": 1}),
    "sparsegpt-mask-block-16": (
        "sparsegpt-50",
        {**CASES["sparsegpt-50"], "method_options": {"mask_block": 16}},
        {},
    ),
    "sparsegpt-2:4-calib-seed": ("sparsegpt-2:4", CASES["sparsegpt-2:4"], {"calib_seed": 1}),
    "sparsegpt-w4-rtn-model-seed": ("sparsegpt-w4-rtn", CASES["sparsegpt-w4-rtn"], {"seed": 1}),
    "sparsegpt-rtn-for-joint": ("sparsegpt-w4-joint", CASES["sparsegpt-w4-rtn"], {}),
    "besa-calib-seed": ("besa-row", CASES["besa-row"], {"calib_seed": 1}),
    "besa-layer-for-row": ("besa-row", CASES["besa-layer"], {}),
    "besa-w4-rtn-model-seed": ("besa-w4-rtn", CASES["besa-w4-rtn"], {"seed": 1}),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_changed_seed_or_rule_is_flagged(mutation, tokenizer, tmp_path):
    name, case, seeds = MUTATIONS[mutation]
    ids = calib_ids_from(seeds.get("calib_seed", 0))
    tensors = saved_tensors(case, tokenizer, ids, tmp_path / "out", seed=seeds.get("seed", 0))
    assert differences(case_gaps(tensors, name), tolerance(name)), f"{mutation} passes as {name}"


def test_on_the_recording_kernel_one_moved_weight_of_the_loosest_case_fails(tokenizer, calib_ids, tmp_path):
    tensors = saved_tensors(CASES["sparsegpt-2:4"], tokenizer, calib_ids, tmp_path / "out")
    key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    moved = tensors[key].clone()
    zero, kept = (moved == 0).nonzero()[0], (moved != 0).nonzero()[0]
    moved[tuple(zero)], moved[tuple(kept)] = moved[tuple(kept)], 0.0  # one weight moved to a pruned place
    gaps = case_gaps({**tensors, key: moved}, "sparsegpt-2:4")
    assert differences(gaps, EXACT)  # the exact comparison sees it ...
    assert not differences(gaps, tolerance("sparsegpt-2:4"))  # ... which the cross-vendor tolerance cannot
    if on_the_recording_kernel():  # and here the unmoved run is the record, bit for bit
        assert not differences(case_gaps(tensors, "sparsegpt-2:4"), EXACT)
