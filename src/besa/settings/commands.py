"""The settings of the commands beside ``prune``: ``besa eval`` (``EvalConfig``), ``besa speedup``
(``SpeedConfig``), ``besa plan`` (``PlanConfig``, made of ``PruneConfig``'s own sections) and ``besa generate``
(``GenerateConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from besa.errors import BesaError
from besa.settings.config import PruneConfig
from besa.settings.flat import section
from besa.settings.sections import CalibrationSettings, RuntimeSettings
from besa.settings.training import KLSettings, RefitSettings
from besa.settings.values import check_choice

__all__ = ["EvalConfig", "GenerateConfig", "PlanConfig", "SpeedConfig"]


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
        threads: CPU thread counts to time everything at, one after the other (CUDA: ignored).
        bf16: on the CPU also time the model in bfloat16, dense against sparse with bfloat16 values.
    """

    batch: tuple[int, ...] = field(
        default=(1, 16), metadata={"help": "batch sizes, comma-separated", "type": _int_list}
    )
    seqlen: int = field(default=128, metadata={"help": "tokens per sequence"})
    repeats: int = field(default=10, metadata={"help": "timed calls per measurement (the median is kept)"})
    decode_tokens: int = field(default=64, metadata={"help": "greedy decode length (0: no decode)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: CUDA if present)"})
    threads: tuple[int, ...] = field(
        default=(1, 2), metadata={"help": "CPU thread counts, comma-separated", "type": _int_list}
    )
    bf16: bool = field(
        default=True,
        metadata={"help": "time fp32 only, not also bfloat16 dense and sparse", "flag": "--no-bf16"},
    )

    def __post_init__(self) -> None:
        if not self.batch or min(self.batch) < 1:
            raise BesaError(f"--batch must be positive integers, got {self.batch}")
        if not self.threads or min(self.threads) < 1:
            raise BesaError(f"--threads must be positive integers, got {self.threads}")
        if self.seqlen < 1 or self.repeats < 1 or self.decode_tokens < 0:
            raise BesaError("--seqlen and --repeats must be positive, --decode-tokens 0 or more")


@dataclass
class PlanConfig:
    """``besa plan`` settings: the run whose memory is planned, in ``PruneConfig``'s own sections (only the settings
    that change the memory are flags; the method's own defaults fill the rest).

    Args:
        method: the pruning method.
        device: ``cpu`` or ``cuda`` (where the blocks are computed; need not be present).
        stream: plan a ``--stream`` run.
        calibration, runtime, refit, kl: as in ``PruneConfig`` (``nsamples``, ``seqlen``, ``dtype``,
            ``forward_batch``, ``refit_epochs``, ``kl_epochs``); ``within_block`` too.
    """

    method: str = field(default="besa", metadata={"help": "the pruning method to plan"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (need not be present)"})
    stream: bool = field(default=False, metadata={"help": "plan a --stream run (one block in memory)"})
    calibration: CalibrationSettings = section(CalibrationSettings, only=("nsamples", "seqlen"))
    runtime: RuntimeSettings = section(RuntimeSettings, only=("dtype", "forward_batch"))
    within_block: str | None = field(
        default=None, metadata={"help": "parallel or sequential (default: the method's)"}
    )
    refit: RefitSettings = section(RefitSettings, only=("refit_epochs",))
    kl: KLSettings = section(KLSettings, only=("kl_epochs",))

    def __post_init__(self) -> None:
        if self.kl.epochs and self.stream:
            raise BesaError("--kl-epochs trains the whole model at once: it cannot run with --stream")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise BesaError(f"unknown --device {self.device!r}: use cpu or cuda")
        check_choice("within-block", self.within_block)

    def prune_config(self) -> PruneConfig:
        """The planned run's ``PruneConfig`` (every other setting at its default)."""
        return PruneConfig(
            method=self.method, calibration=self.calibration, refit=self.refit, kl=self.kl,
            within_block=self.within_block,
        )  # fmt: skip


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
        check_choice("bos", self.bos)
        if self.seqlen < 2:
            raise BesaError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise BesaError(f"--max-windows must be positive, got {self.max_windows}")
        if self.batch_size < 1:
            raise BesaError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass
class GenerateConfig:
    """``besa generate`` settings.

    Args:
        prompt: the text to continue.
        max_new_tokens: tokens generated greedily after the prompt.
        dtype: the values the pruned linears hold, and the rest of the model's dtype: ``float32`` or ``bfloat16``.
        check_dense: also decode with the folder's weights made dense and say whether the tokens are the same.
        bits: 0 holds float values; 8 or 4 integer codes with a scale and zero point per row and group of columns
            (the folder's ``--wbits`` codes where it has them, else rounded at load on groups of ``group_size``).
        group_size: columns per scale of codes rounded at load (a multiple of 16, or 0: one per row).
    """

    prompt: str = field(default="The capital of France is", metadata={"help": "the text to continue"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated greedily after the prompt"})
    dtype: str = field(
        default="float32", metadata={"help": "the kept values' and the model's dtype: float32 or bfloat16"}
    )
    check_dense: bool = field(
        default=False,
        metadata={"help": "also decode with the weights made dense and say whether the tokens are the same"},
    )
    bits: int = field(
        default=0,
        metadata={
            "help": "0: float values; 8 or 4: integer codes (the folder's --wbits codes, else rounded at load)"
        },
    )
    group_size: int = field(default=128, metadata={"help": "columns per scale of codes rounded at load"})

    def __post_init__(self) -> None:
        if self.bits not in (0, 4, 8):
            raise BesaError(f"--bits must be 0 (float values), 8 or 4, got {self.bits}")
        if self.group_size < 0 or self.group_size % 16:
            raise BesaError(
                f"--group-size must be a multiple of 16, or 0 for one group a row, got {self.group_size}"
            )
        if self.max_new_tokens < 1:
            raise BesaError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.dtype not in ("float32", "bfloat16"):
            raise BesaError(f"unknown --dtype {self.dtype!r}: the sparse kernels hold float32 or bfloat16")
