"""Zero-shot accuracy with the lm-evaluation-harness (``lm-eval`` 0.4.x, ``pip install 'besa[eval]'``), run
in-process on an already loaded model (its ``HFLM`` wraps the model object).

The paper's six tasks are ``PAPER_TASKS`` (``--tasks paper``). They download their data from the Hugging Face hub;
a task that cannot be loaded is one line naming it and what to do: give ``--task-dir`` a folder with the task's
YAML and its data files (the harness's own task format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from besa.errors import BesaError
from besa.settings.commands import EvalConfig

__all__ = ["PAPER_TASKS", "expand_tasks", "zero_shot"]

PAPER_TASKS = ("piqa", "boolq", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
METRICS = ("acc", "acc_norm")
INSTALL = "pip install 'besa[eval]' (lm-eval 0.4.x)"


def expand_tasks(tasks: tuple[str, ...] | list[str]) -> list[str]:
    """Task names with ``paper`` replaced by the paper's six, duplicates dropped, order kept."""
    out: list[str] = []
    for name in tasks:
        for task in PAPER_TASKS if name == "paper" else (name,):
            if task not in out:
                out.append(task)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def zero_shot(
    model: nn.Module, tokenizer: Any, config: EvalConfig, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """``{task: {"acc": ..., "acc_norm": ...}, ..., "mean": {...}}`` (fractions; a metric the task does not report
    is left out, and the mean of a metric is over the tasks that report it), for ``config``'s tasks (``paper``: the
    paper's six), ``limit`` examples each, ``num_fewshot`` shots, ``batch_size`` and local ``task_dir``."""
    tasks, limit, num_fewshot = expand_tasks(config.tasks), config.limit, config.num_fewshot
    batch_size, task_dir = config.batch_size, config.task_dir
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise BesaError(f"--tasks needs the lm-evaluation-harness: {INSTALL}") from None
    if task_dir is not None and not Path(task_dir).is_dir():
        raise BesaError(f"--task-dir {str(task_dir)!r} is not a folder")
    manager = None
    # indexing the harness's thousands of built-in tasks takes seconds: only when a task is not in task_dir
    if task_dir is not None:
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        if not all(task in manager.all_tasks for task in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(task_dir) if task_dir is not None else None)
    for task in tasks:  # load each task's data first, so a failure names its task
        if task not in manager.all_tasks:
            raise BesaError(f"unknown zero-shot task {task!r}: not an lm-eval task, nor in --task-dir")
        try:
            get_task_dict([task], manager)
        except Exception as exc:  # the harness and datasets raise many kinds (offline hub, missing files)
            raise BesaError(
                f"zero-shot task {task!r} could not load its data ({_first_line(exc)}); it needs the Hugging Face "
                "hub: offline, pass --task-dir with a folder holding the task's YAML and data files"
            ) from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=False, bootstrap_iters=0,
    )  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        found = out["results"].get(task, {})
        results[task] = {m: float(found[f"{m},none"]) for m in METRICS if f"{m},none" in found}
    means = {m: [r[m] for r in results.values() if m in r] for m in METRICS}
    results["mean"] = {m: sum(v) / len(v) for m, v in means.items() if v}
    return results
