"""Tiny randomly initialised models of several architectures and a byte-level tokenizer, built offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Tests never reach a hub: a missing local file must fail at once, not after network retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# Tiny models gain nothing from more threads, and spinning threads slow everything down on a busy machine.
torch.set_num_threads(1)

VOCAB = 260
HIDDEN = 64
FFN = 128

ARCHS: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=8,
        )
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    ),
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=HIDDEN, max_position_embeddings=128,
        )
    ),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128,
        )
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128)
    ),
    # ALiBi: each block gets a (batch * heads, 1, T) bias, which grows with the batch along a dimension of size
    # heads rather than 1
    "bloom": lambda: transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4)
    ),
}  # fmt: skip


def make_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny model of ``arch`` with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    model.config.use_cache = False
    return model.eval()


def make_llama4() -> transformers.PreTrainedModel:
    """A tiny Llama 4 text model: every block a Mixture of Experts (an ``nn.Linear`` router returning a tuple,
    3-D experts its own forward multiplies in one batched product, a shared expert), in eval mode."""
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, intermediate_size_mlp=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        max_position_embeddings=128, interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=8,
        layer_types=["chunked_attention", "full_attention"],
    )  # fmt: skip
    model = transformers.Llama4ForCausalLM(config)
    model.config.use_cache = False
    return model.eval()


def make_softcapped_gemma3() -> torch.nn.Module:
    """A tiny Gemma 3 whose logits are soft-capped after its head: they are not the head's output."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=2.0,
    )  # fmt: skip
    return transformers.Gemma3ForCausalLM(config).eval()


class EinsumMoeConfig(transformers.LlamaConfig):
    model_type = "besa_test_einsum_moe"


class EinsumExperts(torch.nn.Module):
    """A Mixture of Experts of a layout besa cannot follow: 4 experts stacked in ``w_in`` [4, 32, HIDDEN] and
    ``w_out`` [4, HIDDEN, 32], every token through every expert in one ``einsum``, a linear router."""

    def __init__(self, config: transformers.PretrainedConfig) -> None:
        super().__init__()
        self.num_experts = 4
        self.router = torch.nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(self.num_experts, 32, config.hidden_size) * 0.05)
        self.w_out = torch.nn.Parameter(torch.randn(self.num_experts, config.hidden_size, 32) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(-1)
        h = torch.relu(torch.einsum("bth,eih->btei", x, self.w_in))
        return torch.einsum("btei,ehi,bte->bth", h, self.w_out, gates)


class EinsumMoeForCausalLM(transformers.LlamaForCausalLM):
    config_class = EinsumMoeConfig

    def __init__(self, config: EinsumMoeConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = EinsumExperts(config)
        self.post_init()


def make_einsum_moe() -> transformers.PreTrainedModel:
    """A tiny causal LM whose blocks hold experts besa cannot follow (``EinsumExperts``), registered with the Auto
    classes so it saves and loads (in this process) like any model."""
    if EinsumMoeConfig.model_type not in transformers.CONFIG_MAPPING:
        transformers.AutoConfig.register(EinsumMoeConfig.model_type, EinsumMoeConfig)
        transformers.AutoModelForCausalLM.register(EinsumMoeConfig, EinsumMoeForCausalLM)
    torch.manual_seed(0)
    config = EinsumMoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = EinsumMoeForCausalLM(config)
    model.config.use_cache = False
    return model.eval()


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: one token per byte, 256 + 2 special tokens; with ``bos`` a third,
    ``<bos>`` (258), that it puts in front of every text by itself (as Gemma and LLaMA-3 tokenizers do)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<unk>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    extra = {}
    if bos:
        vocab["<bos>"] = len(vocab)
        extra["bos_token"] = "<bos>"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>", **extra
    )


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a trained network, "
    "and the best methods keep the outputs of every block close to the dense ones.\n\n"
) * 6


@pytest.fixture
def calib_txt(tmp_path: Path) -> Path:
    """A small calibration text file."""
    path = tmp_path / "calib.txt"
    path.write_text("Some calibration text about many things. " * 40)
    return path


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 16), generator=g)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny LLaMA and its tokenizer saved as a Hugging Face folder."""
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A BESA_DATA_DIR with tiny wikitext2, ptb and enwiki-articles files."""
    import json

    root = tmp_path / "data"
    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    rows = [" = Title = \n", "", " first row of text \n", " second row \n"]
    (root / "wikitext-2-raw-v1" / "test.jsonl").write_text(
        "".join(json.dumps({"text": r}) + "\n" for r in rows)
    )
    (root / "ptb").mkdir()
    (root / "ptb" / "test.txt").write_text(" a b c \n d e f \n")
    (root / "calibration").mkdir()
    docs = [{"title": f"doc{i}", "text": TEXT * (i + 1)} for i in range(3)]
    (root / "calibration" / "enwiki-articles.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.setenv("BESA_DATA_DIR", str(root))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root`` (``root`` itself included) -> the sha256 of its bytes, ``dir`` or ``link -> target``:
    two snapshots are equal exactly when nothing below ``root`` was added, removed or changed."""
    import hashlib

    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return {}
    found: dict[str, str] = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``besa ARGV`` in this process: (exit code, stdout, stderr); argparse's exits are caught too."""
    from besa.cli import main

    capsys.readouterr()  # drop what fixtures printed
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The single non-blank line of ``err`` (fails the test if there are more or none)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def pruned_weight(
    rows: int, cols: int, sparsity: float, seed: int, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """A random (rows, cols) weight with ``sparsity`` of it zero at random, or the smallest ``n`` of every ``m``
    consecutive inputs of a row zero (``nm``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if nm is not None:
        n, m = nm
        drop = w.abs().reshape(rows, cols // m, m).argsort(dim=-1)[..., :n]
        keep = torch.ones(rows, cols // m, m, dtype=torch.bool).scatter_(-1, drop, False)
        return w * keep.reshape(rows, cols)
    return w.masked_fill(torch.rand(rows, cols, generator=g) < sparsity, 0.0)


KERNEL_SHAPES = [
    (1, 1, 0.0),
    (7, 13, 0.5),
    (33, 17, 0.0),
    (5, 40, 0.95),
    (64, 100, 0.9),
    (96, 256, 0.7),
    (19, 129, 0.3),
]
"""(rows, cols, sparsity) for the sparse kernels' tests: odd widths (a last chunk of 16 columns and a last span of 32
partly empty, a last group of fewer than 8 rows), 0 to 95% sparse, more than one span."""
