import math

import pytest
import torch
import torch.nn.functional as F

from besa.evaluation.perplexity import eval_windows, perplexity, windows_of
from conftest import make_model


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(23)
    w = windows_of(ids, 5)
    assert w.shape == (4, 5) and w[1, 0] == 5 and w[-1, -1] == 19
    assert windows_of(ids, 5, max_windows=2).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows_of(ids, 50)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_is_exp_of_the_mean_next_token_nll(batch_size):
    model = make_model("llama")
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, eval_windows(ids, 16), batch_size=batch_size, progress=False)
    nlls = []
    with torch.no_grad():
        for row in ids[:64].reshape(4, 16):
            logits = model(row[None]).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], row[1:], reduction="none"))
    expected = math.exp(torch.cat(nlls).mean().item())
    assert res.ppl == pytest.approx(expected, rel=1e-5)
    assert (res.windows, res.tokens, res.seqlen) == (4, 64, 16)


def test_perplexity_with_bos_predicts_every_text_token_of_each_window():
    """With BOS each window is BOS + seqlen - 1 text tokens, all of them predicted (the first from the BOS)."""
    torch.manual_seed(0)
    model = make_model("llama").eval()
    ids = torch.randint(0, 256, (40,))
    res = perplexity(model, eval_windows(ids, 8, bos=258), bos=True, progress=False)
    assert res.bos and res.windows == 40 // 7 and res.tokens == res.windows * 8
    windows = torch.cat([torch.full((res.windows, 1), 258), ids[: res.windows * 7].reshape(-1, 7)], 1)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert not perplexity(model, eval_windows(ids, 8), progress=False).bos


def test_zero_shot_reports_the_accuracy_of_a_model_whose_answers_are_known(monkeypatch):
    """A model whose output head is all zeros gives every token the same probability, so both (equal-length)
    choices of every question tie and the harness takes the first: accuracy = share of questions whose answer is
    the first choice (4 of 6 in the toy task under tests/data/zeroshot), acc and acc_norm alike."""
    pytest.importorskip("lm_eval")
    from pathlib import Path

    import besa
    from conftest import make_tokenizer

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the task's data_files path is relative to the repository
    model = make_model("llama")
    torch.nn.init.zeros_(model.get_output_embeddings().weight)
    res = besa.evaluate(model, tokenizer=make_tokenizer(), datasets=(), tasks=["toy_choice"],
                        task_dir=str(root / "tests" / "data" / "zeroshot"), progress=False)  # fmt: skip
    assert res["zero_shot"]["toy_choice"] == {"acc": pytest.approx(4 / 6), "acc_norm": pytest.approx(4 / 6)}
    assert res["zero_shot"]["mean"] == res["zero_shot"]["toy_choice"]
    limited = besa.evaluate(model, tokenizer=make_tokenizer(), datasets=(), tasks=["toy_choice"], limit=3,
                            task_dir=str(root / "tests" / "data" / "zeroshot"), progress=False)  # fmt: skip
    assert limited["zero_shot"]["toy_choice"]["acc"] == pytest.approx(2 / 3)  # the first three: 0, 0, 1


def test_zero_shot_task_errors_are_one_line_and_name_the_task(tmp_path):
    pytest.importorskip("lm_eval")
    import besa
    from besa.errors import BesaError
    from conftest import make_tokenizer

    with pytest.raises(BesaError, match="unknown zero-shot task 'no_such_task'"):
        besa.evaluate(make_model("llama"), tokenizer=make_tokenizer(), datasets=(), tasks=["no_such_task"],
                      task_dir=str(tmp_path), progress=False)  # fmt: skip
    (tmp_path / "broken.yaml").write_text(
        "task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nowhere/x.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n"
    )
    with pytest.raises(BesaError, match="zero-shot task 'broken' could not load its data") as info:
        besa.evaluate(make_model("llama"), tokenizer=make_tokenizer(), datasets=(), tasks=["broken"],
                      task_dir=str(tmp_path), progress=False)  # fmt: skip
    assert "--task-dir" in str(info.value) and "\n" not in str(info.value)
