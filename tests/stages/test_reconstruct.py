import weakref

import pytest
import torch

import besa
from besa.engine.pipeline import run_sequential
from besa.engine.work import BlockWork
from besa.stages.reconstruct import (
    LOSSES,
    RefitSpec,
    TrainSchedule,
    anchor_penalty,
    block_loss,
    refit_block,
    split_holdout,
    surviving_rms,
    token_loss,
    train_masked,
)
from conftest import make_model


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(0))


def _prune_half(work: BlockWork) -> None:
    for layer in work.linears.values():
        w = layer.weight.data
        w.masked_fill_(w.abs() <= w.abs().median(), 0)


def _on_first_block(step, ids=None) -> None:
    done = []

    def only_first(work: BlockWork) -> None:
        if work.index == 0:
            step(work)
            done.append(True)

    run_sequential(make_model("llama"), _ids() if ids is None else ids, only_first, torch.device("cpu"),
                   forward_batch=4, progress=False)  # fmt: skip
    assert done


def test_split_holdout_keeps_the_last_windows_apart():
    assert split_holdout(12, 4) == (slice(0, 8), slice(8, 12))
    assert split_holdout(3, 4) == (slice(0, 3), slice(3, 3))  # too few windows: nothing held out


def _training_loss(work: BlockWork, targets, loss=block_loss) -> float:
    """The block's loss on the 8 training windows of the tests' 12 (the last 4 held out where a spec says so)."""
    inputs, wanted = torch.cat(list(work.inputs)), torch.cat(list(targets))
    with torch.no_grad():
        return float(loss(wanted[:8], work.forward(inputs[:8])))


def test_refit_lowers_the_training_loss_and_keeps_every_pruned_weight_zero():
    def step(work: BlockWork) -> None:
        targets = work.forward_all(keep_outputs=True)  # the dense block's outputs
        _prune_half(work)
        zeros = {n: layer.weight.detach() == 0 for n, layer in work.linears.items()}
        requires = [p.requires_grad for p in work.module.parameters()]
        before = _training_loss(work, targets)
        facts = refit_block(work, work.inputs, targets, RefitSpec(epochs=4, lr=1e-3, batch_size=4, holdout=4))
        assert _training_loss(work, targets) < 0.5 * before
        assert facts["epochs"] >= 1 and len(facts["held_out"]) == facts["epochs"] + 1
        assert len(facts["train"]) == facts["epochs"] and facts["train"][-1] < facts["train"][0]
        for name, layer in work.linears.items():
            assert torch.equal(layer.weight.detach() == 0, zeros[name]), name  # same zeros, exactly
            assert layer.weight.grad is None
        assert [p.requires_grad for p in work.module.parameters()] == requires  # as they were

    _on_first_block(step)


def test_refit_trains_only_on_windows_that_are_not_held_out():
    def step(work: BlockWork) -> None:
        targets = work.forward_all(keep_outputs=True)
        _prune_half(work)
        held = torch.cat(list(work.inputs))[8:]
        seen: list[torch.Tensor] = []
        real = work.forward

        def spy(hidden: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                seen.append(hidden.detach().clone())
            return real(hidden)

        work.forward = spy  # type: ignore[method-assign]
        refit_block(work, work.inputs, targets, RefitSpec(epochs=3, lr=1e-3, batch_size=2, holdout=4))
        trained = torch.cat(seen)
        assert trained.shape[0] == 3 * 8  # every training window once per epoch
        for window in held:
            assert not any(torch.equal(window, t) for t in trained)

    _on_first_block(step)


def test_refit_keeps_the_pruned_weights_when_the_held_out_loss_never_improves():
    """Held-out targets equal to the pruned block's own outputs: its held-out loss starts at 0 and can only rise,
    so the best epoch is 'before training' and the block comes back unchanged."""

    def step(work: BlockWork) -> None:
        dense = torch.cat(list(work.forward_all(keep_outputs=True)))
        _prune_half(work)
        pruned = torch.cat(list(work.forward_all(keep_outputs=True)))
        targets = torch.cat([dense[:8], pruned[8:]])
        before = {n: layer.weight.detach().clone() for n, layer in work.linears.items()}
        facts = refit_block(work, work.inputs, [targets], RefitSpec(epochs=5, lr=1e-3, batch_size=4, holdout=4,
                                                                    patience=1))  # fmt: skip
        assert facts["held_out"][0] == pytest.approx(0.0, abs=1e-10)
        assert facts["epochs"] == 2  # stopped once the held-out loss failed to improve twice
        for name, layer in work.linears.items():
            assert torch.equal(layer.weight.detach(), before[name]), name

    _on_first_block(step)


def test_anchor_penalty_is_the_relative_squared_move():
    start = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # squared norm 25
    assert float(anchor_penalty([s.clone() for s in start], start)) == 0
    moved = [torch.tensor([3.0, 0.0]), torch.tensor([[9.0]])]  # moved by 5: 25 / 25
    assert float(anchor_penalty(moved, start)) == pytest.approx(1.0)
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor_penalty([p], [torch.tensor([0.0, 2.0])]).backward()
    assert torch.allclose(p.grad, torch.tensor([2.0 / 4, 0.0]))  # d/dp (p - s)^2 / |s|^2


def test_an_anchored_refit_moves_the_weights_less_and_keeps_every_pruned_weight_zero():
    moves: dict[float, float] = {}

    def step(work: BlockWork) -> None:
        targets = work.forward_all(keep_outputs=True)
        _prune_half(work)
        start = {n: layer.weight.detach().clone() for n, layer in work.linears.items()}
        for anchor in (0.0, 100.0):
            for name, layer in work.linears.items():
                layer.weight.data.copy_(start[name])
            spec = RefitSpec(epochs=3, lr=1e-3, batch_size=4, holdout=0, anchor=anchor)
            before = _training_loss(work, targets)
            facts = refit_block(work, work.inputs, targets, spec)
            assert _training_loss(work, targets) < before and len(facts["train"]) == 3
            moves[anchor] = float(anchor_penalty([layer.weight.detach() for layer in work.linears.values()],
                                                 list(start.values())))  # fmt: skip
            for name, layer in work.linears.items():
                assert torch.equal(layer.weight.detach() == 0, start[name] == 0), name

    _on_first_block(step)
    assert 0 < moves[100.0] < 0.5 * moves[0.0]


def test_block_loss_is_relative_to_the_target_scale():
    t = torch.randn(2, 3, 4)
    assert float(block_loss(t, t)) == 0
    assert float(block_loss(10 * t, 10 * t + 10 * 0.1)) == pytest.approx(
        float(block_loss(t, t + 0.1)), rel=1e-5
    )


def test_token_loss_is_the_mean_of_each_tokens_relative_error():
    t = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    noise = 0.1 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    by_hand = torch.stack(
        [(noise[b, i].square().sum() / t[b, i].square().sum()) for b in range(2) for i in range(3)]
    ).mean()
    assert float(token_loss(t, t + noise)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(token_loss(t, t)) == 0
    # scaling one token (target and output alike) leaves it unchanged: every token weighs the same
    scale = torch.ones(2, 3, 1)
    scale[0, 0] = 100.0
    assert float(token_loss(t * scale, (t + noise) * scale)) == pytest.approx(float(token_loss(t, t + noise)))


def test_a_massive_token_dominates_the_whole_output_loss_and_not_the_token_loss():
    t = torch.ones(1, 8, 4)
    t[0, 0] *= 100.0  # a massive activation on the first token
    err_first = t.clone()
    err_first[0, 0] *= 1.1  # a 10% error on the massive token only
    err_rest = t.clone()
    err_rest[0, 1:] *= 1.1  # the same relative error on the seven others
    assert float(block_loss(t, err_first)) > 100 * float(block_loss(t, err_rest))
    assert float(token_loss(t, err_rest)) == pytest.approx(7 * float(token_loss(t, err_first)))
    assert set(LOSSES) == {"mse", "token"} and LOSSES["mse"] is block_loss


def test_a_token_loss_refit_lowers_its_loss_and_keeps_every_pruned_weight_zero():
    def step(work: BlockWork) -> None:
        targets = work.forward_all(keep_outputs=True)
        _prune_half(work)
        zeros = {n: layer.weight.detach() == 0 for n, layer in work.linears.items()}
        inputs, wanted = torch.cat(list(work.inputs)), torch.cat(list(targets))
        before = _training_loss(work, targets, token_loss)
        with torch.no_grad():
            held_before = float(token_loss(wanted[8:], work.forward(inputs[8:])))  # the 4 held-out windows
        spec = RefitSpec(epochs=4, lr=1e-3, batch_size=4, holdout=4, loss="token")
        facts = refit_block(work, work.inputs, targets, spec)
        assert facts["held_out"][0] == pytest.approx(held_before, rel=1e-5)  # the facts are in the token loss
        assert _training_loss(work, targets, token_loss) < 0.5 * before
        for name, layer in work.linears.items():
            assert torch.equal(layer.weight.detach() == 0, zeros[name]), name

    _on_first_block(step)


def test_surviving_rms_counts_only_the_nonzero_weights():
    assert surviving_rms(torch.tensor([[0.0, 3.0], [4.0, 0.0]])) == pytest.approx((12.5) ** 0.5)
    assert surviving_rms(torch.zeros(2, 3)) == 0.0


def test_a_relative_rate_moves_each_tensor_by_its_own_scale_and_keeps_its_zeros():
    # Adam's first step is its rate times sign(gradient) in every coordinate: with --refit-rel-lr each tensor's
    # rate is that fraction of its surviving RMS, so a tensor 100x larger moves 100x as far
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(4, 8, generator=gen)
    small[:, ::2] = 0
    params = [small.clone(), small.clone() * 100]
    start = [p.clone() for p in params]
    pull = torch.randn(4, 8, generator=gen)

    def loss(_idx):
        return sum((p * pull).sum() for p in params)

    schedule = TrainSchedule(epochs=1, lr=0.5, batch_size=1, rel_lr=1e-2)
    rates = [g["lr"] for g in schedule.param_groups(start)]
    assert rates == pytest.approx([1e-2 * surviving_rms(small), 1.0 * surviving_rms(small)])
    train_masked(params, loss, 1, None, schedule)
    for p, s, rate in zip(params, start, rates, strict=True):
        moved = (p.detach() - s)[s != 0]
        assert torch.allclose(moved.abs(), torch.full_like(moved, rate), rtol=1e-5)
        assert torch.all(p.detach()[s == 0] == 0)
    absolute = TrainSchedule(epochs=1, lr=0.5, batch_size=1)
    # without it, one group at --refit-lr over every tensor, as before the relative rate existed: the same bits
    assert [(len(g["params"]), g["lr"]) for g in absolute.param_groups(params)] == [(2, 0.5)]


def test_a_negative_relative_rate_is_refused():
    with pytest.raises(besa.BesaError, match="refit-rel-lr"):
        besa.prune(make_model("llama"), method="wanda", calib_ids=_ids(), refit_epochs=1, refit_rel_lr=-1.0,
                   progress=False, checkpoint=False)  # fmt: skip


def test_an_unknown_refit_loss_is_refused():
    with pytest.raises(besa.BesaError, match="refit-loss"):
        besa.prune(make_model("llama"), method="wanda", calib_ids=_ids(), refit_epochs=1, refit_loss="l1",
                   progress=False, checkpoint=False)  # fmt: skip


@pytest.mark.parametrize("target", ["dense-stream", "dense", "pruned-input"])
@pytest.mark.parametrize("method, pattern", [("wanda", None), ("sparsegpt", "2:4"), ("magnitude", None)])
def test_refit_after_any_method_keeps_its_exact_sparsity_and_structure(tokenizer, method, pattern, target):
    model = make_model("llama")
    result = besa.prune(model, tokenizer=tokenizer, method=method, pattern=pattern, calib_ids=_ids(),
                        refit_epochs=2, refit_lr=1e-3, refit_target=target, progress=False, checkpoint=False)  # fmt: skip
    report = result.report
    assert report["sparsity"]["pruned_layers"] == 0.5
    assert set(report["refit"]["blocks"]) == {"model.layers.0", "model.layers.1"}
    for facts in report["refit"]["blocks"].values():
        assert len(facts["train"]) == facts["epochs"] == 2 and facts["train"][-1] < facts["train"][0]
    if pattern:
        for block in model.model.layers:  # the test knows the tiny model's layout
            for layer in (block.self_attn.q_proj, block.mlp.down_proj):
                groups = (layer.weight == 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
                assert torch.all(groups == 2)


def test_refit_with_quantization_is_refused(tokenizer):
    with pytest.raises(besa.BesaError, match="refit"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="wanda", calib_ids=_ids(), refit_epochs=1,
                   wbits=4, progress=False, checkpoint=False)  # fmt: skip


class _CountingStepper:
    """A stepper whose every step adds 1 to the one weight; it records how many of its copies are alive when it
    makes a new one, and what it is asked to put back."""

    def __init__(self, p: torch.Tensor) -> None:
        self.p, self.alive, self.most_alive, self.restored = p, [], 0, None

    def step(self, loss: torch.Tensor) -> None:
        with torch.no_grad():
            self.p += 1

    def snapshot(self) -> list[torch.Tensor]:
        self.alive = [r for r in self.alive if r() is not None]
        copy = [self.p.detach().clone()]
        self.alive.append(weakref.ref(copy[0]))
        self.most_alive = max(self.most_alive, len(self.alive))
        return copy

    def restore(self, values: list[torch.Tensor]) -> None:
        self.restored = float(values[0])
        self.p.data.copy_(values[0])


@pytest.mark.parametrize(
    ("held_out", "kept", "restored"),
    [
        ([5.0, 4.0, 3.0, 2.0], 3.0, None),  # better every epoch: the last epoch's values, no copy put back
        ([5.0, 4.0, 3.0, 3.5], 2.0, 2.0),  # the last epoch is worse: epoch 2's copy put back
        ([5.0, 6.0, 7.0, 8.0], 0.0, 0.0),  # never better: the values before training put back (stopped early)
    ],
)
def test_train_masked_keeps_one_copy_at_a_time_and_puts_back_the_best_epoch(held_out, kept, restored):
    """One step per epoch (1 window, batch 1), 3 epochs, the held-out losses given: the weight ends at the best
    epoch's value; at most one copy of the values exists at any time (the best one is dropped before a new one is
    made), and none is made after the last epoch, whose values are the best as they are."""
    p = torch.zeros(())
    stepper = _CountingStepper(p)
    losses = iter(held_out)
    train_masked([p], lambda idx: p.sum(), 1, lambda: next(losses),
                 TrainSchedule(epochs=3, lr=1.0, batch_size=1, patience=1, seed=0), stepper=stepper)  # fmt: skip
    assert float(p) == kept
    assert stepper.restored == restored
    assert stepper.most_alive == 1
