"""PNG figures of an :class:`~rankcut.analyze.AnalysisReport` (matplotlib, imported lazily, Agg backend).

- ``spectra.png``: normalised spectra σ_i/σ_1 per tensor type, one line per layer, break-even rank marked;
- ``energy_ranks.png``: layer × tensor type heatmap of energy rank / break-even rank at one threshold
  (≥ 1 means the target stays dense);
- ``cumulative_energy.png``: cumulative energy against rank / break-even rank, thresholds marked.

With activation-aware spectra, each figure shows the weight (W) and the whitened matrix (W·L) side by side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rankcut.analyze import AnalysisReport


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (or pip install 'rankcut[plots]')"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _by_type(report: AnalysisReport) -> dict[str, list[tuple[str, dict]]]:
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, t in report.targets.items():
        groups.setdefault(t["type"], []).append((name, t))
    return groups


def _label(kind: str) -> str:
    return {"weight": "weight W", "whiten": "whitened W·L", "asvd": "scaled W·diag(s) (asvd)"}.get(kind, f"{kind} matrix")


def _grid(plt, count: int, width: float = 3.4, height: float = 3.0):
    """A figure with ``count`` panels, at most 4 per row; unused panels hidden."""
    cols = min(4, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 0.8, height * rows + 0.8), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


STYLES = {"weight": "-"}  # every method's matrix: dashed


def _finish(fig, path: Path, title: str, fontsize: int) -> Path:
    """Title, tight layout, write at 110 dpi, close: the tail every figure here shares."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def reference_threshold(report: AnalysisReport) -> float:
    """The threshold shown in the heatmap: 0.90 when analysed, else the middle one."""
    return 0.9 if 0.9 in report.thresholds else report.thresholds[len(report.thresholds) // 2]


def _curves(plt, report: AnalysisReport, axes):
    """For each tensor type's panel, each target and each analysed kind: ``(ax, members, name, target, kind,
    singular values, colour)``, coloured by layer. The shared loop of the spectrum and energy plots."""
    cmap = plt.get_cmap("viridis")
    layers = sorted({t["layer"] for t in report.targets.values() if t["layer"] is not None}) or [0]
    for ax, (ttype, members) in zip(axes, _by_type(report).items()):
        ax.set_title(ttype, fontsize=9)
        for name, t in members:
            shade = (layers.index(t["layer"]) / max(1, len(layers) - 1)) if t["layer"] is not None else 0.0
            for kind in report.kinds:
                s = torch.tensor(t[kind]["singular_values"], dtype=torch.float64)
                yield ax, members, name, t, kind, s, cmap(shade)


def plot_spectra(report: AnalysisReport, path: Path) -> Path:
    plt = _pyplot()
    groups = _by_type(report)
    fig, axes = _grid(plt, len(groups))
    for ax, members, name, t, kind, s, colour in _curves(plt, report, axes):
        s = s / s[0] if s.numel() and s[0] > 0 else s
        label = (f"layer {t['layer']}" if t["layer"] is not None else name) if kind == "weight" else None
        ax.semilogy(range(1, s.numel() + 1), s.clamp_min(1e-12).tolist(), STYLES.get(kind, "--"), color=colour, lw=1, label=label)
    for ax, (ttype, members) in zip(axes, groups.items()):
        ax.axvline(members[0][1]["break_even"], color="red", ls="--", lw=0.8)
        ax.set_xlabel("index i", fontsize=8)
        ax.set_ylabel("σ_i / σ_1", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, loc="lower left")
    note = f"solid: W, dashed: {_label(report.kinds[-1])}; " if len(report.kinds) > 1 else ""
    return _finish(fig, path, f"Normalised singular values ({note}colour: layer; red: break-even rank)", 10)


def plot_energy_heatmap(report: AnalysisReport, path: Path, threshold: float | None = None) -> Path:
    plt = _pyplot()
    threshold = reference_threshold(report) if threshold is None else threshold
    types = list(_by_type(report))
    layers = sorted({t["layer"] for t in report.targets.values()}, key=lambda x: (x is None, x if x is not None else 0))
    kinds = report.kinds
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.1 * len(types) * len(kinds) + 2.5, 0.45 * len(layers) + 2.2),
                             squeeze=False)
    image = None
    for col, kind in enumerate(kinds):
        ax = axes[0][col]
        grid = torch.full((len(layers), len(types)), float("nan"))
        text = {}
        for name, t in report.targets.items():
            i, j = layers.index(t["layer"]), types.index(t["type"])
            level = t[kind]["thresholds"][str(threshold)]
            grid[i, j] = level["rank"] / t["break_even"]
            text[i, j] = f"{level['rank']}" + ("\ndense" if level["dense"] else "")
        image = ax.imshow(grid.numpy(), cmap="magma_r", vmin=0, vmax=max(1.0, float(grid.nan_to_num(0).max())),
                          aspect="auto")
        for (i, j), label in text.items():
            ax.text(j, i, label, ha="center", va="center", fontsize=6,
                    color="white" if grid[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(f"{_label(kind)}", fontsize=9)
    cbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    cbar.set_label("energy rank / break-even rank (≥ 1: dense)", fontsize=8)
    fig.suptitle(f"Rank holding {threshold:.2f} of the energy (cell: rank)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_cumulative_energy(report: AnalysisReport, path: Path) -> Path:
    plt = _pyplot()
    groups = _by_type(report)
    fig, axes = _grid(plt, len(groups))
    for ax, members, name, t, kind, s, colour in _curves(plt, report, axes):
        s2 = s**2
        cum = (s2.cumsum(0) / s2.sum()).tolist() if s2.sum() > 0 else [1.0] * s2.numel()
        ax.plot([(i + 1) / t["break_even"] for i in range(len(cum))], cum, STYLES.get(kind, "--"), color=colour, lw=1)
    for ax, (ttype, members) in zip(axes, groups.items()):
        for th in report.thresholds:
            ax.axhline(th, color="grey", lw=0.5, ls=":")
        ax.axvline(1.0, color="red", ls="--", lw=0.8)
        ax.set_xlim(0, max(1.2, min(2.5, max(len(t["weight"]["singular_values"]) / t["break_even"] for _, t in members))))
        ax.set_title(ttype, fontsize=8)  # smaller than the default set by _curves
        ax.set_xlabel("rank / break-even rank", fontsize=7)
        ax.set_ylabel("Σσ²(≤r) / Σσ²", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    note = f"solid: W, dashed: {_label(report.kinds[-1])}; " if len(report.kinds) > 1 else ""
    return _finish(fig, path, f"Cumulative energy ({note}colour: layer; red: break-even; dotted: thresholds)", 9)


def write_plots(report: AnalysisReport, directory: str | Path) -> list[Path]:
    """Write the three figures into ``directory``; returns their paths.

    Raises:
        ImportError: matplotlib is not installed (with the command that installs it).
    """
    _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        plot_spectra(report, directory / "spectra.png"),
        plot_energy_heatmap(report, directory / "energy_ranks.png"),
        plot_cumulative_energy(report, directory / "cumulative_energy.png"),
    ]
