import pytest
import torch

from besa.pipeline import BlockWork, run_sequential
from besa.stages.selection import HessianStats
from besa.work import group_by_input
from conftest import ARCHS, make_model


def test_group_by_input_groups_layers_fed_the_same_tensor_in_calling_order():
    x, y, z = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 8)
    calls = [("q", x), ("k", x), ("v", x), ("o", y), ("up", z), ("gate", z), ("q", x), ("down", y)]
    names = ["q", "k", "v", "o", "gate", "up", "down", "never"]
    assert group_by_input(calls, names) == [["q", "k", "v"], ["o"], ["up", "gate"], ["down"], ["never"]]


def test_group_by_input_keeps_views_of_one_storage_apart():
    """Two halves of one buffer start at different addresses; a reshaped view has another shape: not one input."""
    buf = torch.randn(4, 4)
    calls = [("a", buf[:2]), ("b", buf[2:]), ("c", buf.view(16)), ("d", buf.t())]
    assert group_by_input(calls, ["a", "b", "c", "d"]) == [["a"], ["b"], ["c"], ["d"]]


def _block_groups(arch: str, calib_ids: torch.Tensor) -> list[list[list[str]]]:
    found: list[list[list[str]]] = []
    run_sequential(make_model(arch), calib_ids, lambda work: found.append(work.input_groups()),
                   torch.device("cpu"), forward_batch=4, progress=False)  # fmt: skip
    return found


def test_input_groups_of_a_llama_block(calib_ids):
    groups = _block_groups("llama", calib_ids)
    assert groups[0] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_input_groups_cover_every_linear_once(arch, calib_ids):
    def step(work: BlockWork) -> None:
        groups = work.input_groups()
        flat = [name for group in groups for name in group]
        assert sorted(flat) == sorted(work.linears)
        assert len(groups) >= 4  # attention in, attention out, MLP in, MLP out: never merged

    run_sequential(make_model(arch), calib_ids, step, torch.device("cpu"), forward_batch=4, progress=False)


def test_calibrate_stop_after_feeds_exactly_the_full_pass_statistics(calib_ids):
    """Cutting each forward short after a group changes nothing the group sees; the layers after it see nothing."""

    def step(work: BlockWork) -> None:
        group = ["self_attn.o_proj"]
        full = {
            name: HessianStats(layer.in_features, torch.device("cpu")) for name, layer in work.linears.items()
        }
        work.calibrate(full)
        short = {
            name: HessianStats(layer.in_features, torch.device("cpu")) for name, layer in work.linears.items()
        }
        assert work.calibrate(short, stop_after=group) is None
        torch.testing.assert_close(short["self_attn.o_proj"].hessian, full["self_attn.o_proj"].hessian)
        assert short["self_attn.q_proj"].tokens == full["self_attn.q_proj"].tokens > 0  # called before o_proj
        assert short["mlp.down_proj"].tokens == 0  # never reached
        with pytest.raises(ValueError, match="no outputs"):
            work.calibrate(short, stop_after=group, keep_outputs=True)

    run_sequential(make_model("llama"), calib_ids, step, torch.device("cpu"), forward_batch=4, progress=False)
