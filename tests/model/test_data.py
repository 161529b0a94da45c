import json

import pytest
import torch

from besa.errors import BesaError
from besa.model.data import load_calibration_documents, load_eval_text, sample_windows


def _tok(text):
    return list(text.encode())


def test_windows_are_seeded_have_the_right_shape_and_come_from_one_document():
    docs = ["a" * 50, "".join(chr(65 + i % 26) for i in range(300)), "b" * 10]
    w1 = sample_windows(docs, _tok, nsamples=5, seqlen=20, seed=3)
    w2 = sample_windows(docs, _tok, nsamples=5, seqlen=20, seed=3)
    w3 = sample_windows(docs, _tok, nsamples=5, seqlen=20, seed=4)
    assert w1.shape == (5, 20)
    assert w1.equal(w2) and not w1.equal(w3)
    tokens = [_tok(d) for d in docs]
    for row in w1.tolist():
        assert any(any(t[i : i + 20] == row for i in range(len(t) - 19)) for t in tokens)


def test_windows_fall_back_to_joined_text_when_every_document_is_short():
    w = sample_windows(["short one", "short two", "short three"], _tok, nsamples=2, seqlen=12, seed=0)
    assert w.shape == (2, 12)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(BesaError, match="needs more"):
        sample_windows(["tiny"], _tok, nsamples=1, seqlen=100, seed=0)


def test_named_sources_come_from_the_data_dir(data_dir):
    docs = load_calibration_documents("enwiki-articles")
    assert len(docs) == 3
    rows = [json.loads(line)["text"] for line in (data_dir / "wikitext-2-raw-v1" / "test.jsonl").open()]
    assert load_eval_text("wikitext2") == "\n\n".join(rows)  # rows kept byte for byte, empty ones included
    assert load_eval_text("ptb") == "a b c d e f"
    (data_dir / "ptb" / "valid.txt").write_text(" g h \n")
    assert load_eval_text("ptb:valid") == load_eval_text("ptb:validation") == "g h"
    with pytest.raises(BesaError, match="unknown split"):
        load_eval_text("ptb:dev")


def test_file_sources(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("hello world")
    assert load_calibration_documents(str(txt)) == ["hello world"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_calibration_documents(str(jl)) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(BesaError, match="line 1 is not valid JSON"):
        load_calibration_documents(str(bad))


def test_enwiki_without_data_dir_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("BESA_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data beside it
    with pytest.raises(BesaError, match="BESA_DATA_DIR"):
        load_calibration_documents("enwiki-articles")


def test_resolve_bos_follows_what_the_tokenizer_does():
    from besa.model.data import resolve_bos
    from conftest import make_tokenizer

    plain, adds = make_tokenizer(), make_tokenizer(bos=True)
    assert resolve_bos("auto", plain) is None and resolve_bos("never", plain) is None
    assert resolve_bos("auto", adds) == 258 and resolve_bos("always", adds) == 258
    assert resolve_bos("never", adds) is None
    with pytest.raises(BesaError, match="no BOS token"):
        resolve_bos("always", plain)
    with pytest.raises(BesaError, match="unknown --bos"):
        resolve_bos("sometimes", plain)


def test_with_bos_puts_the_token_in_front_of_every_window():
    from besa.model.data import with_bos

    windows = torch.arange(6).reshape(2, 3)
    assert torch.equal(with_bos(windows, 9), torch.tensor([[9, 0, 1, 2], [9, 3, 4, 5]]))
