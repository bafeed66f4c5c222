"""Calibration modes compared on the real testbed models: which activations should calibrate each block?

Three ways to gather the statistics of a data-aware method (``asvd``, ``whiten``):

- ``independent`` (``layerwise=True``, the default): one block at a time, every block calibrated on the
  *dense* model's activations;
- ``sequential`` (``layerwise=True, sequential=True``): one block at a time, each block calibrated on the
  outputs of the already-compressed blocks before it;
- ``hooks`` (``layerwise=False``): hooks on every target over whole-model forward passes of the dense model.
  This is the same statistic as ``independent``, so it must agree up to rounding (a consistency check).

Protocol (DESIGN.md §4): fp32 on the CPU; held-out perplexity on the first ``--eval-windows`` windows of
``--seq-len`` tokens of ``testbed/heldout/python_heldout.txt``; calibration of ``--calib-samples`` windows of
``--seq-len`` tokens from ``testbed/calib/python_calib.txt``, taken once as the first windows
(``sampling="first"``, the reference-table setting) and once per seed as random windows
(``sampling="random"``), so that a difference between modes can be compared with the seed-to-seed spread.
The dense model's perplexity from the same run is recorded next to every compressed figure.

Usage (from the repository root; ``../shared/data`` must exist)::

    python benchmarks/calibration_modes.py

writes ``benchmarks/results/calibration_modes.json`` and ``benchmarks/calibration_modes.md``. Completed
runs are kept in the JSON and skipped when the script is started again with the same settings
(``--fresh`` starts over). A ``## Conclusion`` section already present in the Markdown file is kept.
No timings are recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers

import rankcut
from rankcut.data import tokenize

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
MODES = {
    "independent": {"layerwise": True, "sequential": False},
    "sequential": {"layerwise": True, "sequential": True},
    "hooks": {"layerwise": False, "sequential": False},
}
MODE_LABELS = {
    "independent": "(a) layerwise, dense activations",
    "sequential": "(b) layerwise, sequential",
    "hooks": "(c) whole-model hooks",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default ../shared/data)")
    p.add_argument("--models", nargs="+", default=["codellama-16m", "codegpt2-23m"])
    p.add_argument("--methods", nargs="+", default=["asvd", "whiten"])
    p.add_argument("--keeps", nargs="+", type=float, default=[0.8, 0.6])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the random-window draws")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_modes.json")
    p.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "calibration_modes.md")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON file")
    return p.parse_args(argv)


def settings_of(args) -> dict:
    return {
        "calib_samples": args.calib_samples,
        "seq_len": args.seq_len,
        "eval_windows": args.eval_windows,
        "eval_text": "testbed/heldout/python_heldout.txt",
        "calib_text": "testbed/calib/python_calib.txt",
        "dtype": "float32",
        "device": "cpu",
    }


def run_key(row: dict) -> tuple:
    return (row["model"], row["method"], row["keep"], row["sampling"], row["seed"], row["mode"])


def load_previous(path: Path, settings: dict, fresh: bool) -> dict:
    if fresh or not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("settings") != settings:
        logging.warning("%s was made with other settings; starting over", path)
        return {}
    return {"rows": data.get("rows", []), "dense": data.get("dense", {})}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _display(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def draws(seeds: list[int]) -> list[tuple[str, int | None]]:
    return [("first", None)] + [("random", s) for s in seeds]


def measure(args) -> dict:
    settings = settings_of(args)
    previous = load_previous(args.json, settings, args.fresh)
    rows = list(previous.get("rows", []))
    done = {run_key(r) for r in rows}
    dense = dict(previous.get("dense", {}))
    data = {
        "benchmark": "calibration_modes",
        "command": "python benchmarks/calibration_modes.py " + " ".join(sys.argv[1:]),
        "settings": settings,
        "environment": {
            "rankcut": rankcut.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "json": _display(args.json),
        "dense": dense,
        "rows": rows,
    }
    testbed = args.data / "testbed"
    for name in args.models:
        path = testbed / name
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        need = args.eval_windows * args.seq_len
        # Perplexity uses only the first windows: tokenize a prefix with margin (BPE is local, so the first
        # tokens of a prefix are the first tokens of the whole file), and check it is long enough.
        heldout = (testbed / "heldout" / "python_heldout.txt").read_text(encoding="utf-8")
        eval_ids = tokenize(tok, heldout[: 8 * need])
        if eval_ids.numel() < need + 1000:
            eval_ids = tokenize(tok, heldout)
        eval_ids = eval_ids[:need]
        calib_ids = tokenize(tok, (testbed / "calib" / "python_calib.txt").read_text(encoding="utf-8"))

        def ppl(m):
            return rankcut.perplexity(m, tok, eval_ids, seq_len=args.seq_len, max_windows=args.eval_windows, progress=False)

        if name not in dense:
            dense[name] = ppl(model)
        print(f"{name}: dense perplexity {dense[name]:.3f}", flush=True)
        for method in args.methods:
            for keep in args.keeps:
                for sampling, seed in draws(args.seeds):
                    for mode, flags in MODES.items():
                        row = {"model": name, "method": method, "keep": keep, "sampling": sampling, "seed": seed, "mode": mode}
                        if run_key(row) in done:
                            continue
                        config = rankcut.CompressConfig(
                            method=method, keep=keep, calib_samples=args.calib_samples, seq_len=args.seq_len,
                            sampling=sampling, seed=0 if seed is None else seed, **flags,
                        )
                        work = copy.deepcopy(model)
                        summary = rankcut.compress_(work, config, calib=calib_ids, progress=False)
                        row.update(perplexity=ppl(work), dense=dense[name], keep_targets=summary.keep_targets,
                                   keep_model=summary.keep_model)
                        rows.append(row)
                        done.add(run_key(row))
                        write_json(args.json, data)
                        print(f"  {method} keep {keep} {sampling}{'' if seed is None else f' seed {seed}'} "
                              f"{mode}: {row['perplexity']:.3f}", flush=True)
                        del work
        write_json(args.json, data)
    return data


# ------------------------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return _fmt(values[0]) if values else "–"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def analyse(data: dict) -> list[dict]:
    """One entry per (model, method, keep): the figures of every mode and draw, and paired comparisons."""
    index = {run_key(r): r["perplexity"] for r in data["rows"]}
    order = list(dict.fromkeys(r["model"] for r in data["rows"]))  # models in the order they were run
    groups = sorted({(r["model"], r["method"], r["keep"]) for r in data["rows"]},
                    key=lambda g: (order.index(g[0]), g[1], -g[2]))
    seeds = sorted({r["seed"] for r in data["rows"] if r["sampling"] == "random"})
    out = []
    for model, method, keep in groups:
        def get(sampling, seed, mode):
            return index.get((model, method, keep, sampling, seed, mode))

        entry = {"model": model, "method": method, "keep": keep, "dense": data["dense"].get(model)}
        for mode in MODES:
            entry[f"first_{mode}"] = get("first", None, mode)
            entry[f"random_{mode}"] = [v for s in seeds if (v := get("random", s, mode)) is not None]
        # paired relative change of sequential vs independent, per draw (first + each seed)
        pairs = [(get(s, seed, "independent"), get(s, seed, "sequential")) for s, seed in draws(seeds)]
        entry["seq_change"] = [b / a - 1 for a, b in pairs if a is not None and b is not None]
        hooks = [(get(s, seed, "independent"), get(s, seed, "hooks")) for s, seed in draws(seeds)]
        entry["hooks_change"] = [b / a - 1 for a, b in hooks if a is not None and b is not None]
        rand = entry["random_independent"]
        entry["seed_spread"] = (max(rand) - min(rand)) / statistics.mean(rand) if len(rand) > 1 else None
        out.append(entry)
    return out


def verdict(entry: dict) -> str:
    changes, spread = entry["seq_change"], entry["seed_spread"]
    if not changes:
        return "–"
    better = sum(c < 0 for c in changes)
    mean = statistics.mean(changes)
    beyond = spread is not None and abs(mean) > spread and better in (0, len(changes))
    word = "lower" if mean < 0 else "higher"
    note = "beyond seed spread" if beyond else "within seed spread" if spread is not None else ""
    return f"{100 * mean:+.2f} % ({word} in {better if mean < 0 else len(changes) - better}/{len(changes)} draws; {note})"


def markdown(data: dict, conclusion: str | None) -> str:
    s = data["settings"]
    entries = analyse(data)
    seeds = sorted({r["seed"] for r in data["rows"] if r["sampling"] == "random"})
    lines = [
        "# Calibration modes: independent vs sequential layer-by-layer calibration",
        "",
        "Which activations should calibrate each transformer block of a data-aware method? Three modes of "
        "`rankcut.compress_`:",
        "",
        f"- **(a) independent** — `layerwise=True` (the default): one block at a time, each calibrated on the dense "
        "model's activations;",
        "- **(b) sequential** — `layerwise=True, sequential=True`: one block at a time, each calibrated on the outputs "
        "of the already-compressed blocks before it;",
        "- **(c) hooks** — `layerwise=False`: hooks on all targets over whole-model passes of the dense model; the same "
        "statistic as (a), so it must match (a) up to rounding.",
        "",
        f"Protocol (DESIGN.md §4): fp32, CPU; perplexity on the first {s['eval_windows']} windows of {s['seq_len']} "
        f"tokens of `{s['eval_text']}`; calibration = {s['calib_samples']} windows of {s['seq_len']} tokens of "
        f"`{s['calib_text']}`, either the first ones (`sampling=\"first\"`, the setting of the DESIGN.md reference "
        f"table) or random ones (`sampling=\"random\"`, seeds {', '.join(map(str, seeds))}); uniform keep over the "
        "decoder targets. Dense perplexity is from the same run.",
        "",
        "Command (repository root, `../shared/data` present):",
        "",
        "```",
        data["command"].strip(),
        "```",
        "",
        f"Environment: rankcut {data['environment']['rankcut']}, torch {data['environment']['torch']}, "
        f"transformers {data['environment']['transformers']}. Raw figures: `{data['json']}`.",
        "",
        "## Held-out perplexity",
        "",
        "First windows: one figure per mode. Random windows: mean ± standard deviation over "
        f"{len(seeds)} seeds. *Seq. vs indep.*: mean paired change of (b) relative to (a) over the "
        f"{1 + len(seeds)} draws (first + each seed), how many draws it goes that way, and whether the mean "
        "change exceeds the seed spread of (a) (max − min over seeds, relative). *max |c−a|*: the largest "
        "relative difference between (c) and (a) over the same draws.",
        "",
        "| model | method | keep | dense | first (a) | first (b) | first (c) | random (a) | random (b) | random (c) "
        "| seed spread (a) | seq. vs indep. | max \\|c−a\\| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        first = [e[f"first_{m}"] for m in MODES]
        spread = "–" if e["seed_spread"] is None else f"{100 * e['seed_spread']:.1f} %"
        worst = max(map(abs, e["hooks_change"])) if e["hooks_change"] else None
        hooks = "–" if worst is None else "0 (identical)" if worst == 0 else f"{worst:.1e}"
        lines.append(
            f"| {e['model']} | {e['method']} | {e['keep']} | {_fmt(e['dense'])} | "
            + " | ".join("–" if v is None else _fmt(v) for v in first)
            + " | "
            + " | ".join(_mean_sd(e[f"random_{m}"]) for m in MODES)
            + f" | {spread} | {verdict(e)} | {hooks} |"
        )
    lines.append("")
    lines.append("## Conclusion")
    lines.append("")
    lines.append(conclusion.strip() if conclusion else "_(to be written from the table above)_")
    lines.append("")
    return "\n".join(lines)


def existing_conclusion(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text()
    marker = "\n## Conclusion\n"
    if marker not in text:
        return None
    body = text.split(marker, 1)[1].strip()
    return None if not body or body.startswith("_(to be written") else body


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if not (args.data / "testbed").is_dir():
        sys.exit(f"{args.data / 'testbed'} is absent: this benchmark needs the shared real models and texts")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = measure(args)
    args.md.write_text(markdown(data, existing_conclusion(args.md)))
    print(f"wrote {args.json} and {args.md}")
    if any(math.isnan(r["perplexity"]) for r in data["rows"]):
        sys.exit("some perplexities are NaN")


if __name__ == "__main__":
    main()
