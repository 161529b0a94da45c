"""Pruning with quantized weights, every method: grids, zeros, exact sparsity, the saved codes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import besa
from besa.formats.quant import QuantSpec, dequantize_codes, fake_quantize, quant_params
from besa.methods.sparsegpt import sparsegpt_prune
from besa.model.blocks import find_blocks, find_linears, weight_matrix
from besa.stages.selection import HessianStats
from conftest import make_model

CASES = [
    ("magnitude", {}),
    ("wanda", {}),
    ("sparsegpt", {"quant_mode": "joint"}),
    ("sparsegpt", {"quant_mode": "rtn"}),
    ("besa", {"quant_mode": "joint", "optimizer": "adamw", "lr": 0.05, "weight_update": "none"}),
    ("besa", {"quant_mode": "rtn", "optimizer": "adamw", "lr": 0.05}),
    ("besa", {"quant_mode": "joint", "optimizer": "adamw", "lr": 0.05}),  # auto: the OBS update
]


def _linears(model):
    return {f"{b}.{n}": m for b, blk in find_blocks(model) for n, m in find_linears(blk, model).items()}


@pytest.mark.parametrize(("method", "options"), CASES)
@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, 48)])  # 48: a narrower last group (64 = 48 + 16)
def test_saved_weights_lie_on_their_grids_and_pruned_ones_are_zero(
    method, options, bits, group, tokenizer, calib_ids, tmp_path
):
    out = tmp_path / "out"
    options = dict(options)
    mode = options.pop("quant_mode", "joint")
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method=method, sparsity=0.5, calib_ids=calib_ids, progress=False,
        method_options=options, quant_mode=mode, wbits=bits, group_size=group, out=out, save_quantized=True,
    )  # fmt: skip
    saved = load_file(str(out / "model.safetensors"))
    packed = load_file(str(out / "quantized.safetensors"))
    layout = json.loads((out / "quantization.json").read_text())
    assert layout["bits"] == bits and layout["group_size"] == group
    spec = QuantSpec(bits, group)
    names = _linears(result.model)
    assert {k.rsplit(".", 1)[0] for k in packed} == set(names)
    for name in names:
        w = saved[f"{name}.weight"]
        codes, scales, zeros = packed[f"{name}.codes"], packed[f"{name}.scales"], packed[f"{name}.zeros"]
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        on_grid = dequantize_codes(codes, scales, zeros.float(), spec)
        assert torch.equal(on_grid, w), name  # every weight is (code - zero) * scale, exactly
        # the pruning survived quantization (a few small survivors may also round to 0); BESA's per-layer
        # targets are its learned allocation
        target = result.report["layers"][name]["target"]
        assert target - 1e-3 <= (w == 0).float().mean().item() < target + 0.1, name
    report = result.report["quantization"]
    assert report["bits"] == bits and set(report["layers"]) == set(names)
    if method == "besa" and mode == "joint":  # the learned clipping is reported with either weight update
        update = result.report["method"]["weight_update"]
        assert update == options.get("weight_update", "obs")
        for info in report["layers"].values():
            assert info["mode"].startswith("besa joint (learned clipping)")
            assert info["mode"].endswith("sparsegpt update") == (update == "obs")
            assert 0 < info["clip_hi_min"] <= info["clip_hi_mean"] <= info["clip_hi_max"] <= 1
            assert 0 < info["clip_lo_min"] <= info["clip_lo_mean"] <= info["clip_lo_max"] <= 1


@pytest.mark.parametrize(
    ("wbits", "mode", "given", "expected"),
    [(16, "joint", None, "obs"), (4, "rtn", None, "obs"), (4, "joint", None, "obs"), (4, "joint", "auto", "obs"),
     (4, "joint", "none", "none")],
)  # fmt: skip
def test_besa_weight_update_is_obs_by_default(wbits, mode, given, expected, tokenizer, calib_ids):
    """OBS is the default with or without quantization (``auto``, from older recipes, means it too)."""
    options = {"optimizer": "adamw", "lr": 0.05, **({"weight_update": given} if given else {})}
    result = besa.prune(
        make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=calib_ids, progress=False,
        method_options=options, wbits=wbits, group_size=32, quant_mode=mode,
    )  # fmt: skip
    assert result.report["method"]["weight_update"] == expected


@pytest.mark.parametrize(("method", "options"), [CASES[1], CASES[3], CASES[6]])
def test_wbits_16_is_plain_pruning(method, options, tokenizer, calib_ids):
    options = {k: v for k, v in options.items() if k != "quant_mode"}
    runs = [
        besa.prune(
            make_model("llama"), tokenizer=tokenizer, method=method, sparsity=0.5, calib_ids=calib_ids,
            progress=False, method_options=options, **extra,
        ).model.state_dict()
        for extra in ({}, {"wbits": 16}, {"wbits": 4, "group_size": 32})
    ]  # fmt: skip
    plain, sixteen, four = runs
    assert all(torch.equal(plain[k], sixteen[k]) for k in plain)
    assert any(not torch.equal(plain[k], four[k]) for k in plain)  # and 4 bits does change the weights
    if method == "wanda":  # block 0 sees the same inputs: the same mask, then rounding (zeros stay zeros)
        for k in plain:
            if ".layers.0." in k and k.endswith("proj.weight"):
                assert torch.all(four[k][plain[k] == 0] == 0), k


def test_sparsegpt_joint_quantization_reconstructs_better_than_rtn_after_pruning():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(32, 64, generator=g)
    stats = HessianStats(64, torch.device("cpu"))
    stats.add(x)
    spec = QuantSpec(3, 16)
    joint, mask, grids = sparsegpt_prune(w, stats.hessian, 0.5, quant=spec)
    pruned, mask_rtn, _ = sparsegpt_prune(w, stats.hessian, 0.5)
    rtn = fake_quantize(pruned, *quant_params(pruned, spec), spec)
    assert torch.equal(joint[mask], torch.zeros(int(mask.sum())))
    assert torch.equal(fake_quantize(joint, *grids, spec), joint)  # the joint result is on its own grids

    def err(v):
        return float((x @ (w - v).T).square().sum())

    assert err(joint) < err(rtn)


def test_joint_besa_learns_clipping_and_resumed_runs_keep_the_grids(tokenizer, calib_ids, tmp_path):
    kwargs = dict(
        tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=calib_ids, progress=False, wbits=3,
        group_size=32, method_options={"optimizer": "adamw", "lr": 0.1, "clip_lr": 0.1}, run_dir=tmp_path / "run",
    )  # fmt: skip
    first = besa.prune(
        make_model("llama"), **kwargs
    )  # no out: the run folder stays, every block checkpointed
    layers = first.report["quantization"]["layers"]
    assert any(v["clip_hi_min"] < 0.98 or v["clip_lo_min"] < 0.98 for v in layers.values())  # clipping moved
    again = besa.prune(make_model("llama"), **kwargs, out=tmp_path / "out", save_quantized=True)
    assert again.report["run"]["resumed_blocks"] == len(find_blocks(again.model))
    assert again.report["quantization"]["layers"] == layers
    packed = load_file(str(tmp_path / "out" / "quantized.safetensors"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = next(iter(_linears(again.model)))
    spec = QuantSpec(3, 32)
    back = dequantize_codes(
        packed[f"{name}.codes"], packed[f"{name}.scales"], packed[f"{name}.zeros"].float(), spec
    )
    assert torch.equal(back, saved[f"{name}.weight"]) and torch.equal(
        back, weight_matrix(_linears(first.model)[name])
    )


def test_save_quantized_needs_wbits(tokenizer, calib_ids, tmp_path):
    from besa.errors import BesaError

    with pytest.raises(BesaError, match="--save-quantized needs --wbits"):
        besa.prune(
            make_model("llama"),
            tokenizer=tokenizer,
            calib_ids=calib_ids,
            out=tmp_path / "o",
            save_quantized=True,
        )


@pytest.mark.parametrize("allocation", [{"optimizer": "adamw", "lr": 0.1}, {"optimizer": "prodigy"}])
def test_clip_lr_sets_the_clipping_step_apart(allocation, tokenizer, calib_ids):
    # Prodigy refuses parameter groups with different learning rates: the clipping has its own AdamW
    def clip_range(clip_lr):
        r = besa.prune(
            make_model("llama"), tokenizer=tokenizer, method="besa", sparsity=0.5, calib_ids=calib_ids,
            progress=False, wbits=3, group_size=32, method_options={**allocation, "clip_lr": clip_lr},
        )  # fmt: skip
        layers = r.report["quantization"]["layers"].values()
        return min(v["clip_hi_min"] for v in layers), max(v["clip_hi_max"] for v in layers)

    frozen = clip_range(1e-12)
    assert frozen == (pytest.approx(0.982, abs=1e-3), pytest.approx(0.982, abs=1e-3))  # sigmoid(4), unmoved
    moved = clip_range(0.1)
    assert moved[0] < 0.98 or moved[1] > 0.985


@pytest.mark.parametrize("clip_lr", [0.0, -0.01])
def test_clip_lr_must_be_positive(clip_lr):
    from besa.errors import BesaError
    from besa.methods.besa.config import BesaConfig

    with pytest.raises(BesaError, match="--clip-lr must be positive"):
        BesaConfig(clip_lr=clip_lr)
