"""Perplexity with the SparseGPT/Wanda/BESA protocol: tokenize the joined test text once, cut non-overlapping
windows of ``seqlen`` tokens, average the next-token NLL over all windows, exponentiate."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from besa.errors import BesaError
from besa.evaluation.zeroshot import zero_shot
from besa.model.data import eval_name, load_eval_text, resolve_bos, with_bos
from besa.model.loading import check_seqlen, prepare_model, resolve_device, resolve_dtype, resolve_model
from besa.settings.commands import EvalConfig

__all__ = ["PerplexityResult", "perplexity", "windows_of", "evaluate"]


@dataclass
class PerplexityResult:
    """``ppl`` over ``windows`` windows of ``seqlen`` tokens (``tokens`` = windows * seqlen, BOS included when
    every window starts with one: ``bos``)."""

    ppl: float
    tokens: int
    seqlen: int
    windows: int
    nll: float
    bos: bool = False

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "ppl": self.ppl, "tokens": self.tokens, "seqlen": self.seqlen, "windows": self.windows, "bos": self.bos,
        }  # fmt: skip


def windows_of(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping (W, seqlen) windows of a 1-D token tensor; the tail shorter than ``seqlen`` is dropped."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


def eval_windows(
    ids: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None
) -> torch.Tensor:
    """The (W, seqlen) evaluation windows of the 1-D token tensor ``ids``; with ``bos`` every window is that token
    then ``seqlen - 1`` tokens of the text."""
    windows = windows_of(ids, seqlen - 1 if bos is not None else seqlen, max_windows)
    return with_bos(windows, bos) if bos is not None else windows


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "Perplexity",
    bos: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` (already on ``device``) on the (W, T) token ``windows`` (``eval_windows``), every
    token after the first predicted; ``bos`` says the windows start with the BOS token (the report's flag)."""
    total_nll = 0.0
    total_predicted = 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=None if progress else True):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_predicted += batch[:, 1:].numel()
        del logits
    mean_nll = total_nll / total_predicted
    return PerplexityResult(
        ppl=math.exp(mean_nll), tokens=windows.numel(), seqlen=windows.shape[1], windows=windows.shape[0],
        nll=mean_nll, bos=bos,
    )  # fmt: skip


def evaluate(
    model: str | nn.Module,
    *,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Perplexity of ``model`` on each dataset: ``{"wikitext2": {"ppl", "tokens", "seqlen", "windows"}, ...}`` (a
    ``.jsonl``/``.txt`` file is keyed by its file name), and with ``tasks`` the zero-shot accuracies under
    ``"zero_shot"`` (``besa.evaluation.zeroshot``: ``{task: {"acc", "acc_norm"}, "mean": {...}}``).

    ``settings`` are ``EvalConfig``'s fields (``datasets``, ``seqlen``, ``max_windows``, ``batch_size``, ``device``,
    ``dtype``, ``bos``, ``tasks``, ``limit``, ``num_fewshot``, ``task_dir``), each with its default; an unknown
    one is a ``BesaError`` naming it.

    Example:
        >>> besa.evaluate("smollm2-135m", datasets=["wikitext2"], seqlen=512)["wikitext2"]["ppl"]
    """
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    for key in settings:
        if key not in known:
            raise BesaError(f"unknown evaluation setting {key!r} (known: {', '.join(sorted(known))})")
    for key in ("datasets", "tasks"):
        if key in settings:
            settings[key] = tuple(settings[key])
    config = EvalConfig(**settings)
    if isinstance(model, str):
        resolve_model(model)  # a missing path fails before any data is read
    # an unknown dataset fails before the model is loaded
    texts = {eval_name(name): load_eval_text(name) for name in config.datasets}
    if len(texts) < len(config.datasets):
        raise BesaError(
            f"--ppl names one dataset twice (files are named by their file name): {config.datasets}"
        )
    if config.datasets:
        check_seqlen(model, config.seqlen)
    compute_device = resolve_device(config.device)
    model, tokenizer, _ = prepare_model(
        model, tokenizer, resolve_dtype(config.dtype, compute_device), trust_remote_code
    )
    if config.datasets:
        check_seqlen(model, config.seqlen)  # a GGUF model's config is known only now
    model.to(compute_device)
    bos_id = resolve_bos(config.bos, tokenizer)
    results: dict[str, Any] = {}
    try:
        for name, text in texts.items():
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if progress:
                count = ids.numel() // (config.seqlen - (bos_id is not None))
                count = min(count, config.max_windows) if config.max_windows else count
                first = " (BOS first)" if bos_id is not None else ""
                tqdm.write(
                    f"besa eval: {name}: {count} windows x {config.seqlen} tokens{first}", file=sys.stderr
                )
            try:
                windows = eval_windows(ids, config.seqlen, config.max_windows, bos_id)
                res: PerplexityResult = perplexity(
                    model, windows, config.batch_size, compute_device, progress, desc=f"Perplexity {name}",
                    bos=bos_id is not None,
                )  # fmt: skip
            except ValueError as exc:
                raise BesaError(f"{name}: {exc}") from None
            results[name] = res.to_dict()
        if config.tasks:
            results["zero_shot"] = zero_shot(model, tokenizer, config, str(compute_device))
    finally:
        model.to("cpu")
    return results
