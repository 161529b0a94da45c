import math

import pytest
import torch
import torch.nn.functional as F

from besa.evaluation import perplexity, windows_of
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
    res = perplexity(model, ids, seqlen=16, batch_size=batch_size, progress=False)
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
    res = perplexity(model, ids, 8, bos=258, progress=False)
    assert res.bos and res.windows == 40 // 7 and res.tokens == res.windows * 8
    windows = torch.cat([torch.full((res.windows, 1), 258), ids[: res.windows * 7].reshape(-1, 7)], 1)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert not perplexity(model, ids, 8, progress=False).bos
