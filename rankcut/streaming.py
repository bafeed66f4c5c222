"""Compression of models larger than host memory: blocks streamed from disk, the checkpoint written as it goes.

:func:`compress_streaming` is :func:`rankcut.compress_` followed by :func:`rankcut.save` for a model that is never
whole in memory. The model is a skeleton on the meta device (``accelerate.init_empty_weights``); the tensors
outside the block stack (embeddings, final norm, LM head) are read from the source's safetensors and written to
the output as its first shard; then the block pipeline (:func:`rankcut.pipeline.run_blocks` with a
:class:`StreamedBlocks` source) reads one block at a time (``safetensors.safe_open``, only that block's tensors),
runs the calibration activations through it, hands it to the same :class:`~rankcut.pipeline.Compression` visitor
as ``compress_`` (statistics -> plan -> decompose -> swap), writes the compressed block as its own shard with a
progress file, and frees it. At the end come the index, the wrapper ``config.json``, the tokenizer and the record
``rankcut.json`` (files with sizes and SHA-256, exactly what :func:`rankcut.save` records), which makes the
directory a checkpoint: until then :func:`rankcut.load` refuses it.

Host memory: one block (dense, and its factors while it is written), the calibration activations and the
tensors outside the blocks, whatever the depth. The result's tensors are bit-identical to ``compress_`` then
``save`` with the same settings (tested); only the file layout (one shard per block) and the timings differ.

**Resume.** A run that stops (Ctrl-C, a crash, a time limit) leaves the finished blocks' shards and the progress
file; the same call continues at the first unfinished block. The activations entering it are recomputed: by
default the statistics are those of the *dense* model, so the blocks before it are read from the source again
and run forward (exact, and free when nothing was interrupted); with ``sequential`` calibration they are the
*compressed* model's in the compute dtype, which the stored shards (cast to the storage dtype) cannot reproduce,
so each block's outputs are saved to disk after it (the latest only) and read back. A resumed run with other
settings (config, calibration windows, source weights, dtypes) is refused, naming what differs: the settings
are compared up front (the source by its files' sizes and safetensors headers, and the SHA-256 of the tensors
outside the blocks), and each finished block's source tensors are read again and checked against the SHA-256
recorded when it was compressed, before anything new is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from rankcut.calibrate import with_hidden
from rankcut.compress import _finish, check_inputs, policy_context
from rankcut.config import CompressConfig
from rankcut.data import calibration_windows, source_name
from rankcut.io import (
    CONFIG,
    INDEX,
    PROGRESS,
    RECORD,
    WEIGHTS,
    check_output,
    checkpoint_record,
    sha256_file,
    unique_state,
    write_index,
    write_safetensors,
    write_side_files,
)
from rankcut.modules import module_type, rankcut_modules, record_entry
from rankcut.pipeline import BlockSource, Compression, check_finite_weights, propagate, run_blocks
from rankcut.policies import make_policy
from rankcut.record import get_record
from rankcut.summary import CompressionSummary, TargetRow
from rankcut.targets import find_targets, replace_module, target_infos
from rankcut.utils import Timer, count_params, default_seq_len, dtype_name, parse_dtype, resolve_device

log = logging.getLogger(__name__)

PROGRESS_FORMAT = 1
#: Sequential calibration: the outputs of the last finished block, for a resumed run.
ACTIVATIONS = "rankcut-activations"

__all__ = ["SourceModel", "StreamedBlocks", "compress_streaming", "source_digest"]


# ------------------------------------------------------------------------------------------------ the source


class SourceModel:
    """A local Hugging Face model directory with safetensors weights, read one tensor group at a time.

    ``model`` is its skeleton (parameters on the meta device, in the compute ``dtype``); ``keys`` maps each
    model tensor name to ``(file, name in the file)`` after transformers' own renamings (a checkpoint of an
    older layout, a base-model prefix added or stripped), exactly as ``from_pretrained`` maps them.

    Raises:
        ValueError: not a local directory of a Hugging Face model with safetensors weights (the message says
            what it is instead), or weights that need transformers' tensor conversions (fused experts …).
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                 device: torch.device | None = None) -> None:
        self.spec = os.path.expanduser(str(path))
        self.path = Path(self.spec)
        self.files = check_source(path)
        self.config = transformers.AutoConfig.from_pretrained(self.spec)
        self.stored_dtype = _stored_dtype(self.config)
        device = device or torch.device("cpu")
        if dtype in (None, "auto"):  # as the command line's --dtype auto: float32 on a CPU, as stored elsewhere
            dtype = torch.float32 if device.type == "cpu" else (self.stored_dtype or torch.float32)
        self.dtype = parse_dtype(dtype)
        self.model = self._skeleton()
        self.keys = self._key_map()

    def _skeleton(self) -> nn.Module:
        from accelerate import init_empty_weights

        arch = (self.config.architectures or [""])[0]
        with init_empty_weights(include_buffers=False):
            if arch.endswith(("ForCausalLM", "LMHeadModel")):
                model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
            else:
                cls = getattr(transformers, arch, None) or transformers.AutoModel
                model = (cls._from_config(self.config, dtype=self.dtype) if cls is not transformers.AutoModel
                         else cls.from_config(self.config, dtype=self.dtype))
        model.eval()
        if model.can_generate() and (self.path / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(self.spec)
        return model

    def _key_map(self) -> dict[str, tuple[str, str]]:
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = self.model.state_dict()
        keys: dict[str, tuple[str, str]] = {}
        for file in self.files:
            with safe_open(str(self.path / file), framework="pt") as handle:
                names = list(handle.keys())
            for name in names:
                new, pattern = rename_source_key(name, renamings, converters, self.model.base_model_prefix, meta)
                if pattern is not None:
                    raise ValueError(f"{self.spec}: tensor {name} needs transformers' weight conversion ({pattern} -> "
                                     f"{new}), which streaming does not apply: compress this model in memory")
                if new in meta:
                    keys[new] = (file, name)
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        params = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        missing = sorted(name for name in params if name not in keys and name not in tied)
        if missing:
            raise ValueError(f"{self.spec}: the weights lack {len(missing)} parameter(s) of {type(self.model).__name__}, "
                             f"e.g. {missing[:3]} (from_pretrained would initialise them at random)")
        return keys

    def fingerprint(self) -> dict:
        """What identifies the source's weights cheaply: each weights file's size and the SHA-256 of its
        safetensors header (names, dtypes, shapes, offsets), and the SHA-256 of ``config.json``."""
        files = {}
        for file in self.files:
            with open(self.path / file, "rb") as handle:
                head = handle.read(8)
                size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                header = head + handle.read(size)
            files[file] = {"bytes": (self.path / file).stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()}
        return {"files": files, "config_sha256": sha256_file(self.path / CONFIG)}

    def read(self, names: list[str], device: torch.device | str = "cpu", digest=None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (model names), each file opened once and closed after (its pages unmapped),
        cast to the skeleton's dtype for floating-point tensors, on ``device`` (as ``from_pretrained`` does).
        ``digest`` (a ``hashlib`` object) is updated with each name and its stored bytes, file by file in the
        order given. One tensor at a time is held in its stored dtype next to the converted ones."""
        from safetensors import safe_open

        meta = self.model.state_dict(keep_vars=True)
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.keys[name][0], []).append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as handle:
                for name in group:
                    tensor = handle.get_slice(self.keys[name][1])[...]
                    if digest is not None:
                        digest.update(name.encode())
                        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
                    dtype = meta[name].dtype if tensor.is_floating_point() else None
                    out[name] = tensor.to(device=device, dtype=dtype)
                    del tensor
        return {name: out[name] for name in names}

    def load_outside(self, prefix: str) -> str:
        """Read every tensor outside the block stack ``prefix`` into the skeleton (and tie what the model ties).
        Returns the SHA-256 of their names and stored bytes."""
        names = [name for name in self.keys if not name.startswith(prefix + ".")]
        digest = hashlib.sha256()
        self.model.load_state_dict(self.read(names, digest=digest), strict=False, assign=True)
        tied = getattr(self.model, "all_tied_weights_keys", None)
        if tied:
            everything = set(self.model.state_dict())
            self.model.tie_weights(missing_keys=everything - set(self.keys), recompute_mapping=False)
        return digest.hexdigest()

    def block_names(self, prefix: str, index: int) -> list[str]:
        head = f"{prefix}.{index}."
        return [name for name in self.keys if name.startswith(head)]


def check_source(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a local Hugging Face model directory (the shards of its index, or the one file).

    Raises:
        ValueError: what ``path`` is instead: missing (a Hub id?), a file, a rankcut checkpoint, no config.json,
            PyTorch ``.bin`` weights only, an index naming missing shards.
    """
    from rankcut.hf import looks_local

    spec = str(path)
    root = Path(os.path.expanduser(spec))
    if not root.exists():
        hint = "" if looks_local(spec) else (" (a Hub id? streaming reads a local copy: download it first, e.g. "
                                             f"`hf download {spec} --local-dir DIR`)")
        raise ValueError(f"streaming compression reads a local model directory; {spec} does not exist{hint}")
    if not root.is_dir():
        raise ValueError(f"streaming compression reads a local model directory; {spec} is a file")
    if (root / RECORD).is_file():
        raise ValueError(f"{spec} is a rankcut checkpoint: streaming compression starts from a dense Hugging Face "
                         "model directory")
    if not (root / CONFIG).is_file():
        raise ValueError(f"{spec} is not a model directory (no config.json)")
    if (root / INDEX).is_file():
        try:
            files = sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{root / INDEX} is not a safetensors index: {err}") from None
        absent = [f for f in files if not (root / f).is_file()]
        if absent:
            raise ValueError(f"{spec}: shard(s) {absent[:3]} of {INDEX} are missing")
        return files
    if (root / WEIGHTS).is_file():
        return [WEIGHTS]
    if list(root.glob("*.bin")) or list(root.glob("*.pt")) or list(root.glob("*.pth")):
        raise ValueError(f"{spec} holds PyTorch pickle weights (.bin), not safetensors: streaming reads safetensors "
                         "tensor by tensor; convert it first (load it and save_pretrained it), or compress it in memory")
    raise ValueError(f"{spec} holds no safetensors weights ({WEIGHTS} or {INDEX})")


def _stored_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    try:
        return parse_dtype(str(value).removeprefix("torch.")) if value else None
    except ValueError:
        return None


def source_digest(source: SourceModel) -> str:
    """:func:`rankcut.sensitivity.model_digest` of the source model as loaded in the compute dtype, computed one
    block at a time (a plan from ``rankcut search`` names the weights it was made for)."""
    from rankcut.targets import find_blocks

    model = source.model
    prefix = find_blocks(model)[0]
    if not any(p.device.type != "meta" for p in model.parameters()):
        source.load_outside(prefix)
    digest, block = hashlib.sha256(), (None, {})
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            index = int(name[len(prefix) + 1:].split(".", 1)[0])
            if block[0] != index:
                block = (index, source.read(source.block_names(prefix, index)))
            tensor = block[1][name]
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ the output


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=1, default=str))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _plain(value):
    """JSON-normal form (tuples as lists, dtypes as names), for comparing settings with a stored copy."""
    return json.loads(json.dumps(value, default=str))


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between the settings of an unfinished run and this one, in words."""
    out = []
    if old.get("source") != new.get("source"):
        files = sorted(set(old.get("source", {}).get("files", {})) | set(new["source"]["files"]))
        changed = [f for f in files if old.get("source", {}).get("files", {}).get(f) != new["source"]["files"].get(f)]
        what = (f"weights file(s) {', '.join(changed[:3])}" if changed else "config.json"
                if old.get("source", {}).get("config_sha256") != new["source"]["config_sha256"]
                else "the tensors outside the blocks")
        out.append(f"source model: {what} differ ({old.get('source_path')} there, {new.get('source_path')} here)")
    if old.get("calibration") != new.get("calibration"):
        def text(c):
            return "none" if not c else f"{c['source']} {c['windows'][0]}x{c['windows'][1]} (sha256 {c['sha256'][:12]})"
        out.append(f"calibration windows: {text(old.get('calibration'))} there, {text(new.get('calibration'))} here")
    old_config, new_config = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            out.append(f"config {key}: {old_config.get(key)!r} there, {new_config.get(key)!r} here")
    for key, label in (("dtype", "compute dtype"), ("save_dtype", "storage dtype"), ("format", "progress format")):
        if old.get(key) != new.get(key):
            out.append(f"{label}: {old.get(key)} there, {new.get(key)} here")
    return out


class Output:
    """The output directory of a streaming compression: its progress file, shards and final files."""

    def __init__(self, path: Path, settings: dict, blocks: int, prefix: str) -> None:
        self.path, self.settings, self.blocks, self.prefix = path, _plain(settings), blocks, prefix
        self.progress: dict = {"format": PROGRESS_FORMAT, "settings": self.settings, "blocks": blocks,
                               "prefix": prefix, "outside": None, "done": [], "activations": None, "device": None}

    @property
    def total_shards(self) -> int:
        return self.blocks + 1

    def open(self, resume: bool, overwrite: bool) -> int:
        """Prepare the directory; return the first block to compress (0, or where an unfinished run stopped).

        Raises:
            FileExistsError / ValueError: :func:`rankcut.io.check_output`'s rules for anything but an unfinished
                streaming run; ValueError: an unfinished run with other settings, or a damaged one.
        """
        path = self.path
        if path.is_dir() and (path / PROGRESS).is_file() and not (path / RECORD).is_file():
            if resume:
                self.progress = self._read_progress()
                return len(self.progress["done"])
            log.warning("discarding the unfinished streaming compression in %s (resume=False)", path)
        else:
            check_output(path, overwrite)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        self.save_progress()
        return 0

    def _read_progress(self) -> dict:
        file = self.path / PROGRESS
        restart = "start over with resume=False (--restart)"
        try:
            progress = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is damaged ({err}): {restart}") from None
        if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
            raise ValueError(f"{file} is not a progress file of this rankcut (format {PROGRESS_FORMAT}): {restart}")
        differ = _differences(progress.get("settings", {}), self.settings)
        if differ:
            raise ValueError(f"{self.path} holds an unfinished streaming compression with other settings "
                             f"({'; '.join(differ)}): run it again with its own settings to finish it, or {restart}")
        done = progress.get("done", [])
        if [d["block"] for d in done] != list(range(len(done))) or progress.get("blocks") != self.blocks:
            raise ValueError(f"{file} does not list consecutive finished blocks: {restart}")
        for shard in ([progress["outside"]] if progress.get("outside") else []) + done:
            file_path = self.path / shard["file"]
            if not file_path.is_file() or file_path.stat().st_size != shard["bytes"]:
                raise ValueError(f"{self.path}: shard {shard['file']} of a finished block is missing or truncated: "
                                 f"{restart}")
        if progress.get("activations") and not (self.path / progress["activations"]).is_file():
            raise ValueError(f"{self.path}: the saved activations {progress['activations']} are missing: {restart}")
        return progress

    def save_progress(self) -> None:
        _write_json(self.path / PROGRESS, self.progress)

    def write_shard(self, number: int, model: nn.Module, dtype, select) -> dict:
        """One shard of the tensors of ``model`` that ``select`` accepts, in the storage dtype."""
        state, tied = unique_state(model, dtype, select)
        name = shard_name(number, self.total_shards)
        info = write_safetensors(self.path / name, state, {"format": "pt"})
        return {"file": name, "tensors": list(state), "size": sum(t.numel() * t.element_size() for t in state.values()),
                **info, "tied": tied}

    def write_activations(self, index: int, calls: list) -> str:
        from safetensors.torch import save_file

        folder = self.path / ACTIVATIONS
        folder.mkdir(exist_ok=True)
        name = f"{ACTIVATIONS}/after-block-{index:05d}.safetensors"
        hidden = {str(i): _hidden(args, kwargs).detach().cpu().contiguous() for i, (args, kwargs) in enumerate(calls)}
        tmp = folder / f".after-block-{index:05d}.tmp"
        save_file(hidden, str(tmp))
        with open(tmp, "rb") as handle:  # durable before the progress file names it
            os.fsync(handle.fileno())
        os.replace(tmp, self.path / name)
        return name

    def read_activations(self, calls: list, device) -> None:
        from safetensors.torch import load_file

        try:
            saved = load_file(str(self.path / self.progress["activations"]))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{self.path}: the saved activations {self.progress['activations']} are damaged ({err}): "
                             "start over with resume=False (--restart)") from None
        if len(saved) != len(calls):
            raise ValueError(f"{self.path}: the saved activations hold {len(saved)} batches, this run {len(calls)}")
        for i, (args, kwargs) in enumerate(calls):
            calls[i] = with_hidden(args, kwargs, saved[str(i)].to(device))

    def finish(self, model: nn.Module, tokenizer, dtype) -> None:
        """The index, the side files and, last, the record: the directory becomes a checkpoint."""
        shards = [self.progress["outside"], *self.progress["done"]]
        weight_map, total, tied = {}, 0, {}
        for shard in shards:
            weight_map.update({name: shard["file"] for name in shard["tensors"]})
            total += shard["size"]
            tied.update(shard["tied"])
            size = (self.path / shard["file"]).stat().st_size
            if size != shard["bytes"]:
                raise ValueError(f"{self.path / shard['file']} changed while the compression ran ({size} bytes, "
                                 f"{shard['bytes']} written)")
        write_index(self.path, weight_map, total)
        write_side_files(model, self.path, tokenizer, dtype)
        files = {shard["file"]: {"bytes": shard["bytes"], "sha256": shard["sha256"]}
                 for shard in sorted(shards, key=lambda s: s["file"])}
        os.chmod(self.path / INDEX, 0o644)
        files[INDEX] = {"bytes": (self.path / INDEX).stat().st_size, "sha256": sha256_file(self.path / INDEX)}
        record = checkpoint_record(model, get_record(model), tied, files, dtype)
        _write_json(self.path / RECORD, record.to_json())
        (self.path / PROGRESS).unlink(missing_ok=True)
        shutil.rmtree(self.path / ACTIVATIONS, ignore_errors=True)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


# -------------------------------------------------------------------------------------------- the block source


def free_block(block: nn.Module, home: torch.device | str = "cpu") -> None:
    """Drop a block's weights: parameters and persistent buffers back to the meta device (shapes and dtypes kept);
    non-persistent buffers (computed at construction, not in any file) back to ``home``."""
    for module in block.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                        requires_grad=param.requires_grad)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                keep = name in module._non_persistent_buffers_set
                module._buffers[name] = buf.to(home) if keep else torch.empty_like(buf, device="meta")


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim``; nothing elsewhere). A block's tensors of a
    few MB come from the heap, not from their own mappings, and freeing them leaves holes that the next block's
    slightly different sizes do not fill: without this the resident set grew by 15-20 MB per 25 MB block on a CPU,
    with it it stays flat (tests/test_streaming.py)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class StreamedBlocks(BlockSource):
    """The block runner's source for streaming: each block read from the source directory, written to the
    output when the visitor is done with it, then freed; blocks of an earlier run skipped (see the module)."""

    def __init__(self, source: SourceModel, output: Output, work: Compression, prefix: str, save_dtype,
                 sequential: bool, start: int, timer: Timer) -> None:
        self.source, self.output, self.work, self.prefix = source, output, work, prefix
        self.save_dtype, self.sequential, self.start, self.timer = save_dtype, sequential, start, timer

    def load(self, index: int, block: nn.Module, device) -> None:
        release_freed_memory()  # the previous block's dense layers were dropped by the runner after its unload
        with self.timer("read"):
            head = f"{self.prefix}.{index}."
            digest = hashlib.sha256()
            state = self.source.read(self.source.block_names(self.prefix, index), device, digest)
            self.digest = digest.hexdigest()
            missing, unexpected = block.load_state_dict({k[len(head):]: v for k, v in state.items()}, strict=False,
                                                        assign=True)
            del state
            left = [f"{head}{name}" for name, p in block.named_parameters() if p.device.type == "meta"]
            if left:
                raise ValueError(f"the source's weights lack {left[:3]}")
            block.to(device)  # the buffers computed at construction
        try:
            check_finite_weights(block)
        except ValueError as err:  # name the layer in the whole model
            raise ValueError(str(err).replace("layer ", f"layer {head}", 1).replace("(", f"({head}", 1)) from None

    def unload(self, index: int, block: nn.Module, calls) -> None:
        with self.timer("write"):
            head = f"{self.prefix}.{index}."
            shard = self.output.write_shard(index + 2, self.work.model, self.save_dtype, lambda n: n.startswith(head))
            names = [info.name for info in self.work.infos.values() if info.block == index]
            shard["block"] = index
            shard["source_sha256"] = self.digest
            shard["targets"] = {head + name: record_entry(m) for name, m in rankcut_modules(block).items()}
            shard["rows"] = [_row_json(self.work.rows[name]) for name in names]
            previous = self.output.progress.get("activations")
            if self.sequential and calls is not None and index + 1 < self.output.blocks:
                self.output.progress["activations"] = self.output.write_activations(index, calls)
            self.output.progress["done"].append(shard)
            self.output.save_progress()
            if previous and previous != self.output.progress["activations"]:
                (self.output.path / previous).unlink(missing_ok=True)
            free_block(block)

    def skip(self, index: int, block: nn.Module, calls, device):
        """A block an earlier run finished: its source weights are read again and checked against the digest that
        run recorded (another model at the same path is refused before anything is written); without sequential
        calibration they also run forward: the next block's inputs are the dense model's activations."""
        with self.timer("resume"):
            stored = self.output.progress["done"][index]["source_sha256"]
            if calls is None or self.sequential or self.start >= self.output.blocks:  # no forward pass needed
                digest = hashlib.sha256()
                self.source.read(self.source.block_names(self.prefix, index), "cpu", digest)
                self.digest = digest.hexdigest()
            else:
                self.load(index, block, device)
            if self.digest != stored:
                raise ValueError(f"{self.output.path} holds an unfinished streaming compression of another source "
                                 f"model: the weights of block {index} in {self.source.spec} differ from those it "
                                 "compressed: start over with resume=False (--restart)")
            if calls is None:  # a data-free method: nothing flows between blocks
                return None
            if self.sequential:  # the compressed model's activations, saved after the last finished block
                if index == self.start - 1:
                    self.output.read_activations(calls, device)
                return calls
            propagate(block, calls)  # the dense model's activations: the source's block run again
            free_block(block)
        return calls


def _row_json(row: TargetRow) -> dict:
    return {"name": row.name, "shape": list(row.shape), "rank": row.rank, "params_before": row.params_before,
            "params_after": row.params_after, "energy": row.energy, "note": row.note}


def _row(data: dict) -> TargetRow:
    return TargetRow(**{**data, "shape": tuple(data["shape"])})


def _restore(model: nn.Module, done: list[dict], dtype: torch.dtype) -> None:
    """Swap the finished blocks' targets for their (empty) compressed modules, as the record says they are."""
    for shard in done:
        for name, entry in shard["targets"].items():
            layer = module_type(entry["type"]).from_record(entry, model.get_submodule(name), device="meta").to(dtype)
            if record_entry(layer) != entry:
                raise ValueError(f"cannot rebuild {name} of an earlier run from its entry {entry} "
                                 f"(rebuilt: {record_entry(layer)}): start over with resume=False (--restart)")
            replace_module(model, name, layer)


# ------------------------------------------------------------------------------------------------ entry point


def compress_streaming(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: CompressConfig | None = None,
    calib=None,
    tokenizer=None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    save_dtype: str | torch.dtype | None = "source",
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressionSummary:
    """Compress the model in directory ``source`` into a checkpoint at ``output`` without ever holding it whole.

    Equals ``compress_`` on the model loaded in ``dtype`` then ``save(..., dtype=save_dtype)`` (bit-identical
    tensors and record, but one shard per block); memory is one block, the calibration activations and the
    tensors outside the blocks. See the module for the resume rules.

    Args:
        source: a local Hugging Face model directory with safetensors weights (one file or sharded).
        output: the checkpoint directory to write (the shards appear in it as the blocks are done).
        config: what to do (default ``CompressConfig()``); a local allocation policy (``uniform``, ``energy``,
            ``rank``, ``plan``), layer by layer, no ``factor_dtype``, and units within one block each.
        calib, tokenizer: as for :func:`rankcut.compress_` (the tokenizer is read from ``source`` if not given; it
            is saved with the checkpoint).
        device: where each block is processed (default: CUDA when available).
        dtype: the compute dtype (None or ``"auto"``: float32 on a CPU, the stored dtype on a GPU).
        save_dtype: the checkpoint's dtype: ``"source"`` (the dtype the source stores), a dtype, or None (as
            computed).
        resume: continue an unfinished streaming compression in ``output`` (with the same settings); False
            discards it and starts over.
        overwrite: replace a finished checkpoint at ``output`` (it is deleted when the compression starts).
        progress: progress bars.

    Raises:
        ValueError: a source that is not a local safetensors model directory; settings streaming cannot do; an
            unfinished run in ``output`` with other settings (naming them); and everything ``compress_`` refuses.
        FileExistsError: ``output`` is a finished checkpoint and ``overwrite`` is False.
    """
    config = config or CompressConfig()
    timer = Timer()
    start_time = time.perf_counter()
    output = Path(output)
    check_source(source)
    check_inputs(config, calib)
    if not config.layerwise:
        raise ValueError("streaming compression processes one block at a time: it does not take layerwise=False "
                         "(--full-model)")
    if config.factor_dtype is not None:
        raise ValueError("factor_dtype quantises the factors in a second pass over the whole compressed model, which "
                         "streaming does not do: compress in memory, or without factor_dtype")
    device = resolve_device(device)
    with timer("read"):
        src = SourceModel(source, dtype, device)
    model = src.model
    targets = find_targets(model, config.include, config.exclude)
    outside = [info.name for info in target_infos(model, targets) if info.block is None]
    if outside:
        raise ValueError(f"streaming compresses targets inside the transformer blocks; {outside[:3]} lie outside")
    order = list(targets)
    policy = make_policy(config, policy_context(model, config, None))
    if policy.is_global:
        raise ValueError(f"allocation {config.allocation!r} plans every target at once, after all are decomposed; "
                         "streaming writes each block as soon as it is decomposed: use a local policy (uniform, "
                         "energy, rank) or a plan (--plan)")
    work = Compression(model, config, policy, targets, device, timer, progress)
    for unit in work.units:
        spans = sorted({t.block for t in unit.targets})
        if len(spans) > 1:
            raise ValueError(f"method {config.method!r} decomposes targets of several blocks together (unit {unit.name} "
                             f"spans blocks {spans[0]}..{spans[-1]}); streaming writes each block when it is done: "
                             "compress in memory, or group within a block")
    from rankcut.targets import find_blocks

    prefix, blocks = find_blocks(model)
    with timer("read"):
        outside_digest = src.load_outside(prefix)  # before any output is touched: reading only
    check_finite_weights(model)
    params_before = count_params(model)  # after the tied weights are tied
    if tokenizer is None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(src.spec)
        except (OSError, ValueError, TypeError) as err:
            log.warning("no tokenizer in %s, none is saved with the checkpoint (%s)", src.spec,
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    windows = None
    if work.stat is not None:
        with timer("calibration text"):
            seq_len = config.seq_len or default_seq_len(model)
            windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
    stored = None if save_dtype is None else (src.stored_dtype or src.dtype) if save_dtype == "source" \
        else parse_dtype(save_dtype)
    settings = {
        "source": {**src.fingerprint(), "outside_sha256": outside_digest}, "source_path": src.spec,
        "config": config.to_dict(),
        "calibration": None if windows is None else {
            "source": source_name(calib), "windows": list(windows.shape),
            "sha256": hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()},
        "dtype": dtype_name(src.dtype), "save_dtype": None if stored is None else dtype_name(stored),
        "format": PROGRESS_FORMAT,
    }  # source_path is named in messages, not compared: a moved copy of the same weights resumes
    out = Output(output, settings, len(blocks), prefix)
    begin = out.open(resume, overwrite)
    if begin:
        log.warning("resuming the streaming compression in %s at block %d of %d (%d block(s) already written)",
                    output, begin, len(blocks), begin)
        if out.progress.get("device") not in (None, str(device)):
            log.warning("the earlier run worked on %s, this one on %s: the remaining blocks may differ in the last "
                        "bits from an uninterrupted run", out.progress["device"], device)
    out.progress["device"] = str(device)
    if out.progress["outside"] is None:
        with timer("write"):
            out.progress["outside"] = out.write_shard(1, model, stored, lambda n: not n.startswith(prefix + "."))
            out.save_progress()
    streamed = StreamedBlocks(src, out, work, prefix, stored, config.sequential, begin, timer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_blocks(model, targets, windows, work, device=device, batch_size=config.batch_size, layerwise=True,
               sequential=config.sequential, progress=progress, timer=timer, blocks=streamed)
    earlier = out.progress["done"][:begin]
    _restore(model, earlier, src.dtype)
    work.rows.update({row["name"]: _row(row) for shard in earlier for row in shard["rows"]})
    summary = _finish(model, config, work, order, params_before, start_time,
                      0 if windows is None else windows.numel(), calib)
    out.finish(model, tokenizer, stored)
    log.info("saved %s (%d blocks streamed, %d resumed from an earlier run)", output, len(blocks) - begin, begin)
    return summary
