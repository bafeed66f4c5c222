"""vLLM plugin: serve rankcut checkpoints with vLLM's own model implementations.

Install with ``pip install "rankcut[vllm]"``; vLLM then calls :func:`register` (entry point
``vllm.general_plugins``) in each of its processes, and ``vllm serve CHECKPOINT`` or ``vllm.LLM(CHECKPOINT)``
open a rankcut checkpoint directory with no further flag:

- **config**: a checkpoint's ``config.json`` is rankcut's wrapper (``model_type: "rankcut"``), which plain
  ``transformers`` refuses. The plugin puts a config parser in front of vLLM's Hugging Face one: for a local
  rankcut checkpoint it returns the original model config (``base_config``: vLLM picks its own implementation
  of the original architecture, paged attention and scheduler unchanged) with ``quantization_config =
  {"quant_method": "rankcut", "targets": ...}`` made from ``rankcut.json``; anything else goes to vLLM's parser
  untouched. Nothing is written to the checkpoint and nothing is registered with ``transformers``: in the same
  process ``AutoModelForCausalLM.from_pretrained`` still refuses the checkpoint without ``import rankcut`` and
  loads it through rankcut with it.
- **layers**: the quantization method ``rankcut`` (:class:`~rankcut.integrations.vllm_layers.RankcutConfig`)
  gives each linear layer vLLM builds the factors of its recorded rank (per part for q/k/v and gate/up, whose
  parts may have different ranks or be dense), sharded for tensor parallelism by
  :mod:`rankcut.integrations.sharding`; layers the record leaves dense, and layers that are not targets (the
  LM head, embeddings), are vLLM's ordinary layers.
- **quantised factors** (``quant_lowrank``: int8 / fp8 / int4 codes with float32 scales) are loaded as codes
  and scales, each rank's share, and dequantised once after loading into the same float factors (in the model's
  dtype) as a ``lowrank`` target: a dequantising fallback that saves disk and download bytes, not GPU memory or
  bytes read per token (rankcut's dequantising Triton kernels are not used inside vLLM).

The helpers here read checkpoints with the standard library and ``safetensors`` only; the vLLM classes live in
:mod:`rankcut.integrations.vllm_layers`, imported by :func:`register`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rankcut.quant import FORMATS as FACTOR_FORMATS  # the formats of quant_lowrank targets (pure torch)

QUANT_METHOD = "rankcut"
RECORD = "rankcut.json"
CONFIG = "config.json"
#: Module types vLLM can serve: the factor pair of :class:`rankcut.modules.LowRankLinear`, and of
#: :class:`rankcut.modules.QuantLowRankLinear` (quantised factors, dequantised once after loading).
SUPPORTED_TYPES = ("lowrank", "quant_lowrank")

__all__ = ["FACTOR_FORMATS", "QUANT_METHOD", "RankcutVllmError", "SUPPORTED_TYPES", "checkpoint_dir",
           "checkpoint_keys", "factor_keys", "hf_config", "quantization_config", "register"]


class RankcutVllmError(ValueError):
    """A rankcut checkpoint vLLM cannot serve as it is (the message names the file, target or layer)."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the ``rankcut`` quantization method and the config
    parser (idempotent; vLLM calls it in every process it starts)."""
    from rankcut.integrations.vllm_layers import register_all

    register_all()


def checkpoint_dir(model: str | os.PathLike) -> Path | None:
    """``model`` as a local rankcut checkpoint directory (a ``config.json`` of ``model_type`` rankcut), or None."""
    try:
        path = Path(os.path.expanduser(str(model)))
        if not (path / CONFIG).is_file():
            return None
        data = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return path if isinstance(data, dict) and data.get("model_type") == "rankcut" else None


def factor_keys(name: str, entry: dict, bias: bool = False) -> tuple[str, ...]:
    """The checkpoint tensors a recorded target needs: ``U.weight`` and ``V.weight`` (and ``U.bias``) for
    ``lowrank``; ``V.codes``, ``V.scale``, ``U.codes``, ``U.scale`` (and ``bias``) for ``quant_lowrank``."""
    if entry.get("type") == "quant_lowrank":
        keys = tuple(f"{name}.{f}.{k}" for f in ("V", "U") for k in ("codes", "scale"))
        return keys + ((f"{name}.bias",) if bias else ())
    return (f"{name}.U.weight", f"{name}.V.weight") + ((f"{name}.U.bias",) if bias else ())


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RankcutVllmError(f"{path.parent} is a rankcut checkpoint without {path.name} ({what} missing)") from None
    except (OSError, ValueError) as err:
        raise RankcutVllmError(f"{path} is unreadable or corrupted: {err}") from None
    if not isinstance(data, dict):
        raise RankcutVllmError(f"{path} is corrupted: expected a JSON object")
    return data


def quantization_config(record: dict, source: str = RECORD) -> dict:
    """The ``quantization_config`` vLLM reads, from a checkpoint record (``rankcut.json``): the method name and,
    per decomposed target, its module type, rank and shape (and, for ``quant_lowrank``, the factor format and
    int4 group).

    Raises:
        RankcutVllmError: no targets, a target of a module type vLLM cannot serve (named: ``tucker``,
            ``shared_basis``, ...), a quantised target of an unknown format, or a runtime activation-decomposition
            plan (which vLLM would not apply).
    """
    runtime = record.get("runtime") or {}
    if isinstance(runtime, dict) and runtime.get("activation_decomposition") is not None:
        raise RankcutVllmError(f"{source}: the checkpoint carries a runtime activation-decomposition plan, which "
                               "rankcut.load applies and the vLLM plugin does not: vLLM would serve another model; "
                               "save the model without the plan (rankcut.runtime.remove_runtime) to serve it")
    targets = record.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise RankcutVllmError(f"{source}: no decomposed targets; nothing for the rankcut vLLM method to serve")
    out = {}
    for name, entry in targets.items():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in SUPPORTED_TYPES:
            raise RankcutVllmError(f"{source}: target {name} is of module type {kind!r}; the vLLM plugin serves "
                                   f"{', '.join(SUPPORTED_TYPES)} (factor pairs, float or quantised) only")
        rank, shape = entry.get("rank"), entry.get("shape")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise RankcutVllmError(f"{source}: target {name} needs an integer rank >= 1, got {rank!r}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise RankcutVllmError(f"{source}: target {name} needs a shape [out, in], got {shape!r}")
        out[name] = {"type": kind, "rank": rank, "shape": list(shape)}
        if kind == "quant_lowrank":
            fmt, group = entry.get("format"), entry.get("group") or 0
            if fmt not in FACTOR_FORMATS:
                raise RankcutVllmError(f"{source}: quantised target {name} has factor format {fmt!r}; the vLLM plugin "
                                       f"dequantises {', '.join(FACTOR_FORMATS)}")
            if fmt == "int4" and (isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2):
                raise RankcutVllmError(f"{source}: int4 target {name} needs an even group size >= 2, got {group!r}")
            out[name].update(format=fmt, group=group if fmt == "int4" else 0)
    dense = record.get("dense") or {}
    return {"quant_method": QUANT_METHOD, "format_version": record.get("format_version"),
            "architecture": record.get("architecture"), "targets": out,
            "dense": sorted(dense) if isinstance(dense, dict) else []}


def hf_config(path: str | os.PathLike):
    """``(config_dict, config)`` of a rankcut checkpoint for vLLM: the original model config (a
    ``transformers`` config of the original ``model_type``, with its ``architectures``) carrying the
    ``quantization_config`` of :func:`quantization_config`.

    Raises:
        RankcutVllmError: not a rankcut checkpoint, or its config or record is corrupted.
    """
    import transformers

    path = Path(os.path.expanduser(str(path)))
    wrapper = _read_json(path / CONFIG, "model config")
    base = wrapper.get("base_config")
    if wrapper.get("model_type") != "rankcut" or not isinstance(base, dict) or "model_type" not in base:
        raise RankcutVllmError(f"{path / CONFIG} is not a rankcut wrapper config")
    record = _read_json(path / RECORD, "the record")
    base = dict(base)
    if not base.get("architectures") and record.get("architecture"):
        base["architectures"] = [record["architecture"]]
    qc = quantization_config(record, str(path / RECORD))
    base.pop("quantization_config", None)
    try:
        config = transformers.AutoConfig.for_model(**base)
    except (KeyError, ValueError) as err:
        raise RankcutVllmError(f"{path / CONFIG}: transformers cannot build the original config "
                               f"(model_type {base.get('model_type')!r}): {err}") from None
    config._name_or_path = str(path)
    config.quantization_config = qc
    return {**base, "quantization_config": qc}, config


def checkpoint_keys(path: str | os.PathLike) -> set[str] | None:
    """Names of the tensors in a local checkpoint's safetensors files (headers only), or None when ``path`` is
    not a local directory with safetensors files."""
    from safetensors import safe_open

    path = Path(os.path.expanduser(str(path)))
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys
