"""``rankcut sweep``: compress one model at each (method, keep) pair and evaluate every point.

Calibration statistics of the dense model are computed once per statistic kind (``gram``, ``absmean``)
and reused by every point (:func:`rankcut.compress.dense_stats`); each point deep-copies the dense model
and factorises it with :func:`rankcut.compress.compress_with_stats_`. Finished points are stored as
``points/<method>_keep<keep>.json`` and skipped on a re-run with the same settings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

from torch import nn

from rankcut.compress import compress_with_stats_, dense_stats
from rankcut.config import CompressConfig
from rankcut.data import calibration_windows, source_name
from rankcut.evaluate import evaluate
from rankcut.methods import get_method
from rankcut.utils import default_seq_len

log = logging.getLogger(__name__)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def point_name(method: str, keep: float) -> str:
    return f"{method}_keep{keep:g}"


def check_grid(methods, keeps) -> tuple[list[str], list[float]]:
    methods, keeps = list(methods), [float(k) for k in keeps]
    if not methods or not keeps:
        raise ValueError("a sweep needs at least one method and one keep value")
    for m in methods:
        get_method(m)  # ValueError naming the available methods
    for k in keeps:
        if not 0 < k <= 1:
            raise ValueError(f"keep must be in (0, 1], got {k}")
    if len(set(methods)) != len(methods) or len(set(keeps)) != len(keeps):
        raise ValueError("duplicate method or keep value in the sweep grid")
    return methods, keeps


def point_options(method: str, options: dict) -> dict:
    """The shared method options that ``method`` has (each option applies to the methods that take it)."""
    names = get_method(method).option_names()
    return {k: v for k, v in options.items() if k in names}


def check_options(methods: list[str], options: dict) -> None:
    """Raise ValueError for an option that no method of the grid takes (it would silently do nothing)."""
    taken = set().union(*(get_method(m).option_names() for m in methods))
    unused = sorted(set(options) - taken)
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} apply to none of the methods {', '.join(methods)}")


def _differences(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs (nested keys joined by dots)."""
    if old is None:
        return []
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def sweep(
    model: nn.Module,
    tokenizer,
    output: str | Path,
    methods=("svd", "asvd", "whiten"),
    keeps=(0.9, 0.8, 0.6),
    calib=None,
    ppl=(),
    calib_samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    max_windows: int | None = None,
    eval_seq_len: int | None = None,
    batch_size: int = 8,
    device=None,
    overwrite: bool = False,
    progress: bool = True,
    info: dict | None = None,
    base: CompressConfig | None = None,
    options: dict | None = None,
) -> dict:
    """Run the sweep into ``output``; return the contents of ``results.json``.

    ``base`` carries every compression setting the grid does not vary (targets, overrides, sampling…); each
    point is ``base`` with its method and keep. ``options`` are method options shared by the grid (solver,
    α, damping…): each point's method takes the ones it has; one that no method takes is an error.
    ``info`` (command line, environment) is
    stored as-is in ``results.json``. A directory holding a sweep with different settings is an error
    unless ``overwrite`` (which discards its points).
    """
    methods, keeps = check_grid(methods, keeps)
    options = dict(options or {})
    check_options(methods, options)
    for method in methods:  # every point's config is valid before any work
        get_method(method).make_config(point_options(method, options))
    base = base or CompressConfig()
    if base.sequential:
        raise ValueError("a sweep shares the dense model's statistics across points; sequential calibration cannot")
    ppl = list(ppl)
    if not ppl:
        raise ValueError("a sweep needs at least one perplexity text (ppl=...)")
    kinds = {get_method(m).stat for m in methods} - {None}
    if kinds and calib is None:
        raise ValueError(f"methods {', '.join(m for m in methods if get_method(m).stat)} need calibration data (calib=...)")
    seq_len = seq_len or default_seq_len(model)
    eval_seq_len = eval_seq_len or default_seq_len(model)
    template = dataclasses.replace(base, calib_samples=calib_samples, seq_len=seq_len, seed=seed,
                                   batch_size=batch_size, energy=None, rank=None, allocation="uniform")
    shared = {k: v for k, v in template.to_dict().items() if k not in ("method", "keep", "energy", "rank", "options")}
    shared["options"] = options
    settings = {
        "calib": None if calib is None else source_name(calib), "ppl": [source_name(p) for p in ppl],
        "calib_samples": calib_samples, "seq_len": seq_len, "seed": seed, "max_windows": max_windows,
        "eval_seq_len": eval_seq_len, "compress": shared,
    }
    output = Path(output)
    points_dir = output / "points"
    settings_file = output / "settings.json"
    if output.exists() and any(output.iterdir()):
        previous = json.loads(settings_file.read_text()) if settings_file.exists() else None
        if previous != settings:
            if not overwrite:
                changed = _differences(previous, settings)
                what = ("settings differ: " + "; ".join(changed)) if changed else "it is not a sweep directory"
                raise FileExistsError(f"{output} holds another sweep ({what}); pass overwrite=True "
                                      "to discard it")
            if previous is None and not points_dir.exists():
                raise ValueError(f"refusing to overwrite {output}: it is not a rankcut sweep directory")
            for old in points_dir.glob("*.json") if points_dir.exists() else []:
                old.unlink()
    points_dir.mkdir(parents=True, exist_ok=True)
    _write_json(settings_file, settings)

    device = device or next(model.parameters()).device
    model.eval()
    dense_file = output / "dense.json"
    if dense_file.exists():
        dense = json.loads(dense_file.read_text())
    else:
        res = evaluate(model, tokenizer, ppl, eval_seq_len, max_windows, batch_size, device, progress)
        dense = {"perplexity": res["perplexity"], "params": sum(p.numel() for p in model.parameters())}
        _write_json(dense_file, dense)

    todo = [(m, k) for m in methods for k in keeps if not (points_dir / f"{point_name(m, k)}.json").exists()]
    stats: dict[str, dict] = {}
    windows = None
    needed = {get_method(m).stat for m, _ in todo} - {None}
    if needed:
        windows = calibration_windows(calib, tokenizer, calib_samples, seq_len, seed, template.sampling)
        for kind in sorted(needed):
            stats[kind] = dense_stats(model, kind, windows, template, device, progress)
    for method, keep in todo:
        config = CompressConfig.from_dict({**template.to_dict(), "method": method, "keep": keep,
                                           "options": point_options(method, options)})
        work = copy.deepcopy(model)
        kind = get_method(method).stat
        summary = compress_with_stats_(work, config, stats.get(kind), device, progress, calib,
                                       0 if kind is None else windows.numel())
        res = evaluate(work, tokenizer, ppl, eval_seq_len, max_windows, batch_size, device, progress)
        del work
        point = {
            "method": method, "keep": keep, "keep_targets": summary.keep_targets, "keep_model": summary.keep_model,
            "params": summary.model_params_after, "perplexity": res["perplexity"],
            "change": {t: v / dense["perplexity"][t] - 1 for t, v in res["perplexity"].items()},
            "config": config.to_dict(), "summary": summary.to_dict(),
        }
        _write_json(points_dir / f"{point_name(method, keep)}.json", point)
        log.info("%s keep %g: %s", method, keep, res["perplexity"])

    points = [json.loads((points_dir / f"{point_name(m, k)}.json").read_text()) for m in methods for k in keeps]
    results = {**(info or {}), "settings": settings, "methods": methods, "keeps": keeps, "dense": dense,
               "points": points, "computed": [point_name(m, k) for m, k in todo]}
    _write_json(output / "results.json", results)
    (output / "results.md").write_text(render_markdown(results))
    plot_quality(results, output / "quality_vs_keep.png")
    return results


def render_markdown(results: dict) -> str:
    texts = list(results["dense"]["perplexity"])
    lines = ["# rankcut sweep", ""]
    if results.get("command"):
        lines += [f"`{results['command']}`", ""]
    head = ["method", "keep", "keep (targets)", "keep (model)"]
    for t in texts:
        head += [f"ppl {t}", "change"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    row = ["dense", "1", "1.0000", "1.0000"]
    for t in texts:
        row += [f"{results['dense']['perplexity'][t]:.4f}", ""]
    lines.append("| " + " | ".join(row) + " |")
    for p in results["points"]:
        row = [p["method"], f"{p['keep']:g}", f"{p['keep_targets']:.4f}", f"{p['keep_model']:.4f}"]
        for t in texts:
            row += [f"{p['perplexity'][t]:.4f}", f"{100 * p['change'][t]:+.2f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_quality(results: dict, path: Path) -> Path:
    """Perplexity against the kept fraction of the model's parameters, one curve per method and text."""
    from rankcut.plots import _pyplot

    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    texts = list(results["dense"]["perplexity"])
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for method in results["methods"]:
            pts = sorted((p["keep_model"], p["perplexity"][text]) for p in results["points"] if p["method"] == method)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
        ax.axhline(results["dense"]["perplexity"][text], color="k", linestyle="--", label="dense")
        ax.set_xlabel("kept fraction of model parameters")
        ax.set_ylabel(f"perplexity ({text})")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 30, not 3×10¹
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
