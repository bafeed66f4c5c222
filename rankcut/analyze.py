"""Spectral analysis of a model's targets: singular values, energy ranks, break-even and speedup bounds.

For each target W (out=m × in=n) the exact singular values are computed, and for each energy threshold
the smallest rank r holding that fraction of Σσ². A rank-r factorisation stores r(m+n) parameters instead
of mn and, for bandwidth-bound decode, can be at most ``mn/(r(m+n))`` times faster than the dense layer
(DESIGN.md §5). At or above the break-even rank ``mn/(m+n)`` the factors are no smaller than W, so such a
target is reported as dense: no saving, speedup bound 1.

With calibration text, the spectrum of ``W·L`` (``L Lᵀ = XᵀX``, the matrix the ``whiten`` method truncates;
Wang et al. 2024, SVD-LLM, arXiv:2403.07378) is reported too: its energy measures the layer's *output*
error on the calibration set, which the weight's energy alone does not.
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

from rankcut.allocate import energy_rank, max_useful_rank
from rankcut.linalg import break_even_rank, safe_cholesky

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.80, 0.85, 0.90, 0.95, 0.99)
KINDS = ("weight", "whiten")  # spectrum of W, and of W·L


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


def whitened_matrix(W: torch.Tensor, gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """``W·L`` in float64, with ``L`` the (damped if needed) Cholesky factor of the Gram matrix ``XᵀX``."""
    L, _ = safe_cholesky(gram.to(W.device), damping=damping)
    return W.to(torch.float64) @ L


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
    from rankcut.targets import find_blocks

    found = find_blocks(model)
    prefix = found[0] + "." if found else None
    out = {}
    for name in names:
        if prefix and name.startswith(prefix):
            index, _, kind = name[len(prefix) :].partition(".")
            if index.isdigit():
                out[name] = (int(index), kind)
                continue
        out[name] = (None, name)
    return out


@dataclass
class AnalysisReport:
    """The result of :func:`analyze`: per-target spectra and the per-threshold summaries."""

    thresholds: tuple[float, ...]
    targets: dict[str, dict]  # name -> {shape, layer, type, break_even, weight: entry, whiten: entry?}
    model_params: int
    settings: dict = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if all(k in t for t in self.targets.values())]

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


def _block_grams(model, targets, windows, device, batch_size, progress):
    """Yield ``{name: XᵀX}`` for the targets of each transformer block in turn (one block on ``device`` at a
    time, like layerwise compression); with targets outside the blocks, one whole-model hook pass instead."""
    from rankcut.calibrate import (
        StatsCollector, batches, block_output, capture_block_inputs, model_inputs, move_outside, with_hidden,
    )
    from rankcut.targets import find_blocks

    layout = target_layout(list(targets), model)
    found = find_blocks(model)
    if found is None or any(layer is None for layer, _ in layout.values()):
        home = next(model.parameters()).device
        model.to(device)
        try:
            with StatsCollector(targets, "gram") as stats:
                for ids in tqdm(list(batches(windows, batch_size)), desc="calibrate", disable=not progress):
                    model(**model_inputs(model, ids.to(device)))
            yield {name: stats.stat(name) for name in targets}
        finally:
            model.to(home)
        return
    prefix, blocks = found
    home = model.get_input_embeddings().weight.device
    move_outside(model, prefix, device)
    try:
        calls = capture_block_inputs(model, blocks[0], windows, batch_size, device)
        for index, block in enumerate(tqdm(blocks, desc="calibrate blocks", disable=not progress)):
            chosen = {n: targets[n] for n, (layer, _) in layout.items() if layer == index}
            block_home = next(block.parameters()).device
            block.to(device)
            with StatsCollector(chosen, "gram") as stats:
                for i, (args, kwargs) in enumerate(calls):
                    calls[i] = with_hidden(args, kwargs, block_output(block(*args, **kwargs)))
            block.to(block_home)
            yield {name: stats.stat(name) for name in chosen}
    finally:
        move_outside(model, prefix, home)


def analyze(
    model: nn.Module,
    thresholds=DEFAULT_THRESHOLDS,
    calib=None,
    tokenizer=None,
    *,
    calib_samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    sampling: str = "random",
    batch_size: int = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    device: str | torch.device | None = None,
    damping: float = 1e-6,
    progress: bool = True,
) -> AnalysisReport:
    """Singular values and energy ranks of every target of ``model`` (the model is not modified).

    Args:
        model: a Hugging Face transformer.
        thresholds: energy thresholds in (0, 1].
        calib: optional calibration text (as for :func:`rankcut.compress_`); when given, the spectra of
            ``W·L`` (activation-aware, as ``whiten`` sees them) are computed as well.
        tokenizer: turns text calibration into tokens.
        calib_samples, seq_len, seed, sampling, batch_size: calibration windows, as for compression.
        include, exclude: target selection patterns (exact names or ``re:REGEX``).
        device: where SVDs and calibration blocks run (default: CUDA when available).
        damping: initial Cholesky damping for a Gram matrix that is not positive definite.
        progress: show progress bars.

    Raises:
        ValueError: bad thresholds, no targets, non-finite weights, too-short calibration text.
    """
    from rankcut.compress import check_finite_weights, count_params, default_seq_len, resolve_device
    from rankcut.data import calibration_windows
    from rankcut.layers import dense_weight
    from rankcut.targets import find_targets

    thresholds = check_thresholds(thresholds)
    targets = find_targets(model, include, exclude)
    check_finite_weights(model)
    device = resolve_device(device, model)
    layout = target_layout(list(targets), model)
    windows = None
    if calib is not None:
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
            if windows is not None:
                for grams in _block_grams(model, targets, windows, device, batch_size, progress):
                    for name, gram in grams.items():
                        W = dense_weight(targets[name]).detach().to(device, torch.float64)
                        m, n = W.shape
                        try:
                            A = whitened_matrix(W, gram.to(device), damping)
                        except ValueError as err:
                            raise ValueError(f"{name}: {err}") from err
                        result[name]["whiten"] = spectrum_entry(torch.linalg.svdvals(A), m, n, thresholds)
    finally:
        model.train(was_training)
    settings = {
        "thresholds": list(thresholds),
        "calibration": None if windows is None else {
            "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "tokens": int(windows.numel()),
            "seed": seed, "sampling": sampling, "damping": damping,
        },
        "include": include, "exclude": exclude, "device": str(device), "seed": seed,
    }
    return AnalysisReport(thresholds, result, count_params(model), settings)


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
    if "whiten" in report.kinds:
        lines += [
            "## Activation-aware spectra (W·L, L Lᵀ = XᵀX, as `whiten` truncates them)", "",
            f"Calibration: {calib['samples']} windows × {calib['seq_len']} tokens, seed {calib['seed']}. The energy "
            "of W·L is the layer's output energy on the calibration set, so these ranks measure output error, "
            "which the weight's energy does not.", "",
            report.summary_table("whiten"), "",
        ]
    lines += ["## Figures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    for kind in report.kinds:
        lines += [f"## Per-target energy ranks ({'W' if kind == 'weight' else 'W·L'}; cell: rank (speedup bound))", "",
                  report.target_table(kind), ""]
    return "\n".join(lines)
