"""Hugging Face glue: the wrapper config of a checkpoint, ``AutoModel*.from_pretrained`` on rankcut
checkpoints after ``import rankcut``, and one loader for anything a user can name (a rankcut checkpoint, a
local model directory, a Hub id)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import transformers

from rankcut.io import CONFIG, CheckpointError, RankcutConfig, is_checkpoint, load
from rankcut.utils import parse_dtype

log = logging.getLogger(__name__)


# Keywords the auto classes add on their own; they mean nothing for a local rankcut checkpoint.
_HF_INTERNAL = {"config", "_from_auto", "trust_remote_code", "adapter_kwargs", "revision", "cache_dir",
                "force_download", "local_files_only", "token", "proxies", "subfolder", "_commit_hash"}


def _from_pretrained_kwargs(kwargs: dict) -> dict:
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else parse_dtype(dtype)
    device = kwargs.pop("device_map", None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, dict):
        raise ValueError("rankcut checkpoints load onto one device; pass device_map as a device name")
    options = {"dtype": dtype, "device": device}
    if kwargs.get("attn_implementation"):
        options["attn_implementation"] = kwargs.pop("attn_implementation")
    ignored = sorted(k for k, v in kwargs.items() if k not in _HF_INTERNAL and v is not None)
    if ignored:
        log.warning("rankcut checkpoint: from_pretrained ignores %s", ", ".join(ignored))
    return options


def _wrapper_class(auto_class) -> type:
    class Loader(transformers.PreTrainedModel):
        config_class = RankcutConfig

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            if not is_checkpoint(pretrained_model_name_or_path):
                raise CheckpointError(f"{pretrained_model_name_or_path} is not a local rankcut checkpoint directory")
            wrapper = kwargs.get("config")
            chosen = getattr(wrapper, "_attn_implementation_internal", None)  # absorbed by AutoConfig
            options = _from_pretrained_kwargs(kwargs)
            if chosen and "attn_implementation" not in options:
                options["attn_implementation"] = chosen
            return load(pretrained_model_name_or_path, auto_class=auto_class, **options)

    Loader.__name__ = Loader.__qualname__ = f"Rankcut{auto_class.__name__.removeprefix('Auto')}"
    return Loader


def register_with_transformers() -> None:
    """Teach ``AutoConfig`` and the ``AutoModel*`` classes to open rankcut checkpoints (idempotent)."""
    transformers.AutoConfig.register("rankcut", RankcutConfig, exist_ok=True)
    for auto in (
        transformers.AutoModel,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForMaskedLM,
        transformers.AutoModelForSequenceClassification,
    ):
        auto.register(RankcutConfig, _wrapper_class(auto), exist_ok=True)


# ----------------------------------------------------------------------------------- loading anything


def looks_local(spec: str) -> bool:
    """Paths are local; Hub ids are ``name`` or ``org/name``."""
    return os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def stored_dtype(spec: str) -> torch.dtype | None:
    """The dtype a model directory or checkpoint stores its weights in (None when it cannot be told)."""
    path = Path(os.path.expanduser(spec))
    try:
        data = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("model_type") == "rankcut":
        data = data.get("base_config") or {}
    name = data.get("dtype") or data.get("torch_dtype") if isinstance(data, dict) else None
    try:
        return parse_dtype(name) if isinstance(name, str) else None
    except ValueError:
        return None


def load_any(spec: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """``(model, tokenizer)`` from a rankcut checkpoint, a local Hugging Face model directory or a Hub id.

    The tokenizer is None (with a warning) when there is none.

    Raises:
        ValueError: the path does not exist, is not a model directory, or the model cannot be loaded.
    """
    expanded = os.path.expanduser(spec)
    if is_checkpoint(expanded):
        model = load(expanded, device=device, dtype=dtype)
    else:
        if looks_local(spec) and not os.path.isdir(expanded):
            raise ValueError(f"model path {spec} does not exist")
        if os.path.isdir(expanded) and not os.path.isfile(os.path.join(expanded, CONFIG)):
            raise ValueError(f"{spec} is not a model directory (no config.json)")
        try:
            config = transformers.AutoConfig.from_pretrained(expanded)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load model {spec}: {err}") from None
        arch = (config.architectures or [""])[0]
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            cls = transformers.AutoModelForCausalLM
        else:
            cls = getattr(transformers, arch, None) or transformers.AutoModel
        kwargs = {"dtype": dtype} if dtype is not None else {}
        try:
            model = cls.from_pretrained(expanded, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load model {spec}: {err}") from None
        if device:
            model.to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(expanded)
    except (OSError, ValueError, TypeError) as err:
        log.warning("no tokenizer for %s (%s)", spec, err)
        tokenizer = None
    return model, tokenizer
