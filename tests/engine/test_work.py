import pytest
import torch
from torch import nn

from besa.engine.block_call import BatchAxis, batch_axis
from besa.engine.pipeline import EngineSetup, run_sequential
from besa.engine.work import BlockWork, group_by_input
from besa.stages.selection import HessianStats
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


def test_batch_axis_finds_the_dimension_that_grows_with_the_batch_and_how():
    heads = torch.arange(3.0)[:, None] * torch.arange(5.0)  # (H, T), one row per head
    assert batch_axis(torch.ones(1, 1, 5, 5), torch.ones(2, 1, 5, 5)) == BatchAxis(0, 1)
    assert batch_axis(heads, heads.repeat(2, 1)) == BatchAxis(0, 3)  # (B * H, T): batch-major
    assert batch_axis(heads, heads.repeat_interleave(2, dim=0)) == BatchAxis(
        0, 3, interleave=True
    )  # (H * B, T)
    assert batch_axis(heads.t(), heads.t().repeat(1, 2)) == BatchAxis(1, 3)  # (T, B * H)
    assert batch_axis(torch.ones(1, 5, 4), torch.ones(1, 5, 4)) is None  # broadcast by the model: not grown
    assert (
        batch_axis(torch.ones(1, 5), torch.ones(2, 10)) is None
    )  # two dimensions grew: not one per sequence
    with pytest.raises(ValueError, match="not one copy per sequence"):
        batch_axis(heads, torch.randn(6, 5))


class _PackedHeadsBlock(nn.Module):
    """A block that takes a per-head bias with the batch packed into its first dimension, batch-major (B * H, T)
    or head-major (H * B, T), and fails unless it holds exactly one copy per sequence."""

    def __init__(self, heads: int, head_major: bool):
        super().__init__()
        self.heads, self.head_major = heads, head_major
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        per_head = (
            bias.view(self.heads, batch, length) if self.head_major else bias.view(batch, self.heads, length)
        )
        per_head = per_head.transpose(0, 1) if self.head_major else per_head  # (B, H, T)
        return (
            self.proj(hidden)
            + (per_head * torch.arange(1.0, self.heads + 1)[:, None]).sum(1)[..., None]
            + positions
        )


class _PackedHeadsModel(nn.Module):
    def __init__(self, heads: int, head_major: bool):
        super().__init__()
        self.heads, self.head_major = heads, head_major
        self.embed = nn.Embedding(16, 4)
        self.layers = nn.ModuleList(_PackedHeadsBlock(heads, head_major) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        batch, length = input_ids.shape
        slopes = torch.arange(1.0, self.heads + 1)[:, None] * torch.arange(float(length))  # (H, T)
        bias = slopes.repeat_interleave(batch, dim=0) if self.head_major else slopes.repeat(batch, 1)
        positions = torch.arange(float(length))[None, :, None]  # (1, T, 1): broadcast by the blocks
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, bias, positions)
        return hidden


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("forward_batch", [1, 3, 4])
def test_block_calls_widen_a_batch_packed_with_the_heads_to_any_batch(head_major, forward_batch):
    """An argument whose first dimension is batch x heads (either order) is widened to each forward batch: the
    engine's block outputs equal the model's own, at any batch size (a partial last batch included)."""
    torch.manual_seed(0)
    model = _PackedHeadsModel(heads=3, head_major=head_major).eval()
    ids = torch.randint(0, 16, (6, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.layers[0](model.embed(ids), *_model_block_args(model, ids))
    outputs: list[torch.Tensor] = []

    def step(work: BlockWork) -> None:
        outputs.append(torch.cat(list(work.forward_all(keep_outputs=True))))

    run_sequential(model, ids, step, torch.device("cpu"), forward_batch=forward_batch, progress=False,
                   setup=EngineSetup(block_class="_PackedHeadsBlock"))  # fmt: skip
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)


def _model_block_args(model: _PackedHeadsModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``model`` hands its blocks besides the hidden states for ``ids``."""
    seen: list[tuple] = []
    handle = model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[1:]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0]


def test_the_experts_of_one_projection_form_one_group_whichever_of_them_a_window_reaches():
    x, h, y = torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(1, 4)
    names = ["q", "e.up.0", "e.up.1", "e.up.2", "e.down.0", "e.down.1", "e.down.2"]
    families = {n: n.rsplit(".", 1)[0] for n in names if n.startswith("e.")}
    # a window that reaches experts 2 and 0 (in that order) but not 1
    calls = [("q", x), ("e.up.2", h), ("e.up.0", y), ("e.down.2", h), ("e.down.0", y)]
    groups = group_by_input(calls, names, families)
    assert groups == [["q"], ["e.up.0", "e.up.1", "e.up.2"], ["e.down.0", "e.down.1", "e.down.2"]]
    other = [("q", x), ("e.up.1", y), ("e.down.1", y)]  # another rank's window: the same groups
    assert group_by_input(other, names, families) == groups
