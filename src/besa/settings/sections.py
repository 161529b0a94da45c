"""The sections of a pruning run's settings (``PruneConfig.calibration``, ``.runtime``, ``.quantization``,
``.allocation``, ``.experts``; the training stages' ``.refit`` and ``.kl`` are in ``besa.settings.training``): each a
small typed dataclass that checks its own values. Their flat names (flags, recipe keys) are made by
``besa.settings.flat``."""

from __future__ import annotations

from dataclasses import dataclass, field

from besa.errors import BesaError
from besa.registry import ALLOCATIONS
from besa.settings.flat import Section
from besa.settings.values import QuantSpec, check_choice

__all__ = ["AllocationSettings", "CalibrationSettings", "ExpertSettings", "QuantSettings", "RuntimeSettings"]


@dataclass
class CalibrationSettings(Section):
    """The calibration windows.

    Args:
        source: a named set (``wikitext2``, ``ptb``, ``c4``, ``enwiki-articles``) or a path to a ``.jsonl``
            (``text`` field) or ``.txt`` file.
        nsamples: number of windows; seqlen: tokens per window; seed: the sampler's seed (and of anything random
            in a method).
        bos: ``auto`` starts every window with the BOS token when the tokenizer adds one by itself (window = BOS +
            seqlen - 1 tokens), ``always`` / ``never`` force it (``besa.model.data.resolve_bos``).
    """

    source: str = field(
        default="enwiki-articles",
        metadata={
            "name": "calib",
            "help": "calibration source: wikitext2, ptb, c4, enwiki-articles, or a .jsonl/.txt path",
        },
    )
    nsamples: int = field(default=128, metadata={"help": "number of calibration windows"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per calibration window"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration sampler"})
    bos: str = field(
        default="auto",
        metadata={
            "help": "start every calibration window with the BOS token: auto (when the tokenizer adds one), "
            "always, never"
        },
    )

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen"):
            if getattr(self, name) < 1:
                raise BesaError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        check_choice("bos", self.bos)


@dataclass
class RuntimeSettings(Section):
    """Where and how blocks are computed: ``device`` (``None``: CUDA if present), ``dtype`` (``auto``: float32 on
    CPU, bfloat16 on CUDA) and ``forward_batch``, windows per block forward."""

    device: str | None = field(
        default=None, metadata={"help": "compute device: cpu, cuda, cuda:N (default: CUDA if available)"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"},
    )
    forward_batch: int = field(default=8, metadata={"help": "calibration sequences per block forward"})

    def __post_init__(self) -> None:
        if self.forward_batch < 1:
            raise BesaError(f"--forward-batch must be a positive integer, got {self.forward_batch}")
        check_choice("dtype", self.dtype)


@dataclass
class QuantSettings(Section):
    """Weight quantization: ``wbits`` (2-8; 16 is none) of asymmetric uniform fake quantization with one scale per
    ``group_size`` input columns (0: per row), applied block by block with the pruning; ``mode`` ``joint``: methods
    that can quantize while they prune do so (SparseGPT inside its OBS sweep, BESA by learning clipping with the
    masks), ``rtn``: every method prunes, then rounds to nearest (magnitude and Wanda always do)."""

    wbits: int = field(
        default=16, metadata={"help": "weight bits, 2-8 for fake quantization after/with pruning; 16: none"}
    )
    group_size: int = field(
        default=128, metadata={"help": "input columns per quantization scale; 0: one scale per output row"}
    )
    mode: str = field(
        default="joint",
        metadata={
            "name": "quant_mode",
            "help": "with --wbits: joint (SparseGPT/BESA quantize while pruning) or rtn (round after)",
        },
    )

    def __post_init__(self) -> None:
        if self.wbits != 16:
            QuantSpec(self.wbits, self.group_size)  # validates
        check_choice("quant-mode", self.mode)

    @property
    def spec(self) -> QuantSpec | None:
        """The weight quantization to apply, or ``None`` for full-precision weights (``wbits=16``)."""
        return None if self.wbits == 16 else QuantSpec(self.wbits, self.group_size)

    @property
    def joint(self) -> QuantSpec | None:
        """The quantization a method that can quantize while it prunes does so with (``mode`` joint), or ``None``:
        no quantization, or round to nearest after pruning. Decided here, once."""
        return self.spec if self.mode == "joint" else None


@dataclass
class AllocationSettings(Section):
    """How the target sparsity is spread over the blocks: ``policy`` ``uniform`` (every block gets it) or ``owl``
    (block rates from the dense model's outlier ratios, ``besa.stages.allocation``): a score above ``owl_m`` times
    its block's mean is an outlier; the rates span ``2 * owl_lambda`` around the target."""

    policy: str = field(
        default="uniform",
        metadata={
            "name": "allocation",
            "help": "how the target is spread over the blocks: uniform, or owl (outlier-weighted, Yin et al.)",
        },
    )
    owl_m: float = field(
        default=5.0, metadata={"help": "OWL: a score above M times its block's mean is an outlier"}
    )
    owl_lambda: float = field(
        default=0.08, metadata={"help": "OWL: the block rates span 2*lambda around the target"}
    )

    def __post_init__(self) -> None:
        if self.policy not in ALLOCATIONS:
            raise BesaError(f"unknown --allocation {self.policy!r}: choose {' or '.join(ALLOCATIONS)}")


@dataclass
class ExpertSettings(Section):
    """Mixture-of-Experts blocks and layouts no method prunes.

    Args:
        prune_routers: prune the routers too (``besa.model.blocks.classify_block_weights`` says which weights are
            routers); by default they stay dense.
        min_tokens: an expert (``besa.model.experts``) the calibration routes fewer tokens to is pruned by magnitude
            at the block's rate (N:M: the pattern). The default, 4, is where Wanda and SparseGPT start to beat
            magnitude on real linears pruned from that few tokens (``benchmarks/expert_min_tokens.py``). An expert
            no token reaches falls back whatever this is.
        stats: ``routed`` (an expert's statistics come from the tokens its router sends it) or ``pooled`` (from
            every token of the block: every expert runs on all of them while the method calibrates).
        leave_unknown_dense: go on when a block holds weights of a layout no method prunes, leaving them dense (by
            default the run stops before any work, naming the first).
    """

    prune_routers: bool = field(
        default=False,
        metadata={
            "help": "also prune the routers of Mixture-of-Experts blocks (linears making one logit per expert, and "
            "shared-expert gates); by default they stay dense and the report lists them"
        },
    )
    min_tokens: int = field(
        default=4,
        metadata={
            "name": "expert_min_tokens",
            "help": "a Mixture-of-Experts expert the calibration windows route fewer tokens to is pruned by weight "
            "magnitude at the block's rate instead (its statistics would be too thin: measured in benchmarks/NOTES.md, "
            "expert-min-tokens); the report gives every expert's token count",
        },
    )
    stats: str = field(
        default="routed",
        metadata={
            "name": "expert_stats",
            "help": "the calibration statistics of a Mixture-of-Experts expert: routed (the tokens its router "
            "sends it) or pooled (every token of the block, as if every expert saw them all)",
        },
    )
    leave_unknown_dense: bool = field(
        default=False,
        metadata={
            "help": "leave block weights of a layout besa cannot prune (e.g. experts a model multiplies in an einsum) dense "
            "and go on, instead of stopping before any work; the report lists them"
        },
    )

    def __post_init__(self) -> None:
        check_choice("expert-stats", self.stats)
        if self.min_tokens < 0:
            raise BesaError(f"--expert-min-tokens must be 0 or more, got {self.min_tokens}")
