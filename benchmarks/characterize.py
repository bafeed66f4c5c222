"""Seed 004's characterisation (Moar et al., its Figures 5-8) on the testbed models, with an output-aware method.

For each model, every target is decomposed once (``whiten`` by default, the testbed protocol's calibration:
the first 32 windows of 256 tokens of python_calib.txt) and configurations are made by truncating those
factors; held-out perplexity (the first 24 windows of 256 tokens of python_heldout.txt) is measured for:

- **pruned rank**: all tensors of 1, 2 and 3 spread layers (from layer 1) at ranks 1, 8, 32, 128 and half the
  largest useful rank;
- **tensor choice**: one tensor type in every layer, at rank 1 and at a quarter of the largest useful rank;
- **layer index**: all tensors of one layer at rank 1;
- **distance**: all tensors of two layers i and i + d at rank 1, for every pair (mean and range per d).

Nothing is chosen from these figures; they characterise. Writes ``characterize_<model>.json`` and ``.png``.

    PYTHONPATH=$PWD python3 benchmarks/characterize.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import rankcut
from rankcut.pipeline import GivenStats
from rankcut.compress import dense_stats
from rankcut.data import calibration_windows
from rankcut.search import is_attention, spread_layers
from rankcut.sensitivity import CandidateCollector
from rankcut.targets import find_blocks, find_targets, replace_module, target_infos
from rankcut.utils import Timer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["codellama-16m", "codegpt2-23m"])
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNGs from the JSON already there")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if args.plot_only:
            plot(json.loads((out / f"characterize_{name}.json").read_text()), out / f"characterize_{name}.png", name)
            continue
        result = characterize(DATA / name, args.method)
        result["command"] = " ".join(["python3", *sys.argv])
        (out / f"characterize_{name}.json").write_text(json.dumps(result, indent=1))
        plot(result, out / f"characterize_{name}.png", name)
        print(f"{name}: dense {result['dense']:.4f}; {len(result['points'])} configurations in {result['seconds']:.0f} s")


def characterize(path: Path, method: str) -> dict:
    began = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = rankcut.CompressConfig(method=method, calib_samples=32, seq_len=256, sampling="first")
    calib, held = DATA / "calib" / "python_calib.txt", DATA / "heldout" / "python_heldout.txt"
    windows = calibration_windows(str(calib), tok, 32, 256, 0, "first")
    targets = find_targets(model)
    infos = target_infos(model, targets)
    stats = dense_stats(model, config.method_spec.stat, windows, config, "cpu", False) if config.method_spec.stat else None
    collector = CandidateCollector(config, {i.name: i for i in infos}, torch.device("cpu"), Timer())
    with torch.no_grad():
        GivenStats(collector, stats).run(dict(targets))
    blocks = len(find_blocks(model)[1])
    kinds = sorted({i.kind for i in infos}, key=lambda k: [i.kind for i in infos].index(k))

    def ppl(choice: dict) -> float:
        swapped = {}
        try:
            for n, r in choice.items():
                unit, cand = collector.candidates[n]
                dense = model.get_submodule(n)
                replace_module(model, n, cand.build(min(r, unit.limit), {n: dense})[n])
                swapped[n] = dense
            return rankcut.perplexity(model, tok, str(held), 256, 24, 8, progress=False)
        finally:
            for n, dense in swapped.items():
                replace_module(model, n, dense)

    def layers_at(layers, rank_of) -> dict:
        return {i.name: rank_of(i) for i in infos if i.block in layers}

    limit = {i.name: collector.candidates[i.name][0].limit for i in infos}
    target_params = sum(m * n for m, n in (i.shape for i in infos))
    points = []

    def record(axis: str, choice: dict, **info) -> None:
        kept = sum((min(choice[i.name], limit[i.name]) * sum(i.shape)) if i.name in choice else i.shape[0] * i.shape[1]
                   for i in infos)
        points.append({"axis": axis, **info, "ppl": ppl(choice), "keep_targets": kept / target_params})

    dense = rankcut.perplexity(model, tok, str(held), 256, 24, 8, progress=False)
    for count in (1, 2, 3):
        layers = spread_layers(1, blocks - 1, count)
        for pr in (1, 8, 32, 128, "half"):
            record("rank", layers_at(layers, lambda i: max(1, limit[i.name] // 2) if pr == "half" else pr),
                   layers=layers, rank=pr)
    for kind in kinds:
        for pr in (1, "quarter"):
            choice = {i.name: (max(1, limit[i.name] // 4) if pr == "quarter" else 1) for i in infos if i.kind == kind}
            record("tensor", choice, tensor=kind, attention=is_attention(kind), rank=pr)
    for layer in range(blocks):
        record("layer", layers_at([layer], lambda i: 1), layer=layer)
    for a in range(blocks):
        for b in range(a + 1, blocks):
            record("distance", layers_at([a, b], lambda i: 1), layers=[a, b], distance=b - a)
    return {"model": path.name, "method": method, "dense": dense, "points": points, "layers": blocks,
            "protocol": "calibration: first 32 x 256 of python_calib.txt; evaluation: first 24 x 256 of python_heldout.txt",
            "seconds": time.perf_counter() - began}


def plot(result: dict, path: Path, name: str) -> None:
    from rankcut.plots import _pyplot

    plt = _pyplot()
    pts, dense = result["points"], result["dense"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    for count in (1, 2, 3):
        row = [p for p in pts if p["axis"] == "rank" and len(p["layers"]) == count]
        ax.plot([str(p["rank"]) for p in row], [p["ppl"] for p in row], "-o", ms=3, label=f"layers {row[0]['layers']}")
    ax.set_xlabel("pruned rank (all tensors of the layers)")
    ax.set_title("perplexity against pruned rank", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for pr, marker in ((1, "o"), ("quarter", "s")):
        row = [p for p in pts if p["axis"] == "tensor" and p["rank"] == pr]
        ax.plot([p["tensor"] for p in row], [p["ppl"] for p in row], marker, label=f"rank {pr}" if pr == 1 else "¼ of useful rank")
    ax.tick_params(axis="x", rotation=40, labelsize=7)
    ax.set_title("one tensor type in every layer", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    row = [p for p in pts if p["axis"] == "layer"]
    ax.plot([p["layer"] for p in row], [p["ppl"] for p in row], "-o", ms=3)
    ax.set_xlabel("decomposed layer (all tensors, rank 1)")
    ax.set_title("perplexity against layer index", fontsize=9)
    ax = axes[3]
    ds = sorted({p["distance"] for p in pts if p["axis"] == "distance"})
    vals = [[p["ppl"] for p in pts if p["axis"] == "distance" and p["distance"] == d] for d in ds]
    ax.plot(ds, [statistics.mean(v) for v in vals], "-o", ms=3, label="mean over pairs")
    ax.fill_between(ds, [min(v) for v in vals], [max(v) for v in vals], alpha=0.25, label="range")
    late = [[p["ppl"] for p in pts if p["axis"] == "distance" and p["distance"] == d and 0 not in p["layers"]] for d in ds]
    ax.plot([d for d, v in zip(ds, late) if v], [statistics.mean(v) for v in late if v], "-s", ms=3,
            label="mean over pairs without layer 0")
    ax.set_xlabel("distance between the two decomposed layers")
    ax.set_title("two layers at rank 1", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes:
        ax.axhline(dense, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity", fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{name}, {result['method']}: seed 004's characterisation (dashed: dense {dense:.2f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
