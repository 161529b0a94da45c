"""One side of the SparseGPT parity benchmark, run as its own process so that each tool's CPU time and memory are
its own. ``ours`` runs under the project's interpreter, ``peer`` under a separate virtual environment that holds
llm-compressor; both read the same calibration windows (a safetensors file with an ``ids`` tensor (N, T)).

    python _parity_worker.py ours|ours:VARIANT|peer MODEL_FOLDER IDS_FILE OUT_FOLDER SPARSITY

``ours:VARIANT`` runs one of ``VARIANTS`` (``--within-block sequential|parallel``, ``--obs-target dense``,
``--mask-block 128``); plain ``ours`` runs our defaults.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "sequential": {"within_block": "sequential"},
    "parallel": {"within_block": "parallel"},
    "dense-target": {"method_options": {"obs_target": "dense"}},
    "mask128": {"method_options": {"mask_block": 128}},  # the paper's (and the peer's) mask block
}


def _ours(model: str, ids, out: str, sparsity: float, variant: str | None = None) -> None:
    import besa

    extra = VARIANTS[variant] if variant else {}
    besa.prune(
        model, method="sparsegpt", sparsity=sparsity, calib_ids=ids, nsamples=ids.shape[0], seqlen=ids.shape[1],
        out=out, overwrite=True, progress=False, checkpoint=False, **extra,
    )  # fmt: skip


def _peer(model_folder: str, ids, out: str, sparsity: float) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = SparseGPTModifier(
        sparsity=sparsity, mask_structure="0:0", block_size=128, dampening_frac=0.01,
        targets=[r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"], ignore=["lm_head"],
    )  # fmt: skip
    oneshot(
        model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], pipeline="sequential", shuffle_calibration_samples=False,
    )  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    side, model, ids_file, out, sparsity = sys.argv[1:6]
    import torch
    from safetensors.torch import load_file

    ids = load_file(ids_file)["ids"]
    cpu, wall = time.process_time(), time.perf_counter()
    if side == "peer":
        _peer(model, ids, out, float(sparsity))
    else:
        _ours(model, ids, out, float(sparsity), side.partition(":")[2] or None)
    facts = {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    (Path(out) / "parity_timing.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
