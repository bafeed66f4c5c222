"""Save and load compressed checkpoints; the Hugging Face ``from_pretrained`` adapter.

A checkpoint directory holds:

- ``model.safetensors``: the state dict (tied duplicates stored once);
- ``config.json``: a wrapper config of ``model_type: "rankcut"`` around the original model config. Without
  ``import rankcut``, ``AutoModel*.from_pretrained`` stops with "unrecognized model type rankcut" instead of
  building the original architecture and filling the factorised layers with random weights;
- ``rankcut.json``: the versioned record (format version, rankcut version, architecture, method, config,
  per-target ranks, tied parameters, file sizes and SHA-256 digests);
- the tokenizer and generation config when available.

Loading builds the skeleton with parameters on the meta device, swaps the recorded targets for
:class:`LowRankLinear` of the recorded ranks, and assigns the tensors from the safetensors file; any missing,
unexpected, misshapen or corrupted tensor is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rankcut import __version__
from rankcut.compress import RECORD_ATTR
from rankcut.layers import LowRankLinear, dense_shape, low_rank_modules

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
RECORD = "rankcut.json"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or of an unknown format."""


# --------------------------------------------------------------------------------------------- saving


def sha256_file(path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared parameter stored once; ``tied`` maps dropped names to the kept name."""
    state, tied, owner = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in owner:
            tied[name] = owner[key]
            continue
        owner[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state, tied


def _fsync_tree(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def check_output(path: str | os.PathLike, overwrite: bool, marker: str = RECORD, kind: str = "rankcut checkpoint") -> None:
    """Raise unless ``path`` may receive an output: absent, or (with ``overwrite``) an empty directory or a
    directory holding ``marker`` (an earlier output of the same ``kind``). A non-empty directory of anything
    else is never overwritten.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``path`` is a file or a non-empty directory without ``marker``.
    """
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output {path} exists; pass overwrite=True (--overwrite) to replace it")
    if not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists()):
        raise ValueError(f"refusing to overwrite {path}: it is not a {kind} directory")


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` (compressed by :func:`rankcut.compress_`) to directory ``path`` atomically.

    Everything is written to a hidden sibling directory first and renamed into place at the end, so an
    interrupted save never leaves a directory at ``path`` that loads.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: the model holds no rankcut layers, or ``path`` is a non-empty directory that is not a
            rankcut checkpoint (never overwritten, to protect unrelated data).
    """
    path = Path(path)
    record = getattr(model, RECORD_ATTR, None)
    layers = low_rank_modules(model)
    if record is None or not layers:
        raise ValueError("model holds no rankcut low-rank layers: compress it with rankcut.compress_ first")
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        state, tied = _unique_state(model)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "rankcut_format": str(FORMAT_VERSION)})
        os.chmod(tmp / WEIGHTS, 0o644)
        base = model.config
        wrapper = RankcutConfig(base_config=base.to_dict())
        wrapper.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: False)():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "rankcut_version": __version__,
            "architecture": type(model).__name__,
            "base_model_prefix": getattr(model, "base_model_prefix", ""),
            "method": record["config"]["method"],
            "config": record["config"],
            "ranks": {name: layer.rank for name, layer in layers.items()},
            "dense": record.get("dense", {}),
            "tied": tied,
            "record": {k: v for k, v in record.items() if k not in ("config", "ranks", "dense")},
            "files": {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": sha256_file(tmp / WEIGHTS)}},
        }
        (tmp / RECORD).write_text(json.dumps(manifest, indent=1, default=str))
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
    log.info("saved %s (%d low-rank layers)", path, len(layers))
    return path


# --------------------------------------------------------------------------------------------- loading


@contextmanager
def params_on_meta():
    """Create parameters on the meta device (no memory, no init) while buffers stay real.

    Non-persistent buffers such as rotary ``inv_freq`` are not in the checkpoint; they must be computed
    normally, so only parameters are redirected.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``rankcut.json`` of a checkpoint, after checking the directory is complete."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    for name in (RECORD, CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        manifest = json.loads((path / RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / RECORD} is corrupted: {err}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path / RECORD} is corrupted: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has rankcut format {version!r}; this rankcut reads up to {FORMAT_VERSION}")
    lacking = [key for key, kind in (("architecture", str), ("config", dict), ("ranks", dict))
               if not isinstance(manifest.get(key), kind)]
    if lacking:
        raise CheckpointError(f"{path / RECORD} is corrupted: missing or invalid {', '.join(lacking)}")
    return manifest


def _verify_files(path: Path, manifest: dict, verify: bool) -> None:
    for name, info in manifest.get("files", {}).items():
        size = (path / name).stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path / name} is corrupted or truncated: {size} bytes, expected {info['bytes']}")
        if verify and sha256_file(path / name) != info["sha256"]:
            raise CheckpointError(f"{path / name} is corrupted: SHA-256 does not match the record")


def _base_config(path: Path) -> transformers.PretrainedConfig:
    try:
        data = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG} is corrupted: {err}") from None
    base = data.get("base_config") if isinstance(data, dict) else None
    if base is None or data.get("model_type") != "rankcut" or not isinstance(base, dict) or "model_type" not in base:
        raise CheckpointError(f"{path / CONFIG} is not a rankcut wrapper config")
    return transformers.AutoConfig.for_model(**base)


def _model_class(manifest: dict, config, auto_class):
    if auto_class is None:
        cls = getattr(transformers, manifest["architecture"], None)
        if cls is None:
            raise CheckpointError(f"transformers has no class {manifest['architecture']} (newer transformers needed?)")
        return cls
    mapping = auto_class._model_mapping
    if type(config) not in mapping:
        raise ValueError(f"{auto_class.__name__} cannot build a {config.model_type} model")
    return mapping[type(config)]


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    auto_class=None,
    verify: bool = True,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save`.

    Args:
        path: checkpoint directory.
        device: where to put the weights (default CPU).
        dtype: cast floating-point weights to this dtype (default: as stored).
        auto_class: build through this ``transformers`` auto class (e.g. ``AutoModel`` to get the bare
            encoder/decoder of a causal LM); default: the architecture that was saved.
        verify: check the SHA-256 of the weights file against the record (sizes are always checked).
        attn_implementation: attention kernel for transformers (``eager``, ``sdpa``…); default its choice.

    Raises:
        CheckpointError: missing or corrupted files, unknown format, tensors that do not fit the skeleton.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _verify_files(path, manifest, verify)
    config = _base_config(path)
    cls = _model_class(manifest, config, auto_class)
    with params_on_meta():
        model = cls._from_config(config, **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    prefix = manifest.get("base_model_prefix", "")
    strip = bool(auto_class is not None and prefix and cls.__name__ != manifest["architecture"]
                 and not hasattr(model, prefix))
    rename = (lambda key: key[len(prefix) + 1 :] if key.startswith(prefix + ".") else None) if strip else (lambda key: key)

    for name, rank in manifest["ranks"].items():
        target = rename(name)
        if target is None:
            continue
        try:
            dense = model.get_submodule(target)
        except AttributeError:
            raise CheckpointError(f"recorded target {name} does not exist in {cls.__name__}") from None
        out_f, in_f = dense_shape(dense)
        layer = LowRankLinear(in_f, out_f, rank, bias=getattr(dense, "bias", None) is not None, device="meta")
        parent_name, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    try:
        raw = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path / WEIGHTS} is corrupted: {err}") from None
    state = {}
    for key, tensor in raw.items():
        new = rename(key)
        if new is not None:
            state[new] = tensor
    tied = {rename(a): rename(b) for a, b in manifest.get("tied", {}).items() if rename(a) and rename(b)}
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
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
    setattr(model, RECORD_ATTR, {**manifest.get("record", {}), "config": manifest["config"],
                                 "ranks": manifest["ranks"], "dense": manifest.get("dense", {})})
    return model


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / RECORD).is_file()


# ------------------------------------------------------------------------------- Hugging Face adapter


class RankcutConfig(transformers.PretrainedConfig):
    """Wrapper config stored in a checkpoint's ``config.json``; ``base_config`` is the original config."""

    model_type = "rankcut"

    def __init__(self, base_config: dict | None = None, **kwargs) -> None:
        self.base_config = base_config or {}
        super().__init__(**kwargs)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Keywords the auto classes add on their own; they mean nothing for a local rankcut checkpoint.
_HF_INTERNAL = {"config", "_from_auto", "trust_remote_code", "adapter_kwargs", "revision", "cache_dir",
                "force_download", "local_files_only", "token", "proxies", "subfolder", "_commit_hash"}


def _from_pretrained_kwargs(kwargs: dict) -> dict:
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else _DTYPES[dtype]
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
