"""The typed, versioned record of what rankcut did to a model (``rankcut.json`` in a checkpoint).

A :class:`Record` travels with the model in memory (``model.rankcut_record``) from :func:`rankcut.compress_`
through :func:`rankcut.recover_` to :func:`rankcut.save`, and back from :func:`rankcut.load`. Each decomposed
target has an entry ``{"type": <module type>, ...}`` (:mod:`rankcut.modules`), e.g. ``{"type": "lowrank",
"rank": 153, "shape": [384, 384], "dtype": "float16"}``; loading rebuilds each target from its type.

Format history: 1 (rankcut 0.1, before the pipeline): top-level ``ranks`` and ``method``, everything else
under ``record``; 2: this dataclass. :meth:`Record.from_json` reads both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

FORMAT_VERSION = 2
RECORD_ATTR = "rankcut_record"


class RecordError(ValueError):
    """A record that cannot be read: unknown format, missing or mistyped fields."""


@dataclass
class Record:
    """What was done to a model, and what a checkpoint holds.

    Attributes:
        config: the :class:`~rankcut.config.CompressConfig` as a dict (current version).
        targets: per decomposed target, its module-type entry.
        dense: targets left dense, and why.
        source_model: where the dense model came from (a path or Hub id), when known.
        calibration: ``{"source", "tokens"}`` of the calibration text, or None for data-free methods.
        keep_targets, keep_model: kept fraction of the targets' and of the whole model's parameters.
        summary: the compression summary (per-target rows, times).
        history: earlier compressions of the same model (config and calibration of each).
        recovery: the last ``rankcut recover`` run (data, steps, losses, held-out perplexity), or None.
        recovery_history: earlier recoveries.
        runtime: runtime transforms applied at load time (reserved for runtime activation decomposition).
        architecture, base_model_prefix, tied, files: written by :func:`rankcut.save`: the transformers class,
            its base-model prefix, tied parameter names (dropped name -> kept name) and every weights file's
            size and SHA-256.
    """

    config: dict
    targets: dict[str, dict] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    source_model: str | None = None
    calibration: dict | None = None
    keep_targets: float | None = None
    keep_model: float | None = None
    summary: dict | None = None
    history: list = field(default_factory=list)
    recovery: dict | None = None
    recovery_history: list = field(default_factory=list)
    runtime: dict | None = None
    architecture: str | None = None
    base_model_prefix: str = ""
    tied: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    rankcut_version: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.rankcut_version:
            from rankcut import __version__

            self.rankcut_version = __version__

    @property
    def method(self) -> str:
        return self.config.get("method", "?")

    @property
    def ranks(self) -> dict[str, int]:
        """The rank of every target whose entry has one."""
        return {name: e["rank"] for name, e in self.targets.items() if isinstance(e.get("rank"), int)}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Record:
        """A record from ``rankcut.json`` (format 1 or 2).

        Raises:
            RecordError: not a JSON object, an unknown format version, or missing/mistyped fields.
        """
        if not isinstance(data, dict):
            raise RecordError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise RecordError(f"rankcut format {version!r}; this rankcut reads formats 1 to {FORMAT_VERSION}")
        if version == 1:
            data = _from_format_1(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecordError(f"unknown field(s) {unknown} (written by a newer rankcut?)")
        lacking = [key for key, kind in (("architecture", str), ("config", dict), ("targets", dict))
                   if not isinstance(data.get(key), kind)]
        if lacking:
            raise RecordError(f"missing or invalid {', '.join(lacking)}")
        for name, entry in data["targets"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                raise RecordError(f"target {name}: entry needs a module type, got {entry!r}")
        return cls(**data)


def _from_format_1(data: dict) -> dict:
    """A format-1 manifest in format-2 form (the record in memory is always the current format)."""
    from rankcut.config import CompressConfig

    lacking = [key for key, kind in (("architecture", str), ("config", dict), ("ranks", dict))
               if not isinstance(data.get(key), kind)]
    if lacking:
        raise RecordError(f"missing or invalid {', '.join(lacking)}")
    inner = data.get("record") or {}
    try:
        config = CompressConfig.from_dict(data["config"]).to_dict()
    except (TypeError, ValueError) as err:
        raise RecordError(f"config: {err}") from None
    out = {
        "config": config,
        "targets": {name: {"type": "lowrank", "rank": rank} for name, rank in data["ranks"].items()},
        "dense": data.get("dense", {}),
        "architecture": data["architecture"],
        "base_model_prefix": data.get("base_model_prefix", ""),
        "tied": data.get("tied", {}),
        "files": data.get("files", {}),
        "rankcut_version": data.get("rankcut_version", ""),
        "format_version": FORMAT_VERSION,
    }
    for key in ("source_model", "calibration", "keep_targets", "keep_model", "summary", "history", "recovery",
                "recovery_history"):
        if key in inner:
            out[key] = inner[key]
    return out


def get_record(model: nn.Module) -> Record | None:
    """The record ``model`` carries, or None."""
    return getattr(model, RECORD_ATTR, None)


def set_record(model: nn.Module, record: Record) -> None:
    setattr(model, RECORD_ATTR, record)
