"""Small shared utilities at the bottom of the dependency graph: devices, dtypes, the environment record,
parameter counts, default window length, stage timers. Nothing here imports another rankcut module."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn

#: The one table of dtype names rankcut accepts (CLI flags, records, ``from_pretrained(dtype=...)``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name (``"float16"``, ``"torch.float16"``), a dtype, or None.

    Raises:
        ValueError: an unknown name.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(device: str | torch.device | None = None, model: nn.Module | None = None) -> torch.device:
    """The device work runs on: ``None``/``"auto"`` is CUDA when available, else where ``model`` lives (or the CPU).

    Raises:
        ValueError: a CUDA device is asked for and none is available.
    """
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if model is not None:
            param = next(model.parameters(), None)
            if param is not None and param.device.type != "meta":
                return param.device
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but no CUDA device is available")
    return device


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (each shared parameter once); a quantised factor (a module with ``keeps_dtype``,
    :class:`rankcut.modules.QuantFactor`) counts its matrix's elements."""
    quantised = sum(m.out_features * m.in_features for m in model.modules() if getattr(m, "keeps_dtype", False))
    return sum(p.numel() for p in model.parameters()) + quantised


def default_seq_len(model: nn.Module) -> int:
    """min(2048, the model's maximum length)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(2048, limit) if limit else 2048


def environment(device: torch.device | str | None = None) -> dict:
    """Versions and hardware an output was produced with: rankcut, torch, transformers, Python, the GPU (name,
    memory, SMs, driver, CUDA) or the CPU, and the optional libraries that are loaded (lm_eval, peft, triton)."""
    import transformers

    from rankcut import __version__

    info = {"rankcut": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
    for name in ("lm_eval", "peft", "triton", "vllm", "torchao"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if on_gpu:
        props = torch.cuda.get_device_properties(torch.device(device) if device is not None else 0)
        info["gpu"] = f"{props.name} ({props.total_memory >> 20} MiB, {props.multi_processor_count} SMs)"
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    else:
        info["cpu"] = platform.processor() or platform.machine() or "cpu"
    return info


class Timer:
    """Accumulates wall time per named stage: ``with timer("statistics"): ...``; ``timer.times`` maps stages to
    seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - start
