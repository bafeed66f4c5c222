"""Save and load compressed checkpoints.

A checkpoint directory holds:

- the weights as safetensors, written by ``huggingface_hub`` (``model.safetensors``, or shards
  ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` above ``max_shard_size``); tied
  duplicates are stored once;
- ``config.json``: a wrapper config of ``model_type: "rankcut"`` around the original model config
  (:mod:`rankcut.hf`). Without ``import rankcut``, ``AutoModel*.from_pretrained`` stops with "unrecognized model
  type rankcut" instead of building the original architecture and filling the factorised layers with random
  weights;
- ``rankcut.json``: the typed record (:class:`~rankcut.record.Record`): format version, architecture, config,
  one module-type entry per decomposed target, tied parameters, every weights file's size and SHA-256;
- the tokenizer and generation config when available.

Loading builds the skeleton with parameters on the meta device (``accelerate.init_empty_weights``), rebuilds
each recorded target from its module type (:func:`rankcut.modules.module_type`), and assigns the tensors;
any missing, unexpected, misshapen or corrupted tensor or file is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from rankcut.modules import module_type, rankcut_modules, record_entry
from rankcut.record import FORMAT_VERSION, Record, RecordError, get_record, set_record
from rankcut.targets import replace_module
from rankcut.utils import dtype_name

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
RECORD = "rankcut.json"
CONFIG = "config.json"
#: The progress file of an unfinished streaming compression (:mod:`rankcut.streaming`); gone once it is done.
PROGRESS = "rankcut-progress.json"
MAX_SHARD_SIZE = "5GB"

__all__ = ["CheckpointError", "FORMAT_VERSION", "RankcutConfig", "check_output", "is_checkpoint", "load", "read_record",
           "save", "sha256_file"]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or of an unknown format."""


def sha256_file(path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / RECORD).is_file()


def check_output(path: str | os.PathLike, overwrite: bool, marker: str = RECORD, kind: str = "rankcut checkpoint",
                 flag: str = "overwrite=True") -> None:
    """Raise unless ``path`` may receive an output: absent, or (with ``overwrite``) an empty directory or a
    directory holding ``marker`` (an earlier output of the same ``kind``). A non-empty directory of anything
    else is never overwritten. ``flag`` is how the caller's user asks to overwrite (``--overwrite`` in the CLI).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``path`` is a file or a non-empty directory without ``marker``.
    """
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output {path} exists; pass {flag} to replace it")
    if not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists()):
        raise ValueError(f"refusing to overwrite {path}: it is not a {kind} directory")


# ------------------------------------------------------------------------------------ wrapper config


class RankcutConfig(transformers.PretrainedConfig):
    """Wrapper config stored in a checkpoint's ``config.json``; ``base_config`` is the original config."""

    model_type = "rankcut"

    def __init__(self, base_config: dict | None = None, **kwargs) -> None:
        self.base_config = base_config or {}
        super().__init__(**kwargs)


def base_config(path: Path) -> transformers.PretrainedConfig:
    """The original model config inside a checkpoint's wrapper ``config.json``."""
    try:
        data = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG} is corrupted: {err}") from None
    base = data.get("base_config") if isinstance(data, dict) else None
    if base is None or data.get("model_type") != "rankcut" or not isinstance(base, dict) or "model_type" not in base:
        raise CheckpointError(f"{path / CONFIG} is not a rankcut wrapper config")
    return transformers.AutoConfig.for_model(**base)


def model_class(architecture: str, config, auto_class):
    """The transformers class to build: the saved ``architecture``, or what ``auto_class`` maps ``config`` to."""
    if auto_class is None:
        cls = getattr(transformers, architecture, None)
        if cls is None:
            raise CheckpointError(f"transformers has no class {architecture} (newer transformers needed?)")
        return cls
    mapping = auto_class._model_mapping
    if type(config) not in mapping:
        raise ValueError(f"{auto_class.__name__} cannot build a {config.model_type} model")
    return mapping[type(config)]


# --------------------------------------------------------------------------------------------- saving


def unique_state(model: nn.Module, dtype: torch.dtype | None,
                 select: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared parameter stored once (``tied`` maps dropped names to the kept name), on the
    CPU, floating-point tensors cast to ``dtype``; tensors that share storage without being the same tensor
    (views of one buffer, as fused layers have) are copied so that safetensors accepts them.

    ``select(name)``: only the names it accepts are returned (one shard of a checkpoint written piece by piece,
    :mod:`rankcut.streaming`); ties are still found against every tensor of the model, so a selected name tied
    to an earlier one elsewhere is a tie, exactly as in the whole state dict."""
    state, tied, owner, storages = {}, {}, {}, {}
    fixed = {f"{prefix}.{key}" for prefix, module in model.named_modules() if getattr(module, "keeps_dtype", False)
             for key in module._buffers}  # quantised codes and their scales keep their dtypes
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        chosen = select is None or select(name)
        if key in owner:
            if chosen:
                tied[name] = owner[key]
            continue
        owner[key] = name
        if not chosen:
            continue
        value = tensor.detach()
        if dtype is not None and value.is_floating_point() and name not in fixed:
            value = value.to(dtype)
        value = value.contiguous().cpu()
        if value.numel():
            storage = value.untyped_storage()
            if storage.data_ptr() in storages or storage.nbytes() != value.numel() * value.element_size():
                value = value.clone()  # a view of a larger buffer, or memory another tensor also uses
            storages[value.untyped_storage().data_ptr()] = name
        state[name] = value
    return state, tied


def _fsync_tree(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def weight_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint directory: the shards of its index, or the single file."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            return sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path / INDEX} is corrupted: {err}") from None
    return [WEIGHTS]


#: The metadata of a checkpoint's safetensors (a single file; a sharded checkpoint's index has it, its shards
#: ``{"format": "pt"}``, as ``huggingface_hub`` writes them).
SAFETENSORS_METADATA = {"format": "pt", "rankcut_format": str(FORMAT_VERSION)}


def write_side_files(model: nn.Module, directory: Path, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """The files of a checkpoint besides weights and record: the wrapper ``config.json`` (the model's config,
    with ``dtype`` as stored), the generation config of a generative model, and the tokenizer."""
    base = model.config.to_dict()
    if dtype is not None:
        base["dtype"] = dtype_name(dtype)
    RankcutConfig(base_config=base).save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def checkpoint_record(model: nn.Module, record: Record, tied: dict[str, str], files: dict[str, dict],
                      dtype: torch.dtype | None = None) -> Record:
    """The record a checkpoint of ``model`` stores: ``record`` (the model's, from compression) with one entry per
    decomposed layer (its dtype the stored one), the architecture, the ties, and ``files`` (each weights file's
    ``{"bytes", "sha256"}``)."""
    targets = {name: record_entry(layer) for name, layer in rankcut_modules(model).items()}
    if dtype is not None:
        for entry in targets.values():
            if "dtype" in entry:
                entry["dtype"] = dtype_name(dtype)
    return Record(**{**record.to_json(), "targets": targets, "architecture": type(model).__name__,
                     "base_model_prefix": getattr(model, "base_model_prefix", ""), "tied": tied, "files": files,
                     "format_version": FORMAT_VERSION})


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> dict:
    """Write one safetensors file atomically (a hidden temporary file, flushed to disk, renamed into place; mode
    0644 as :func:`save` leaves them) and return its ``{"bytes", "sha256"}`` for the record."""
    from safetensors.torch import save_file

    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(state, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The ``model.safetensors.index.json`` of a sharded checkpoint, in ``huggingface_hub``'s form."""
    index = {"metadata": {"total_size": total_size, **SAFETENSORS_METADATA}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         dtype: torch.dtype | str | None = None, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Write ``model`` (compressed by :func:`rankcut.compress_`) to directory ``path`` atomically.

    Everything is written to a hidden sibling directory first and renamed into place at the end, so an
    interrupted save never leaves a directory at ``path`` that loads.

    Args:
        dtype: store floating-point tensors in this dtype (default: as they are in the model; the model is not
            changed).
        max_shard_size: weights above this size are split into shards (``huggingface_hub``), e.g. ``"5GB"``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: the model holds no rankcut layers, or ``path`` is a non-empty directory that is not a
            rankcut checkpoint (never overwritten, to protect unrelated data).
    """
    from huggingface_hub import save_torch_state_dict

    from rankcut.utils import parse_dtype

    path = Path(path)
    dtype = parse_dtype(dtype)
    record = get_record(model)
    layers = rankcut_modules(model)
    if record is None or not layers:
        raise ValueError("model holds no rankcut low-rank layers: compress it with rankcut.compress_ first")
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        state, tied = unique_state(model, dtype)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata=SAFETENSORS_METADATA)
        write_side_files(model, tmp, tokenizer, dtype)
        files = weight_files(tmp) + ([INDEX] if (tmp / INDEX).is_file() else [])
        for name in files:
            os.chmod(tmp / name, 0o644)
        digests = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files}
        out = checkpoint_record(model, record, tied, digests, dtype)
        (tmp / RECORD).write_text(json.dumps(out.to_json(), indent=1, default=str))
        _fsync_tree(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            old.rename(path)  # the new checkpoint never arrived: put the old one back
        raise
    log.info("saved %s (%d decomposed layers)", path, len(layers))
    return path


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weights files of a checkpoint or Hugging Face model directory (0 if there are none)."""
    path = Path(path)
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


# --------------------------------------------------------------------------------------------- loading


def read_record(path: str | os.PathLike) -> Record:
    """The :class:`Record` of a checkpoint directory, after checking the directory is complete.

    Raises:
        CheckpointError: not a directory, not a rankcut checkpoint, missing files, unreadable record.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / RECORD).is_file():
        if (path / PROGRESS).is_file():
            raise CheckpointError(f"{path} is an unfinished streaming compression ({PROGRESS}, no {RECORD}): run the "
                                  "same compression again to finish it")
        if (path / CONFIG).is_file():
            raise CheckpointError(f"{path} is not a rankcut checkpoint (no {RECORD}): it looks like a Hugging Face "
                                  "model directory; load it with transformers, or compress it with rankcut first")
        raise CheckpointError(f"{path} is not a rankcut checkpoint (no {RECORD})")
    try:
        data = json.loads((path / RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / RECORD} is corrupted: {err}") from None
    try:
        record = Record.from_json(data)
    except RecordError as err:
        raise CheckpointError(f"{path / RECORD} is corrupted: {err}") from None
    for name in [CONFIG, *weight_files(path)]:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    return record


def _verify_files(path: Path, record: Record, verify: bool) -> None:
    for name, info in record.files.items():
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = (path / name).stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path / name} is corrupted or truncated: {size} bytes, expected {info['bytes']}")
        if verify and sha256_file(path / name) != info["sha256"]:
            raise CheckpointError(f"{path / name} is corrupted: SHA-256 does not match the record")
    unlisted = [f for f in weight_files(path) if f not in record.files]
    if record.files and unlisted:
        raise CheckpointError(f"{path}: weights file(s) {unlisted} are not in the record")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for name in weight_files(path):
        try:
            state.update(load_file(str(path / name), device="cpu"))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{path / name} is corrupted: {err}") from None
    return state


def _check_ties(path: Path, record: Record, rename, tied: dict[str, str]) -> None:
    """Every factor a module shares (its entry's ``ties``) must be a recorded tie of the checkpoint to the
    same owner: safetensors stores a shared factor once, and a lost tie would leave the layer without it."""
    for name, entry in record.targets.items():
        target = rename(name)
        for local, owner in (entry.get("ties") or {}).items():
            alias, source = f"{target}.{local}", rename(owner)
            if target is None or source is None:
                continue
            if tied.get(alias, alias) != tied.get(source, source):  # the two names must end at one stored tensor
                raise CheckpointError(f"{path / RECORD}: target {name} shares {local} with {owner}, but the checkpoint "
                                      f"does not record that tie (it has {tied.get(alias)!r}): the file was edited "
                                      "or written by another tool; re-save it from the model with rankcut.save")


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_load_dtype(record: Record, dtype) -> None:
    """``load``'s ``dtype`` casts the float weights (and sets the activations' dtype); quantised factors keep their
    codes and scales whatever it is. A dtype that cannot be a compute dtype — an integer type, or a float8
    type, which would mean re-quantising — is refused, naming what the checkpoint stores.

    Raises:
        CheckpointError: a ``dtype`` that is not float16, bfloat16, float32 or float64.
    """
    if dtype is None or dtype in COMPUTE_DTYPES:
        return
    formats = sorted({e.get("format") for e in record.targets.values() if e.get("type") == "quant_lowrank"})
    stored = (f"its factors are stored quantised ({', '.join(formats)} codes with float32 scales), which dtype= "
              "does not change; " if formats else "")
    raise CheckpointError(f"cannot load with dtype={dtype}: {stored}dtype= sets the compute dtype and must be one of "
                          f"{', '.join(str(d).removeprefix('torch.') for d in COMPUTE_DTYPES)}")


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    auto_class=None,
    verify: bool = True,
    attn_implementation: str | None = None,
    fuse: bool = False,
) -> nn.Module:
    """Load a checkpoint written by :func:`save` (format 1 or 2, single file or sharded).

    Args:
        path: checkpoint directory.
        device: where to put the weights (default CPU).
        dtype: cast floating-point weights to this dtype (default: as stored).
        auto_class: build through this ``transformers`` auto class (e.g. ``AutoModel`` to get the bare
            encoder/decoder of a causal LM); default: the architecture that was saved.
        verify: check the SHA-256 of every weights file against the record (sizes are always checked).
        attn_implementation: attention kernel for transformers (``eager``, ``sdpa``…); default its choice.
        fuse: group layers that read one input (q/k/v, gate/up) for inference
            (:func:`rankcut.fuse.prepare_for_inference`; undo with :func:`rankcut.fuse.unfuse`).

    Raises:
        CheckpointError: missing or corrupted files, unknown format, tensors that do not fit the skeleton.
    """
    from accelerate import init_empty_weights

    path = Path(path)
    record = read_record(path)
    check_load_dtype(record, dtype)
    _verify_files(path, record, verify)
    config = base_config(path)
    cls = model_class(record.architecture, config, auto_class)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    prefix = record.base_model_prefix
    strip = bool(auto_class is not None and prefix and cls.__name__ != record.architecture
                 and not hasattr(model, prefix))
    rename = (lambda key: key[len(prefix) + 1:] if key.startswith(prefix + ".") else None) if strip else (lambda key: key)

    for name, entry in record.targets.items():
        target = rename(name)
        if target is None:
            continue
        try:
            dense = model.get_submodule(target)
        except AttributeError:
            raise CheckpointError(f"recorded target {name} does not exist in {cls.__name__}") from None
        try:
            layer = module_type(entry["type"]).from_record(entry, dense, device="meta")
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path / RECORD}: target {name}: {err.args[0] if err.args else err}") from None
        replace_module(model, target, layer)

    state = {}
    for key, tensor in _read_tensors(path).items():
        new = rename(key)
        if new is not None:
            state[new] = tensor
    tied = {rename(a): rename(b) for a, b in record.tied.items() if rename(a) and rename(b)}
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    _check_ties(path, record, rename, tied)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for alias, source in tied.items():
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"parameters not in the checkpoint: {left[:5]}")
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    set_record(model, record)
    if fuse:
        from rankcut.fuse import prepare_for_inference

        prepare_for_inference(model)
    plan = (record.runtime or {}).get("activation_decomposition")
    if plan is not None:  # runtime activation decomposition recorded with the model (rankcut.runtime)
        from rankcut.runtime import RuntimePlan, apply_runtime

        try:
            apply_runtime(model, RuntimePlan.from_json(plan))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path / RECORD}: runtime plan: {err}") from None
    return model
