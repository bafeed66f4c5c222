"""Quality recovery on the testbed model (BENCHMARKS.md, "Recovery").

Compress codellama-16m with ``whiten`` at each keep, recover it with both modes, both inits and every
(learning rate, distillation weight) of the grid on the calibration text, and measure perplexity on held-out
Python files. Every step is a ``rankcut`` command line, run as a subprocess (``--jobs`` at a time) and recorded
verbatim in the JSON output.

Held-out protocol. ``python_heldout.txt`` is split by position into a *test* part (the first ``--test-windows``
windows of 256 tokens: the figures reported) and a *dev* part (the text from byte ``--dev-from`` on, disjoint
from the test windows; the script checks it). Recovery's ``--eval`` is the dev part, and for each (keep, mode,
init) the grid point with the lowest dev perplexity at the end of training is the one reported in the headline
table. The test part never influences a choice; the tuning text (``python_calib.txt``) is never evaluated.

Mode ``grow`` adds ``lora_rank · (m + n)`` parameters per layer, so it starts from a checkpoint compressed at a
smaller keep (:func:`rankcut.adapters.keep_for_growth`) whose grown size fits the parameters of mode ``factors``.

    python benchmarks/recover_bench.py --data ../shared/data --device cuda --jobs 8 \\
        --json benchmarks/results/recover_h200.json
    python benchmarks/recover_bench.py --render --json benchmarks/results/recover_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers

from rankcut.adapters import keep_for_growth
from rankcut.modules import dense_shape
from rankcut.targets import find_targets

MODES = (("factors", "zero"), ("factors", "residual"), ("grow", "zero"), ("grow", "residual"))
SEQ = 256
RANKCUT = ["rankcut"] if shutil.which("rankcut") else [sys.executable, "-m", "rankcut"]


def run(argv: list[str], log: list) -> float:
    """Run one rankcut command; record it, its wall time and what it printed."""
    argv = RANKCUT + argv[1:] if argv[0] == "rankcut" else argv
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    log.append({"command": shlex.join(argv), "wall_s": wall, "stdout": done.stdout})
    print(f"[{wall:7.1f} s] {shlex.join(argv)}", flush=True)
    return wall


def split_heldout(held: Path, out: Path, dev_from: int, test_windows: int, tokenizer) -> Path:
    """Write the dev part (from the first line break at or after ``dev_from``); check the test part ends before it."""
    text = held.read_text()
    cut = text.index("\n", dev_from) + 1
    test_tokens = len(tokenizer(text[:cut])["input_ids"])
    if test_tokens < test_windows * SEQ:
        raise SystemExit(f"the first {cut} characters hold {test_tokens} tokens, fewer than the {test_windows} test "
                         f"windows: raise --dev-from")
    dev = out / "python_heldout_dev.txt"
    dev.write_text(text[cut:])
    return dev


def render(results: dict) -> str:
    """Two Markdown tables: the chosen point per (keep, mode, init), then the whole grid."""
    dense = results["dense"]["ppl"]
    lines = ["| keep | model | keep (targets) | keep (model) | test ppl | gap closed | dev ppl | lr | distill "
             "| tokens tuned | recover wall (s) |", "|" + "---|" * 11,
             f"| | dense | 1 | 1 | {dense:.3f} | | {results['dense']['dev']:.3f} | | | | |"]
    for keep in sorted({p["keep"] for p in results["points"]}):
        points = [p for p in results["points"] if p["keep"] == keep]
        for start_keep in sorted({p["start_keep"] for p in points}, reverse=True):
            s = results["starts"][str(start_keep)]
            lines.append(f"| {keep} | compressed at keep {start_keep} | {s['keep_targets']:.4f} | {s['keep_model']:.4f} "
                         f"| {s['ppl']:.3f} | | {s['dev']:.3f} | | | | |")
        for mode, init in MODES:
            group = [p for p in points if (p["mode"], p["init"]) == (mode, init)]
            if not group:
                continue
            p = min(group, key=lambda q: q["dev"])
            closed = (results["starts"][str(keep)]["ppl"] - p["ppl"]) / (results["starts"][str(keep)]["ppl"] - dense)
            lines.append(f"| {keep} | {mode} + {init} (from keep {p['start_keep']}) | {p['keep_targets']:.4f} | "
                         f"{p['keep_model']:.4f} | **{p['ppl']:.3f}** | {100 * closed:.0f} % | {p['dev']:.3f} | "
                         f"{p['lr']:g} | {p['distill']:g} | {p['tokens_tuned']:,} | {p['recover_s']:.0f} |")
    lrs = sorted({p["lr"] for p in results["points"]})
    distills = sorted({p["distill"] for p in results["points"]})
    cols = [(lr, d) for d in distills for lr in lrs]
    lines += ["", "| keep | mode + init | " + " | ".join(f"lr {lr:g}, distill {d:g}" for lr, d in cols) + " |",
              "|" + "---|" * (2 + len(cols))]
    for keep in sorted({p["keep"] for p in results["points"]}):
        for mode, init in MODES:
            cells = []
            for lr, d in cols:
                p = next((q for q in results["points"] if (q["keep"], q["mode"], q["init"], q["lr"], q["distill"])
                          == (keep, mode, init, lr, d)), None)
                cells.append("" if p is None else f"{p['ppl']:.3f} ({p['dev']:.3f})")
            lines.append(f"| {keep} | {mode} + {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(runs: list[dict]) -> dict:
    """One grid from several runs of this script (the same dense model and starts; each point once)."""
    merged = {"dense": runs[0]["dense"], "starts": {}, "points": [], "runs": []}
    seen = set()
    for run_ in runs:
        if run_["dense"]["ppl"] != merged["dense"]["ppl"]:
            raise SystemExit("these runs measured different dense models or texts")
        for k, s in run_["starts"].items():
            if k in merged["starts"] and merged["starts"][k]["ppl"] != s["ppl"]:
                raise SystemExit(f"the runs' starts at keep {k} differ")
            merged["starts"][k] = s
        for p in run_["points"]:
            key = tuple(p[f] for f in ("keep", "mode", "init", "lr", "distill"))
            if key not in seen:
                seen.add(key)
                merged["points"].append(p)
        merged["runs"].append({k: run_[k] for k in ("args", "dev_text", "commands", "environment") if k in run_})
    merged["points"].sort(key=lambda p: (p["keep"], MODES.index((p["mode"], p["init"])), p["distill"], p["lr"]))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--work", default="/tmp/rankcut_recover_bench", help="checkpoints are written here")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--modes", nargs="+", default=[f"{m}+{i}" for m, i in MODES], help="MODE+INIT pairs")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--distill", type=float, nargs="+", default=[0.0, 1.0], help="distillation weights")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="recoveries run at once")
    parser.add_argument("--test-windows", type=int, default=400, help="held-out test windows of 256 tokens")
    parser.add_argument("--dev-windows", type=int, default=64, help="dev windows of 256 tokens")
    parser.add_argument("--dev-from", type=int, default=2_000_000, help="the dev part starts at this character")
    parser.add_argument("--compress-args", default="", help="extra `rankcut compress` flags for the starting "
                        "checkpoints, e.g. '--allocation sensitivity --sensitivity DIR' (allocated starts)")
    parser.add_argument("--json", default="benchmarks/results/recover.json")
    parser.add_argument("--render", action="store_true", help="only print the Markdown tables of an existing --json")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only merge the grids of these runs into --json")
    args = parser.parse_args()
    if args.merge:
        merged = merge([json.loads(Path(p).read_text()) for p in args.merge])
        Path(args.json).write_text(json.dumps(merged, indent=1))
        print(render(merged))
        return
    if args.render:
        print(render(json.loads(Path(args.json).read_text())))
        return
    data = Path(args.data).resolve() / "testbed"
    dense, calib = str(data / "codellama-16m"), str(data / "calib" / "python_calib.txt")
    held = data / "heldout" / "python_heldout.txt"
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    log: list = []
    where = ["--device", args.device, "--dtype", "float32"]
    model = transformers.AutoModelForCausalLM.from_pretrained(dense)
    dev = split_heldout(held, out, args.dev_from, args.test_windows, transformers.AutoTokenizer.from_pretrained(dense))
    shapes = [dense_shape(m) for m in find_targets(model).values()]

    def evaluate(path: str, dev_too: bool = True) -> tuple[float, float | None]:
        figures = [None, None]
        for i, (text, n, tag) in enumerate(((held, args.test_windows, "test"), (dev, args.dev_windows, "dev"))[:1 + dev_too]):
            js = out / f"eval_{Path(path).name}_{tag}.json"
            run(["rankcut", "eval", path, "--ppl", str(text), "--seq-len", str(SEQ), "--max-windows", str(n),
                 *where, "--quiet", "--json", str(js)], log)
            figures[i] = next(iter(json.loads(js.read_text())["perplexity"].values()))
        return figures[0], figures[1]

    test, dev_ppl = evaluate(dense)
    results = {"dense": {"ppl": test, "dev": dev_ppl, "params": model.num_parameters()}, "starts": {}, "points": []}
    modes = [tuple(m.split("+")) for m in args.modes]
    compress = ["--method", "whiten", "--calib", calib, "--calib-samples", "32", "--seq-len", str(SEQ),
                "--sampling", "first", *where, *shlex.split(args.compress_args), "--quiet", "--overwrite"]
    grow_keep = {k: math.floor(keep_for_growth(shapes, k, args.lora_rank) * 1e4) / 1e4 for k in args.keep}
    for k in sorted(set(args.keep) | ({grow_keep[k] for k in args.keep} if any(m == "grow" for m, _ in modes) else set())):
        path = str(out / f"whiten_{k}")
        wall = run(["rankcut", "compress", dense, "--keep", str(k), *compress, "-o", path], log)
        record = json.loads((Path(path) / "rankcut.json").read_text())  # format 2: the record is the file
        test, dev_ppl = evaluate(path)
        results["starts"][str(k)] = {"path": path, "ppl": test, "dev": dev_ppl, "compress_s": wall,
                                     "keep_targets": record["keep_targets"],
                                     "keep_model": record["summary"]["model_params_after"] / results["dense"]["params"]}

    def recover(point: tuple) -> dict:
        keep, (mode, init), lr, distill = point
        start_keep = keep if mode == "factors" else grow_keep[keep]
        path = str(out / f"recovered_{keep}_{mode}_{init}_lr{lr:g}_d{distill:g}")
        argv = ["rankcut", "recover", results["starts"][str(start_keep)]["path"], "--data", calib, "--eval", str(dev),
                "--eval-windows", str(args.dev_windows), "--eval-every", str(max(1, args.steps // 5)),
                "--mode", mode, "--init", init, "--lora-rank", str(args.lora_rank), "--steps", str(args.steps),
                "--seq-len", str(SEQ), "--batch-size", str(args.batch_size), "--lr", f"{lr:g}", "--seed", "0",
                "--precision", args.precision, "--device", args.device, "--dtype", "float32",
                *(["--distill", f"{distill:g}"] if distill else []),
                *(["--dense", dense] if (mode, init) == ("grow", "residual") or distill else []),
                "-o", path, "--overwrite", "--quiet", "--json", path + ".json"]
        wall = run(argv, log)
        r = json.loads(Path(path + ".json").read_text())["recovery"]
        test_ppl, _ = evaluate(path, dev_too=False)  # the dev figure is recovery's own final evaluation
        dev_after = r["eval"]["after"]
        return {"keep": keep, "mode": mode, "init": init, "lr": lr, "distill": distill, "start_keep": start_keep,
                "ppl": test_ppl, "dev": dev_after, "recover_s": wall, "train_s": r["train_wall_s"],
                "tokens_tuned": r["tokens_tuned"], "epochs": r["epochs"], "params": r["params_after"],
                "keep_targets": r["keep_targets_after"], "keep_model": r["params_after"] / results["dense"]["params"],
                "trainable": r["trainable_params"], "history": r["eval"]["history"], "loss_last10": r["loss_last10"]}

    results.update(args=vars(args), dev_text=str(dev), commands=log, environment={
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def save(point: dict) -> None:  # after every point, so an interrupted grid keeps what it finished
        with lock:
            results["points"].append(point)
            Path(args.json).write_text(json.dumps(results, indent=1))

    grid = list(itertools.product(args.keep, modes, args.lr, args.distill))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda point: save(recover(point)), grid))
    print(render(results))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
