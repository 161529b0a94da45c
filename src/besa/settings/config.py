"""Typed configuration for pruning and evaluation.

The same dataclasses drive the Python API, the CLI (`besa.cli` builds its flags from the fields' ``help``
metadata) and the ``config`` section of ``besa_report.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from besa.errors import BesaError

__all__ = [
    "NMPattern",
    "QuantSpec",
    "PruneConfig",
    "EvalConfig",
    "SpeedConfig",
    "MethodConfig",
    "parse_pattern",
]


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` per weight and ``group_size`` input columns per scale (``0``: one scale per output row)."""

    bits: int
    group_size: int = 128

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BesaError(f"--wbits must be between 2 and 8 (or 16 for no quantization), got {self.bits}")
        if self.group_size < 0:
            raise BesaError(
                f"--group-size must be positive, or 0 for one group per row, got {self.group_size}"
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, cols: int) -> int:
        """Number of groups of a row of ``cols`` input weights; the last one may be narrower."""
        if self.group_size == 0:
            return 1
        return -(-cols // self.group_size)


@dataclass(frozen=True)
class NMPattern:
    """N:M semi-structured sparsity: ``n`` zeros in every group of ``m`` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if self.m <= 0 or self.n <= 0 or self.n >= self.m:
            raise BesaError(f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M")

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str | None) -> NMPattern | None:
    """Parse ``"2:4"`` into ``NMPattern(2, 4)``; ``None``, ``""`` and ``"unstructured"`` give ``None``."""
    if text is None or text in ("", "unstructured"):
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise BesaError(f"invalid --pattern {text!r}: expected N:M with integers, for example 2:4")
    return NMPattern(int(parts[0]), int(parts[1]))


@dataclass
class MethodConfig:
    """Base of every method's own settings. Subclasses are registered with ``besa.registry.register_method``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PruneConfig:
    """Settings shared by every pruning method.

    Args:
        method: registered method name (``magnitude``, ``wanda``, ``sparsegpt``, ...).
        sparsity: fraction of weights set to zero in every pruned linear, in [0, 1). With an N:M pattern it
            defaults to N/M and must equal it if given.
        pattern: ``None`` for unstructured sparsity, or ``"N:M"``.
        calib: calibration source: a named set (``wikitext2``, ``ptb``, ``c4``, ``enwiki-articles``) or a path to a
            ``.jsonl`` (``text`` field) or ``.txt`` file.
        nsamples: number of calibration windows.
        seqlen: tokens per calibration window.
        bos: ``auto`` starts every calibration window with the BOS token when the tokenizer adds one by itself
            (window = BOS + seqlen - 1 tokens), ``always`` / ``never`` force it (``besa.model.data.resolve_bos``).
        seed: seed of the calibration sampler (and of anything random in a method).
        device: compute device for one block at a time (``cpu``, ``cuda``, ``cuda:1``); ``None`` picks CUDA if present.
        dtype: compute dtype; ``auto`` means float32 on CPU and bfloat16 on CUDA.
        forward_batch: calibration sequences per block forward (capture, statistics, propagation).
        wbits: weight bits (2-8) of asymmetric uniform fake quantization, applied block by block with the pruning
            (each method's own way: round-to-nearest after pruning, SparseGPT while pruning, BESA learned jointly);
            16 means no quantization.
        group_size: input columns sharing one scale and zero point; 0 means one per output row.
        allocation: ``uniform`` (every block gets ``sparsity``) or ``owl`` (block rates from the dense model's
            outlier ratios, spread over ``2 * owl_lambda`` around ``sparsity``; see ``besa.stages.allocation``).
        prune_routers: prune the routers of Mixture-of-Experts blocks too (``besa.model.blocks.classify_block_weights``
            says which weights are routers); by default they stay dense.
        expert_min_tokens: an expert (``besa.model.experts``) the calibration routes fewer tokens to is pruned by
            magnitude at the block's rate (N:M: the pattern). The default, 4, is where Wanda and SparseGPT start to
            beat magnitude on real linears pruned from that few tokens (``benchmarks/expert_min_tokens.py``). An
            expert no token reaches falls back whatever this is.
        expert_stats: ``routed`` (an expert's statistics come from the tokens its router sends it) or ``pooled``
            (from every token of the block: every expert runs on all of them while the method calibrates).
        leave_unknown_dense: go on when a block holds weights of a layout no method prunes, leaving them dense
            (by default the run stops before any work, naming the first).
        owl_m: OWL's outlier threshold, a multiple of the block's mean Wanda score.
        owl_lambda: OWL's spread: the block rates span ``2 * owl_lambda`` and average to ``sparsity``.
        within_block: how a layerwise method (Wanda, SparseGPT) or BESA's OBS update gathers its layers' statistics
            inside a block:
            ``parallel``, all from one pass over the dense block (as the papers do); ``sequential``, group by group
            in calling order (q/k/v, then o, gate/up, down), each after the groups before it are pruned, so every
            layer is fitted to the inputs it will really see (GPTQ's "true sequential"); ``None`` is the method's
            own default (``Pruner.default_within_block``: sequential for SparseGPT, measured better in
            BENCHMARKS.md's parity section, parallel for Wanda as its paper does).
        refit_epochs: epochs of blockwise weight reconstruction after each block is pruned (``besa.stages.
            reconstruct``): the surviving weights of the block's linears are trained with Adam, masks fixed, to
            reproduce the ``refit_target`` outputs; 0 is off, ``None`` the method's default
            (``Pruner.refit_default``: BESA's is 2 epochs below 70% sparsity and none from 70% on).
        refit_lr, refit_batch: Adam's learning rate and the windows per step.
        refit_target: ``dense-stream`` (the block fed the pruned model's stream must give the dense model's
            output), ``dense`` (fed the dense stream, give the dense output) or ``pruned-input`` (fed the pruned
            stream, give what the dense block gives on it).
        refit_holdout: the last calibration windows, never trained on, that decide when to stop (their loss is
            measured before and after every epoch; the best epoch's weights are kept).
        kl_epochs: epochs of the optional last stage (``besa.stages.distill``): with every mask fixed, the whole
            pruned model's surviving weights are trained (Adam, ``kl_lr``, ``kl_batch`` windows per step) toward the
            dense model's next-token distribution (its ``kl_topk`` most likely tokens per position) on the
            calibration windows; the last ``kl_holdout`` windows decide when to stop; 0 is off.
        quant_mode: ``joint``: methods that can quantize while they prune do so (SparseGPT inside its OBS sweep,
            BESA by learning clipping with the masks); ``rtn``: every method prunes, then rounds to nearest. Methods
            without a joint mode (magnitude, Wanda) always round to nearest after pruning.
    """

    method: str = field(default="wanda", metadata={"help": "pruning method"})
    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "target fraction of zeros per pruned linear, in [0, 1) (default: 0.5, or N/M with --pattern)"
        },
    )
    pattern: str | None = field(
        default=None, metadata={"help": "N:M semi-structured pattern, e.g. 2:4 or 4:8"}
    )
    calib: str = field(
        default="enwiki-articles",
        metadata={"help": "calibration source: wikitext2, ptb, c4, enwiki-articles, or a .jsonl/.txt path"},
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
    device: str | None = field(
        default=None, metadata={"help": "compute device: cpu, cuda, cuda:N (default: CUDA if available)"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"},
    )
    forward_batch: int = field(default=8, metadata={"help": "calibration sequences per block forward"})
    wbits: int = field(
        default=16, metadata={"help": "weight bits, 2-8 for fake quantization after/with pruning; 16: none"}
    )
    group_size: int = field(
        default=128, metadata={"help": "input columns per quantization scale; 0: one scale per output row"}
    )
    quant_mode: str = field(
        default="joint",
        metadata={"help": "with --wbits: joint (SparseGPT/BESA quantize while pruning) or rtn (round after)"},
    )
    allocation: str = field(
        default="uniform",
        metadata={
            "help": "how the target is spread over the blocks: uniform, or owl (outlier-weighted, Yin et al.)"
        },
    )
    prune_routers: bool = field(
        default=False,
        metadata={
            "help": "also prune the routers of Mixture-of-Experts blocks (linears making one logit per expert, and "
            "shared-expert gates); by default they stay dense and the report lists them"
        },
    )
    expert_min_tokens: int = field(
        default=4,
        metadata={
            "help": "a Mixture-of-Experts expert the calibration windows route fewer tokens to is pruned by weight "
            "magnitude at the block's rate instead (its statistics would be too thin: measured in BENCHMARKS.md, "
            "expert-min-tokens); the report gives every expert's token count"
        },
    )
    expert_stats: str = field(
        default="routed",
        metadata={
            "help": "the calibration statistics of a Mixture-of-Experts expert: routed (the tokens its router "
            "sends it) or pooled (every token of the block, as if every expert saw them all)"
        },
    )
    leave_unknown_dense: bool = field(
        default=False,
        metadata={
            "help": "leave block weights of a layout besa cannot prune (e.g. experts a model multiplies in an einsum) dense "
            "and go on, instead of stopping before any work; the report lists them"
        },
    )
    within_block: str | None = field(
        default=None,
        metadata={
            "help": "wanda, sparsegpt and BESA's OBS update: parallel (every layer's statistics from the dense block "
            "in one pass) or sequential (each group of layers sees the inputs left by the groups pruned before it); "
            "default: the method's own, sequential for sparsegpt, parallel for the others"
        },
    )
    refit_epochs: int | None = field(
        default=None,
        metadata={
            "help": "train each pruned block's surviving weights to reconstruct its outputs for this many epochs "
            "(0: off; default: the method's own: BESA 2 below 70%% sparsity and 0 from 70%%, the baselines 0)"
        },
    )
    refit_lr: float = field(default=3e-4, metadata={"help": "refit: Adam learning rate"})
    refit_target: str = field(
        default="dense-stream",
        metadata={
            "help": "refit: dense-stream (pruned stream in, dense model's block output out), dense (dense stream "
            "in and out) or pruned-input (pruned stream in, the dense block's output on it out)"
        },
    )
    refit_batch: int = field(default=4, metadata={"help": "refit: calibration windows per Adam step"})
    refit_holdout: int = field(
        default=4, metadata={"help": "refit: last calibration windows held out for early stopping"}
    )
    kl_epochs: int = field(
        default=0,
        metadata={
            "help": "last stage, masks fixed: train the whole pruned model's surviving weights toward the dense "
            "model's next-token distribution on the calibration windows (KL) for this many epochs (0: off)"
        },
    )
    kl_lr: float = field(default=1e-5, metadata={"help": "KL stage: Adam learning rate"})
    kl_topk: int = field(
        default=64, metadata={"help": "KL stage: the dense model's most likely tokens kept per position"}
    )
    kl_batch: int = field(default=4, metadata={"help": "KL stage: calibration windows per Adam step"})
    kl_holdout: int = field(
        default=4, metadata={"help": "KL stage: last calibration windows held out for early stopping"}
    )
    owl_m: float = field(
        default=5.0, metadata={"help": "OWL: a score above M times its block's mean is an outlier"}
    )
    owl_lambda: float = field(
        default=0.08, metadata={"help": "OWL: the block rates span 2*lambda around the target"}
    )

    def __post_init__(self) -> None:
        if self.wbits != 16:
            QuantSpec(self.wbits, self.group_size)  # validates
        if self.quant_mode not in ("joint", "rtn"):
            raise BesaError(f"--quant-mode must be joint or rtn, got {self.quant_mode!r}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            if self.sparsity is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
                raise BesaError(
                    f"--sparsity {self.sparsity} contradicts --pattern {nm} (which means {nm.sparsity:g})"
                )
            self.sparsity = nm.sparsity
            self.pattern = str(nm)
        if self.sparsity is None:
            self.sparsity = 0.5
        if not 0.0 <= self.sparsity < 1.0:
            raise BesaError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.expert_stats not in ("routed", "pooled"):
            raise BesaError(f"unknown --expert-stats {self.expert_stats!r}: choose routed or pooled")
        if self.expert_min_tokens < 0:
            raise BesaError(f"--expert-min-tokens must be 0 or more, got {self.expert_min_tokens}")
        for name in ("nsamples", "seqlen", "forward_batch"):
            if getattr(self, name) < 1:
                raise BesaError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}"
                )
        if self.allocation not in ("uniform", "owl"):
            raise BesaError(f"unknown --allocation {self.allocation!r}: choose uniform or owl")
        if self.allocation == "owl":
            if nm is not None:
                raise BesaError("--allocation owl varies the rate per block; an N:M --pattern fixes it")
            room = min(self.sparsity, 1 - self.sparsity) / 2  # the rates stay within target +- 2 lambda
            if not 0 <= self.owl_lambda <= room:
                raise BesaError(
                    f"--owl-lambda must be in [0, {room:.4g}] so every block's rate stays in [0, 1]"
                )
            if self.owl_m <= 0:
                raise BesaError(f"--owl-m must be positive, got {self.owl_m}")
        if self.bos not in ("auto", "always", "never"):
            raise BesaError(f"unknown --bos {self.bos!r}: choose auto, always or never")
        if self.within_block not in (None, "parallel", "sequential"):
            raise BesaError(f"unknown --within-block {self.within_block!r}: choose parallel or sequential")
        if self.refit_epochs is not None and self.refit_epochs < 0:
            raise BesaError(f"--refit-epochs must be 0 or more, got {self.refit_epochs}")
        if self.refit_target not in ("dense-stream", "dense", "pruned-input"):
            raise BesaError(
                f"unknown --refit-target {self.refit_target!r}: choose dense-stream, dense or pruned-input"
            )
        if not self.refit_lr > 0 or self.refit_batch < 1 or self.refit_holdout < 0:
            raise BesaError(
                "--refit-lr must be positive, --refit-batch at least 1, --refit-holdout 0 or more"
            )
        if (
            self.kl_epochs < 0
            or not self.kl_lr > 0
            or self.kl_topk < 1
            or self.kl_batch < 1
            or self.kl_holdout < 0
        ):
            raise BesaError(
                "--kl-epochs must be 0 or more, --kl-lr positive, --kl-topk and --kl-batch at least 1, "
                "--kl-holdout 0 or more"
            )
        if self.kl_epochs and self.wbits != 16:
            raise BesaError(
                "--kl-epochs trains full-precision weights: it cannot follow --wbits quantization"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise BesaError(f"unknown --dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")

    @property
    def nm(self) -> NMPattern | None:
        return parse_pattern(self.pattern)

    @property
    def quant(self) -> QuantSpec | None:
        """The weight quantization to apply, or ``None`` for full-precision weights (``wbits=16``)."""
        return None if self.wbits == 16 else QuantSpec(self.wbits, self.group_size)

    @property
    def joint_quant(self) -> QuantSpec | None:
        """The quantization a method that can quantize while it prunes does so with (``--quant-mode joint``), or
        ``None``: no quantization, or round to nearest after pruning. Decided here, once."""
        return self.quant if self.quant_mode == "joint" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _comma_list(text: str) -> tuple[str, ...]:
    """``"wikitext2, ptb"`` -> ``("wikitext2", "ptb")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _int_list(text: str) -> tuple[int, ...]:
    """``"1, 16"`` -> ``(1, 16)``."""
    try:
        return tuple(int(part) for part in _comma_list(text))
    except ValueError:
        raise BesaError(f"expected comma-separated integers, got {text!r}") from None


@dataclass
class SpeedConfig:
    """``besa speedup`` settings.

    Args:
        batch: batch sizes (sequences) to time the linears and the forward at.
        seqlen: tokens per sequence of the timed inputs.
        repeats: timed calls per measurement (after two warm-up calls); the median is kept.
        decode_tokens: greedy decode length (0: skip the decode).
        device: ``cpu`` or ``cuda``; ``None`` picks CUDA if present.
    """

    batch: tuple[int, ...] = field(
        default=(1, 16), metadata={"help": "batch sizes, comma-separated", "type": _int_list}
    )
    seqlen: int = field(default=128, metadata={"help": "tokens per sequence"})
    repeats: int = field(default=10, metadata={"help": "timed calls per measurement (the median is kept)"})
    decode_tokens: int = field(default=64, metadata={"help": "greedy decode length (0: no decode)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: CUDA if present)"})

    def __post_init__(self) -> None:
        if not self.batch or min(self.batch) < 1:
            raise BesaError(f"--batch must be positive integers, got {self.batch}")
        if self.seqlen < 1 or self.repeats < 1 or self.decode_tokens < 0:
            raise BesaError("--seqlen and --repeats must be positive, --decode-tokens 0 or more")


@dataclass
class PlanConfig:
    """``besa plan`` settings: the run whose memory is planned (the method's own defaults fill the rest).

    Args:
        method: the pruning method.
        nsamples, seqlen: the calibration windows.
        device: ``cpu`` or ``cuda`` (where the blocks are computed; need not be present).
        dtype: compute dtype; ``auto`` means float32 on CPU and bfloat16 on CUDA.
        stream: plan a ``--stream`` run.
        forward_batch: windows per block forward.
        refit_epochs, within_block: as in ``PruneConfig`` (``None``: the method's default).
        kl_epochs: plan the optional KL stage (``PruneConfig.kl_epochs``; its batch and top-k at their defaults).
    """

    method: str = field(default="besa", metadata={"help": "the pruning method to plan"})
    nsamples: int = field(default=128, metadata={"help": "calibration windows"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per calibration window"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (need not be present)"})
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16"},
    )
    stream: bool = field(default=False, metadata={"help": "plan a --stream run (one block in memory)"})
    forward_batch: int = field(default=8, metadata={"help": "windows per block forward"})
    refit_epochs: int | None = field(default=None, metadata={"help": "refit epochs (default: the method's)"})
    within_block: str | None = field(
        default=None, metadata={"help": "parallel or sequential (default: the method's)"}
    )
    kl_epochs: int = field(default=0, metadata={"help": "plan the KL stage too (0: off)"})

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 1 or self.forward_batch < 1:
            raise BesaError("--nsamples, --seqlen and --forward-batch must be positive")
        if self.kl_epochs < 0:
            raise BesaError(f"--kl-epochs must be 0 or more, got {self.kl_epochs}")
        if self.kl_epochs and self.stream:
            raise BesaError("--kl-epochs trains the whole model at once: it cannot run with --stream")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise BesaError(f"unknown --device {self.device!r}: use cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise BesaError(f"unknown --dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.within_block not in (None, "parallel", "sequential"):
            raise BesaError(f"unknown --within-block {self.within_block!r}: choose parallel or sequential")


@dataclass
class EvalConfig:
    """Perplexity evaluation settings (SparseGPT/Wanda/BESA protocol).

    Args:
        datasets: names of the evaluation sets (``wikitext2``, ``ptb``, ``c4``) or paths of ``.jsonl``/``.txt``
            files.
        seqlen: window length; windows do not overlap.
        max_windows: evaluate only the first W windows (``None``: all).
        batch_size: windows per forward.
        device: compute device; ``None`` picks CUDA if present.
        dtype: compute dtype; ``auto`` means float32 on CPU and bfloat16 on CUDA.
        tasks: zero-shot tasks of the lm-evaluation-harness (``besa.evaluation.zeroshot``; ``paper`` = the paper's six).
        limit, num_fewshot, task_dir: the harness's examples per task, shots, and a folder of local task YAMLs.
        bos: as ``PruneConfig.bos``, for the evaluation windows: a departure from the LLaMA-1 protocol, which put
            one BOS at the start of the whole text; for tokenizers that add none (GPT-2, SmolLM2) nothing changes
            under ``auto``.
    """

    datasets: tuple[str, ...] = field(
        default=("wikitext2",),
        metadata={
            "help": "comma-separated datasets: wikitext2, ptb, c4, each optionally NAME:SPLIT (ptb:valid), or "
            ".jsonl/.txt files (documents joined with blank lines; named by file name); none: zero-shot only",
            "flag": "--ppl",
            "type": _comma_list,
        },
    )
    seqlen: int = field(default=2048, metadata={"help": "window length in tokens"})
    max_windows: int | None = field(default=None, metadata={"help": "evaluate only the first W windows"})
    batch_size: int = field(default=1, metadata={"help": "windows per forward (1 is fastest on CPU)"})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:N (default: CUDA if available)"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"}
    )
    bos: str = field(
        default="auto",
        metadata={
            "help": "start every window with the BOS token (window = BOS + seqlen - 1 tokens): auto (when the "
            "tokenizer adds one), always, never"
        },
    )
    tasks: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "zero-shot tasks of the lm-evaluation-harness, comma-separated; 'paper' is the paper's six "
            "(piqa, boolq, hellaswag, winogrande, arc_easy, arc_challenge); needs besa[eval]",
            "type": _comma_list,
            "const": "paper",
            "group": "zero-shot",
        },
    )
    limit: int | None = field(
        default=None, metadata={"help": "zero-shot: first N examples of each task", "group": "zero-shot"}
    )
    num_fewshot: int = field(
        default=0, metadata={"help": "zero-shot: examples shown before each question", "group": "zero-shot"}
    )
    task_dir: str | None = field(
        default=None,
        metadata={
            "help": "zero-shot: a folder of lm-eval task YAMLs and data (offline)",
            "group": "zero-shot",
        },
    )

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise BesaError(f"--limit must be positive, got {self.limit}")
        if self.num_fewshot < 0:
            raise BesaError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if self.datasets == ("none",):
            self.datasets = ()
        if not self.datasets and not self.tasks:
            raise BesaError("nothing to evaluate: give --ppl datasets or --tasks")
        if self.bos not in ("auto", "always", "never"):
            raise BesaError(f"unknown --bos {self.bos!r}: choose auto, always or never")
        if self.seqlen < 2:
            raise BesaError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise BesaError(f"--max-windows must be positive, got {self.max_windows}")
        if self.batch_size < 1:
            raise BesaError(f"--batch-size must be positive, got {self.batch_size}")
