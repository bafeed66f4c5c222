"""Spectral analysis of a model's targets: singular values, energy ranks, break-even and speedup bounds.

For each target W (out=m × in=n) the exact singular values are computed, and for each energy threshold
the smallest rank r holding that fraction of Σσ². A rank-r factorisation stores r(m+n) parameters instead
of mn and, for bandwidth-bound decode, can be at most ``mn/(r(m+n))`` times faster than the dense layer
(DESIGN.md §5). At or above the break-even rank ``mn/(m+n)`` the factors are no smaller than W, so such a
target is reported as dense: no saving, speedup bound 1.

With calibration text, the spectrum of the matrix a data-aware method truncates is reported too (any
registered method; default ``whiten``: ``W·L`` with ``L Lᵀ = XᵀX``, Wang et al. 2024, SVD-LLM,
arXiv:2403.07378): its energy measures the layer's *output* error on the calibration set, which the
weight's energy alone does not. The statistics come from the same block pipeline as compression
(:mod:`rankcut.pipeline`), and the matrix from the method's own preconditioning.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut.data import calibration_windows
from rankcut.linalg import break_even_rank
from rankcut.methods import get_method
from rankcut.modules import dense_weight
from rankcut.pipeline import Visitor, check_finite_weights, run_blocks
from rankcut.policies.energy import energy_rank
from rankcut.targets import find_blocks, find_targets, target_infos
from rankcut.units import max_useful_rank
from rankcut.utils import count_params, default_seq_len, resolve_device

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.80, 0.85, 0.90, 0.95, 0.99)
#: How the reports name the matrix each method truncates.
MATRIX = {"whiten": "W·L, L Lᵀ = XᵀX", "asvd": "W·diag(s), s = mean|x|^α"}


def check_thresholds(thresholds) -> tuple[float, ...]:
    """Sorted, distinct thresholds, each in (0, 1].

    Raises:
        ValueError: empty, not a number, or outside (0, 1].
    """
    values = list(thresholds)
    if not values:
        raise ValueError("at least one energy threshold is needed")
    for t in values:
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not 0 < t <= 1:
            raise ValueError(f"energy threshold {t!r} is outside (0, 1]")
    return tuple(sorted({float(t) for t in values}))


def kept_params(m: int, n: int, rank: int) -> int:
    """Parameters kept by a rank-``rank`` target: ``r(m+n)`` below break-even, else ``mn`` (kept dense)."""
    return rank * (m + n) if rank <= max_useful_rank(m, n) else m * n


def speedup_bound(m: int, n: int, rank: int) -> float:
    """Bandwidth-bound speedup limit ``mn/(r(m+n))`` of a rank-r target; 1.0 when it stays dense (r ≥ r*)."""
    if rank > max_useful_rank(m, n):
        return 1.0
    return m * n / (rank * (m + n))


def spectrum_entry(S: torch.Tensor, m: int, n: int, thresholds) -> dict:
    """Energy ranks and their consequences for one singular-value vector ``S`` of an m×n matrix.

    Returns a dict with ``singular_values`` and, per threshold (keyed by its string), ``rank``, ``dense``
    (rank ≥ break-even: no saving), ``kept_params``, ``keep`` (kept / mn) and ``speedup_bound``.
    """
    S = S.detach().to(torch.float64).cpu()
    total = float((S**2).sum())
    levels = {}
    for t in thresholds:
        r = energy_rank(S, total, t) or S.numel()
        kept = kept_params(m, n, r)
        levels[str(t)] = {
            "rank": r,
            "dense": r > max_useful_rank(m, n),
            "kept_params": kept,
            "keep": kept / (m * n),
            "speedup_bound": speedup_bound(m, n, r),
        }
    return {"singular_values": S.tolist(), "thresholds": levels}


def target_layout(names: list[str], model: nn.Module) -> dict[str, tuple[int | None, str]]:
    """``name -> (block index, tensor type)``, e.g. ``model.layers.3.mlp.up_proj -> (3, "mlp.up_proj")``.
    Targets outside the blocks get ``(None, name)``."""
    return {t.name: (t.block, t.kind) for t in target_infos(model, {n: model.get_submodule(n) for n in names})}


@dataclass
class AnalysisReport:
    """The result of :func:`analyze`: per-target spectra and the per-threshold summaries."""

    thresholds: tuple[float, ...]
    targets: dict[str, dict]  # name -> {shape, layer, type, break_even, weight: entry, <method>: entry?}
    model_params: int
    settings: dict = field(default_factory=dict)
    method: str = "whiten"

    @property
    def kinds(self) -> list[str]:
        """``weight``, and the method's name when its spectra were computed."""
        return [k for k in ("weight", self.method) if all(k in t for t in self.targets.values())]

    def summary(self, kind: str = "weight") -> list[dict]:
        """Per threshold: targets factorised/dense, kept parameters, keep over targets and whole model,
        aggregate speedup bound over the targets (Σ dense / Σ kept) and the per-target bounds' range."""
        dense_total = sum(t["shape"][0] * t["shape"][1] for t in self.targets.values())
        rows = []
        for th in self.thresholds:
            levels = [t[kind]["thresholds"][str(th)] for t in self.targets.values()]
            kept = sum(lv["kept_params"] for lv in levels)
            bounds = [lv["speedup_bound"] for lv in levels]
            rows.append({
                "threshold": th,
                "targets": len(levels),
                "dense": sum(lv["dense"] for lv in levels),
                "kept_params": kept,
                "keep_targets": kept / dense_total,
                "keep_model": (self.model_params - dense_total + kept) / self.model_params,
                "speedup_bound_targets": dense_total / kept,
                "speedup_bound_min": min(bounds),
                "speedup_bound_median": statistics.median(bounds),
                "speedup_bound_max": max(bounds),
            })
        return rows

    def to_dict(self) -> dict:
        return {
            "thresholds": list(self.thresholds),
            "model_params": self.model_params,
            "target_params": sum(t["shape"][0] * t["shape"][1] for t in self.targets.values()),
            "settings": self.settings,
            "summary": {k: self.summary(k) for k in self.kinds},
            "method": self.method,
            "targets": self.targets,
        }

    def summary_table(self, kind: str = "weight") -> str:
        """Markdown table: the honest 'rank / compression / speedup by energy threshold'."""
        lines = [
            "| energy | targets kept dense | keep (targets) | keep (model) | speedup bound (targets) | per-target bound min / median / max |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.summary(kind):
            lines.append(
                f"| {row['threshold']:.2f} | {row['dense']} / {row['targets']} | {row['keep_targets']:.3f} | "
                f"{row['keep_model']:.3f} | {row['speedup_bound_targets']:.2f}× | {row['speedup_bound_min']:.2f} / "
                f"{row['speedup_bound_median']:.2f} / {row['speedup_bound_max']:.2f} |"
            )
        return "\n".join(lines)

    def target_table(self, kind: str = "weight") -> str:
        """Markdown table of each target's energy rank per threshold (``dense`` at or above break-even)."""
        head = " | ".join(f"r@{t:.2f}" for t in self.thresholds)
        lines = [f"| target | m×n | break-even | {head} |", "|---|---|---|" + "---|" * len(self.thresholds)]
        for name, t in self.targets.items():
            cells = []
            for th in self.thresholds:
                lv = t[kind]["thresholds"][str(th)]
                cells.append(f"{lv['rank']} (dense)" if lv["dense"] else f"{lv['rank']} ({lv['speedup_bound']:.2f}×)")
            m, n = t["shape"]
            lines.append(f"| {name} | {m}×{n} | {t['break_even']:.1f} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


class _Spectra(Visitor):
    """The spectrum of each target's preconditioned matrix (the method's, in float64), block by block."""

    def __init__(self, spec, config, result: dict, thresholds, device) -> None:
        self.spec, self.config, self.result, self.thresholds, self.device = spec, config, result, thresholds, device
        self.stat = spec.stat

    def visit(self, block, targets, stats) -> None:
        for name, module in targets.items():
            W = dense_weight(module).detach().to(self.device, torch.float64)
            m, n = W.shape
            try:
                A = self.spec.precondition(W, stats(name).to(self.device), self.config).A
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            self.result[name][self.spec.name] = spectrum_entry(torch.linalg.svdvals(A.to(torch.float64)), m, n,
                                                              self.thresholds)


def analyze(
    model: nn.Module,
    thresholds=DEFAULT_THRESHOLDS,
    calib=None,
    tokenizer=None,
    *,
    method: str = "whiten",
    options: dict | None = None,
    calib_samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    sampling: str = "random",
    batch_size: int = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> AnalysisReport:
    """Singular values and energy ranks of every target of ``model`` (the model is not modified).

    Args:
        model: a Hugging Face transformer.
        thresholds: energy thresholds in (0, 1].
        calib: optional calibration text (as for :func:`rankcut.compress_`); when given, the spectra of the
            matrix ``method`` truncates (``W·L`` for ``whiten``) are computed as well.
        tokenizer: turns text calibration into tokens.
        method: a registered spectral method that uses calibration statistics (default ``whiten``).
        options: that method's options (e.g. ``{"damping": 1e-6}``).
        calib_samples, seq_len, seed, sampling, batch_size: calibration windows, as for compression.
        include, exclude: target selection patterns (exact names or ``re:REGEX``).
        device: where SVDs and calibration blocks run (default: CUDA when available).
        progress: show progress bars.

    Raises:
        ValueError: bad thresholds, an unknown method, no targets, non-finite weights, too-short calibration
            text.
    """
    thresholds = check_thresholds(thresholds)
    spec = get_method(method)
    if spec.precondition is None:
        raise ValueError(f"analyze needs a spectral method; {method!r} is a group method")
    config = spec.make_config(options)
    targets = find_targets(model, include, exclude)
    check_finite_weights(model)
    device = resolve_device(device, model)
    layout = target_layout(list(targets), model)
    windows = None
    if calib is not None and spec.stat is not None:
        seq_len = seq_len or default_seq_len(model)
        windows = calibration_windows(calib, tokenizer, calib_samples, seq_len, seed, sampling)
    result: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name in tqdm(list(targets), desc="spectra", disable=not progress):
                W = dense_weight(targets[name]).detach().to(device, torch.float64)
                m, n = W.shape
                layer, kind = layout[name]
                result[name] = {
                    "shape": [m, n], "layer": layer, "type": kind, "break_even": break_even_rank(m, n),
                    "weight": spectrum_entry(torch.linalg.svdvals(W), m, n, thresholds),
                }
    finally:
        model.train(was_training)
    if windows is not None:
        layerwise = find_blocks(model) is not None and all(layer is not None for layer, _ in layout.values())
        run_blocks(model, dict(targets), windows, _Spectra(spec, config, result, thresholds, device), device=device,
                   batch_size=batch_size, layerwise=layerwise, progress=progress)
    settings = {
        "thresholds": list(thresholds),
        "method": method,
        "options": config.to_dict(),
        "calibration": None if windows is None else {
            "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "tokens": int(windows.numel()),
            "seed": seed, "sampling": sampling, **({"damping": config.damping} if hasattr(config, "damping") else {}),
        },
        "include": include, "exclude": exclude, "device": str(device), "seed": seed,
    }
    return AnalysisReport(thresholds, result, count_params(model), settings, method)


def render_markdown(report: AnalysisReport, info: dict, plots: list[str]) -> str:
    """``report.md``: what was run, the per-threshold summary tables, the per-target ranks, the figures."""
    env = info.get("environment", {})
    calib = report.settings.get("calibration")
    lines = [
        f"# rankcut analyze: {info.get('model', '')}", "",
        f"Command: `{info.get('command', '')}`  ",
        f"rankcut {env.get('rankcut', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; "
        f"device {report.settings.get('device')}; seed {report.settings.get('seed')}.  ",
        f"{len(report.targets)} targets, {sum(t['shape'][0] * t['shape'][1] for t in report.targets.values()):,} "
        f"target parameters of {report.model_params:,} in the model.", "",
        "Energy rank: the smallest r with Σσ²(≤r)/Σσ² ≥ threshold. A target whose energy rank reaches the break-even "
        "rank mn/(m+n) stays dense (no saving, speedup bound 1). Speedup bound: bandwidth-bound decode can be at most "
        "mn/(r(m+n)) times faster for a target; over the targets, Σ dense / Σ kept parameters. These are upper "
        "bounds on speed and say nothing about quality.", "",
        "## Weight spectra (W)", "", report.summary_table("weight"), "",
    ]
    if report.method in report.kinds:
        what = MATRIX.get(report.method, f"the matrix {report.method} truncates")
        lines += [
            f"## Activation-aware spectra ({what}, as `{report.method}` truncates them)", "",
            f"Calibration: {calib['samples']} windows × {calib['seq_len']} tokens, seed {calib['seed']}. The energy "
            f"of {what.split(',')[0]} is the layer's output energy on the calibration set, so these ranks measure output "
            "error, which the weight's energy does not.", "",
            report.summary_table(report.method), "",
        ]
    lines += ["## Figures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    for kind in report.kinds:
        short = "W" if kind == "weight" else MATRIX.get(kind, kind).split(",")[0]
        lines += [f"## Per-target energy ranks ({short}; cell: rank (speedup bound))", "",
                  report.target_table(kind), ""]
    return "\n".join(lines)
