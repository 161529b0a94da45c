import pytest
import torch

import besa
from besa.model.blocks import find_blocks, find_linears
from besa.model.training import checkpointed_blocks, head_splits
from besa.settings.config import KLSettings
from besa.stages.distill import (
    LOGIT_ELEMENTS,
    _chunk,
    _kl,
    _kl_over,
    distill,
    teacher_targets,
    topk_kl,
    topk_targets,
)
from besa.stages.reconstruct import TrainSchedule, surviving_rms, train_masked
from conftest import VOCAB, make_model, make_softcapped_gemma3

CPU = torch.device("cpu")


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(0))


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        f"{b}.{n}": layer
        for b, block in find_blocks(model)
        for n, layer in find_linears(block, model).items()
    }


def _prune_half(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in _linears(model).values():
            w = layer.weight
            w.masked_fill_(w.abs() <= w.abs().median(), 0)


def test_topk_targets_keep_the_top_tokens_and_one_bucket_for_the_rest():
    logits = torch.randn(2, 5, 30)
    ids, log_q = topk_targets(logits, 4)
    assert ids.dtype == torch.int32 and ids.shape == (2, 5, 4) and log_q.shape == (2, 5, 5)
    assert torch.equal(ids.long(), logits.topk(4, dim=-1).indices)
    assert torch.allclose(log_q[..., :4], logits.log_softmax(-1).gather(-1, ids.long()))
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(2, 5))  # the bucket holds exactly the rest
    ids, log_q = topk_targets(logits, 30)  # every token kept: no bucket
    assert log_q.shape == (2, 5, 30)


@pytest.mark.parametrize("k", [1, 4, 11])
def test_topk_kl_is_zero_for_the_teachers_own_logits_and_exact_with_every_token_kept(k):
    teacher, student = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    ids, log_q = topk_targets(teacher, k)
    assert float(topk_kl(teacher, ids, log_q)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(student, ids, log_q)) > 0
    if k == 11:
        expected = torch.nn.functional.kl_div(
            student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1).mean()  # fmt: skip
        assert float(topk_kl(student, ids, log_q)) == pytest.approx(float(expected), rel=1e-5)


def test_topk_kl_sees_mass_moved_inside_the_rest_only_through_the_bucket():
    """Coarsened: moving probability between tokens of the bucket changes nothing, moving it into the bucket
    does."""
    teacher = torch.tensor([[4.0, 3.0, 0.0, 0.0]])
    ids, log_q = topk_targets(teacher, 2)
    inside = torch.tensor(
        [[4.0, 3.0, torch.log(torch.tensor(2.0)), -1e4]]
    )  # same bucket mass, moved within it
    more = torch.tensor([[4.0, 3.0, 2.0, 2.0]])
    assert float(topk_kl(inside, ids, log_q)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(more, ids, log_q)) > 0.05


def test_distill_lowers_the_kl_and_keeps_every_zero_exactly():
    model, ids = make_model("llama"), _ids()
    targets = teacher_targets(model, ids, topk=16, device=CPU, progress=False)
    _prune_half(model)
    zeros = {n: layer.weight.detach() == 0 for n, layer in _linears(model).items()}
    outside = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith(("embed_tokens.weight", "norm.weight"))
    }
    requires = [p.requires_grad for p in model.parameters()]
    before = _kl_over(model, False, ids[:8], targets[:8], 4, CPU)
    facts = distill(model, ids, targets, KLSettings(epochs=4, lr=1e-3, topk=16, batch=4, holdout=4), CPU,
                    progress=False)  # fmt: skip
    assert _kl_over(model, False, ids[:8], targets[:8], 4, CPU) < 0.8 * before
    assert len(facts["train"]) == facts["epochs"] and facts["train"][-1] < facts["train"][0]
    assert facts["held_out_windows"] == 4 and len(facts["held_out"]) == facts["epochs"] + 1
    for name, layer in _linears(model).items():
        assert torch.equal(layer.weight.detach() == 0, zeros[name]), name  # the same zeros, exactly
    for name, value in outside.items():  # only the blocks' linears train
        assert torch.equal(dict(model.named_parameters())[name].detach(), value), name
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())


def test_distill_trains_only_on_windows_that_are_not_held_out():
    model, ids = make_model("llama"), _ids()
    targets = teacher_targets(model, ids, topk=8, device=CPU, progress=False)
    _prune_half(model)
    seen: list[torch.Tensor] = []
    real = model.forward

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs["input_ids"].clone())
        return real(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    distill(model, ids, targets, KLSettings(epochs=2, lr=1e-4, batch=2, holdout=4), CPU, progress=False)
    trained = torch.cat(seen)
    assert trained.shape[0] == 2 * 8  # every training window once per epoch
    for window in ids[8:]:
        assert not any(torch.equal(window, t) for t in trained)


def test_distill_keeps_the_pruned_model_when_the_held_out_kl_never_improves():
    """Held-out targets taken from the pruned model itself: their KL starts at 0 and can only rise, so the best
    epoch is 'before training' and the weights come back unchanged."""
    model, ids = make_model("llama"), _ids()
    dense = teacher_targets(model, ids, topk=8, device=CPU, progress=False)
    _prune_half(model)
    pruned = teacher_targets(model, ids, topk=8, device=CPU, progress=False)
    dense.ids[8:], dense.log_q[8:] = pruned.ids[8:], pruned.log_q[8:]
    before = {n: layer.weight.detach().clone() for n, layer in _linears(model).items()}
    facts = distill(model, ids, dense, KLSettings(epochs=5, lr=1e-3, batch=4, holdout=4), CPU,
                    progress=False)  # fmt: skip
    assert facts["held_out"][0] == pytest.approx(0.0, abs=1e-5)
    assert facts["epochs"] == 2
    for name, layer in _linears(model).items():
        assert torch.equal(layer.weight.detach(), before[name]), name


def test_distill_at_a_relative_rate_moves_each_linear_by_its_own_share_of_its_surviving_rms():
    """One Adam step (every training window in one batch): Adam's first step moves each coordinate by its rate, so
    each linear's kept weights move by ``rel_lr`` times that linear's surviving RMS, and its zeros stay zero."""
    model, ids = make_model("llama"), _ids()
    dense = teacher_targets(model, ids, topk=8, device=CPU, progress=False)
    _prune_half(model)
    with torch.no_grad():  # linears of very different sizes, so one absolute rate could not pass for both
        next(iter(_linears(model).values())).weight.mul_(50.0)
    before = {n: layer.weight.detach().clone() for n, layer in _linears(model).items()}
    facts = distill(
        model, ids, dense, KLSettings(epochs=1, rel_lr=1e-3, batch=12, holdout=0), CPU, progress=False
    )
    assert facts["epochs"] == 1
    for name, layer in _linears(model).items():
        start, now = before[name], layer.weight.detach()
        moved = (now - start)[start != 0].abs()
        rate = 1e-3 * surviving_rms(start)
        # |step| = rate * |g| / (|g| + eps): at most the rate, and within Adam's eps of it where the gradient is not
        # tiny (this toy model's gradients are ~1e-6, so a few percent below)
        assert float(moved.max()) <= rate * (1 + 1e-5), name
        assert float(moved.max()) == pytest.approx(rate, rel=0.05), name
        assert torch.all(now[start == 0] == 0), name


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_kl_stage_after_a_method_keeps_its_exact_sparsity_and_reports_its_facts(tokenizer, method):
    model = make_model("llama")
    result = besa.prune(model, tokenizer=tokenizer, method=method, sparsity=0.5, calib_ids=_ids(), kl_epochs=2,
                        kl_lr=1e-3, kl_topk=16, progress=False, checkpoint=False)  # fmt: skip
    report = result.report
    assert report["sparsity"]["pruned_layers"] == 0.5
    assert report["kl"]["train"][-1] < report["kl"]["train"][0]
    assert report["kl"]["held_out_windows"] == 4
    assert report["timings_s"]["kl"] > 0
    assert report["config"]["kl_epochs"] == 2


def test_kl_stage_is_refused_with_quantization_and_with_streaming(tokenizer, tmp_path):
    with pytest.raises(besa.BesaError, match="--kl-epochs"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="wanda", calib_ids=_ids(), kl_epochs=1, wbits=4,
                   progress=False, checkpoint=False)  # fmt: skip
    with pytest.raises(besa.BesaError, match="--kl-epochs must be"):
        besa.prune(make_model("llama"), tokenizer=tokenizer, method="wanda", calib_ids=_ids(), kl_epochs=-1,
                   progress=False, checkpoint=False)  # fmt: skip
    with pytest.raises(besa.BesaError, match="--stream"):
        besa.prune(str(tmp_path), method="wanda", kl_epochs=1, stream=True, out=str(tmp_path / "out"),
                   progress=False)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gemma3-softcap"])
def test_the_kl_over_chunks_of_positions_with_recomputed_blocks_equals_the_whole_logits_kl_and_its_gradient(
    arch, monkeypatch
):
    """``LOGIT_ELEMENTS`` set to 3 positions' logits: the loss and every linear's gradient are those of the plain
    ``topk_kl`` of the whole logits with every activation kept (the soft-capped model, which does not split, takes
    the whole logits, and its KL is the capped logits' KL)."""
    model = make_softcapped_gemma3() if arch == "gemma3-softcap" else make_model(arch)
    ids = _ids(3)
    targets = teacher_targets(make_model("llama", seed=1), ids, topk=8, device=CPU, progress=False)
    params = [layer.weight for layer in _linears(model).values()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    reference = topk_kl(model(input_ids=ids).logits, targets.ids, targets.log_q)
    grads = torch.autograd.grad(reference, params)
    monkeypatch.setattr("besa.stages.distill.LOGIT_ELEMENTS", 3 * VOCAB)
    split = head_splits(model, ids)
    assert split == (arch == "llama")
    with checkpointed_blocks(model):
        loss = _kl(model, split, ids, targets.ids, targets.log_q)
        chunked = torch.autograd.grad(loss, params)
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-7)
    for g, r in zip(chunked, grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-8)
    # the blocks are as they were
    assert all("forward" not in block.__dict__ for _, block in find_blocks(model))


def test_the_chunked_kl_runs_the_head_once_per_chunk_through_forward_and_backward(monkeypatch):
    """Each chunk's gradient is taken as its logits are made: backward runs no head (no chunk's logits are made
    twice), and a loss that is scaled on its way to backward scales the gradient the blocks get."""
    model, ids = make_model("llama"), _ids(2)  # 2 x 16 = 32 positions, 3 at a time: 11 chunks
    targets = teacher_targets(make_model("llama", seed=1), ids, topk=8, device=CPU, progress=False)
    monkeypatch.setattr("besa.stages.distill.LOGIT_ELEMENTS", 3 * VOCAB)
    params = [layer.weight for layer in _linears(model).values()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    calls = []
    model.get_output_embeddings().register_forward_hook(  # final_hidden's own call is given no position
        lambda _m, args, _out: calls.append(args[0].numel() // args[0].shape[-1]) if args[0].numel() else None
    )
    loss = _kl(model, True, ids, targets.ids, targets.log_q)
    assert len(calls) == 11 and sum(calls) == 32
    once = torch.autograd.grad(loss, params, retain_graph=True)
    assert len(calls) == 11
    thrice = torch.autograd.grad(3 * loss, params)
    for a, b in zip(once, thrice, strict=True):
        assert torch.allclose(3 * a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("vocab", [49152, 262144, 50257, 1 << 24])
def test_a_chunk_of_logits_is_never_under_logit_elements(vocab):
    """Rounded up: SmolLM2's 49152 tokens give 171 positions (33.6 MB), not 170 (31.9 MB, under glibc's 32 MiB)."""
    step = _chunk(torch.nn.Linear(1, vocab, bias=False, device="meta"))
    assert step * vocab >= LOGIT_ELEMENTS > (step - 1) * vocab
    assert step >= 1


def test_teacher_targets_over_chunks_of_positions_equal_the_whole_logits_targets(monkeypatch):
    model, ids = make_model("llama"), _ids(3)
    whole = topk_targets(model(input_ids=ids).logits, 8)
    monkeypatch.setattr("besa.stages.distill.LOGIT_ELEMENTS", 5 * VOCAB)
    chunked = teacher_targets(model, ids, topk=8, device=CPU, batch=2, progress=False)
    assert torch.equal(chunked.ids, whole[0])
    assert torch.allclose(chunked.log_q, whole[1], rtol=0, atol=1e-5)


def test_distill_trains_as_torch_adam_on_the_whole_logits_would():
    """The KL stage (chunked head, recomputed blocks, ``KeptAdam``) against the same training written plainly:
    ``train_masked`` with ``torch.optim.Adam`` on the whole logits' KL."""
    ids = _ids()
    lean, plain = make_model("llama"), make_model("llama")
    targets = teacher_targets(lean, ids, topk=16, device=CPU, progress=False)
    _prune_half(lean)
    _prune_half(plain)
    # no early stop: every step compared
    settings = KLSettings(epochs=2, lr=1e-3, topk=16, batch=4, holdout=0)
    distill(lean, ids, targets, settings, CPU, progress=False)
    params = [layer.weight for layer in _linears(plain).values()]
    plain.requires_grad_(False)
    train_masked(
        params,
        lambda idx: topk_kl(plain(input_ids=ids[idx]).logits, targets.ids[idx], targets.log_q[idx]),
        ids.shape[0],
        None,
        TrainSchedule(2, 1e-3, 4),
    )
    for (name, a), b in zip(_linears(lean).items(), params, strict=True):
        assert torch.allclose(a.weight.detach(), b.detach(), rtol=0, atol=1e-5), name


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "gemma3", "llama4"])
def test_distill_on_other_architectures_lowers_the_kl_and_keeps_every_zero(arch):
    """Conv1D linears (GPT-2), ALiBi (BLOOM), sliding windows (Gemma 3) and a Mixture of Experts whose experts
    some batches never reach (Llama 4): the recomputed blocks and the kept-weight Adam train all of them."""
    from conftest import make_llama4

    model = make_llama4() if arch == "llama4" else make_model(arch)
    ids = _ids()
    targets = teacher_targets(model, ids, topk=16, device=CPU, progress=False)
    _prune_half(model)
    zeros = {n: layer.weight.detach() == 0 for n, layer in _linears(model).items()}
    before = _kl_over(model, head_splits(model, ids), ids[:8], targets[:8], 4, CPU)
    facts = distill(model, ids, targets, KLSettings(epochs=3, lr=1e-3, topk=16, batch=4, holdout=4), CPU,
                    progress=False)  # fmt: skip
    assert facts["head_split"]
    assert _kl_over(model, True, ids[:8], targets[:8], 4, CPU) < before
    for name, layer in _linears(model).items():
        assert torch.equal(layer.weight.detach() == 0, zeros[name]), name
