"""Quality recovery on the CPU (BENCHMARKS.md, "Recovery"): compress codellama-16m with whiten, recover with
both modes and both inits on the calibration text, evaluate on the held-out text.

Every step is a ``rankcut`` command line, run as a subprocess and recorded verbatim in the JSON output.
Mode ``grow`` adds ``lora_rank · (m + n)`` parameters per layer, so it starts from a checkpoint compressed at a
smaller keep (:func:`rankcut.adapters.keep_for_growth`) whose grown size fits the parameters of mode ``factors``.

    python benchmarks/recover_cpu.py --data ../shared/data --json benchmarks/results/recover_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import time
from pathlib import Path

import torch
import transformers

from rankcut.adapters import keep_for_growth
from rankcut.layers import dense_shape
from rankcut.targets import find_targets


def run(argv: list[str], log: list) -> float:
    """Run one rankcut command; record it, its wall time and what it printed."""
    start = time.perf_counter()
    done = subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    log.append({"command": shlex.join(argv), "wall_s": wall, "stdout": done.stdout})
    print(f"[{wall:7.1f} s] {shlex.join(argv)}", flush=True)
    return wall


def evaluate(model: str, text: str, windows: list[int], out: Path, log: list) -> dict:
    result = {}
    for n in windows:
        path = out / f"eval_{Path(model).name}_{n}.json"
        run(["rankcut", "eval", model, "--ppl", text, "--seq-len", "256", "--max-windows", str(n), "--quiet",
             "--json", str(path)], log)
        result[n] = next(iter(json.loads(path.read_text())["perplexity"].values()))
    return result


def render(results: dict) -> str:
    """The BENCHMARKS.md table: dense, compressed starts and every recovery, per keep."""
    w = sorted(int(n) for n in results["dense"]["ppl"])
    dense = results["dense"]["ppl"]
    head = ["keep", "model", "keep (targets)", "keep (model)"] + [f"ppl {n}×256" for n in w]
    head += [f"gap closed ({w[-1]}×256)", "ppl at step 0 (24×256)", "tokens tuned", "recover wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| | dense | 1 | 1 | " + " | ".join(f"{dense[str(n)]:.3f}" for n in w) + " | | | | |")
    for keep in sorted({p["keep"] for p in results["points"]}):
        points = [p for p in results["points"] if p["keep"] == keep]
        for start_keep in sorted({p["start_keep"] for p in points}, reverse=True):
            p = next(q for q in points if q["start_keep"] == start_keep)
            lines.append(f"| {keep} | compressed at keep {start_keep} | {p['start_keep_targets']:.4f} | | "
                         + " | ".join(f"{p['start_ppl'][str(n)]:.3f}" for n in w) + " | | | | |")
        for p in points:
            start, last = p["start_ppl"][str(w[-1])], p["ppl"][str(w[-1])]
            closed = (start - last) / (start - dense[str(w[-1])])
            loss = f", distill {p['distill']:g}" if p.get("distill") else ""
            lines.append(f"| {keep} | {p['mode']} + {p['init']}{loss} (from keep {p['start_keep']}) | {p['keep_targets']:.4f} | "
                         f"{p['keep_model']:.4f} | " + " | ".join(f"**{p['ppl'][str(n)]:.3f}**" for n in w)
                         + f" | {100 * closed:.0f} % | {p['history'][0][1]:.3f} | {p['tokens_tuned']:,} | {p['recover_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--work", default="/tmp/rankcut_recover_bench", help="checkpoints are written here")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", default="1e-3", help="chosen on a validation split of the calibration text")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the dense model")
    parser.add_argument("--windows", type=int, nargs="+", default=[24, 400], help="held-out windows of 256 tokens")
    parser.add_argument("--json", default="benchmarks/results/recover_cpu.json")
    parser.add_argument("--render", action="store_true", help="only print the Markdown table of an existing --json")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.json).read_text())))
        return
    data = Path(args.data).resolve() / "testbed"
    dense, calib = str(data / "codellama-16m"), str(data / "calib" / "python_calib.txt")
    held = str(data / "heldout" / "python_heldout.txt")
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    log: list = []
    model = transformers.AutoModelForCausalLM.from_pretrained(dense)
    shapes = [dense_shape(m) for m in find_targets(model).values()]
    target_params = sum(m * n for m, n in shapes)
    results = {"dense": {"ppl": evaluate(dense, held, args.windows, out, log), "params": model.num_parameters()},
               "points": []}
    compress = ["--method", "whiten", "--calib", calib, "--calib-samples", "32", "--seq-len", "256", "--sampling", "first",
                "--quiet", "--overwrite"]
    for keep in args.keep:
        grow_keep = math.floor(keep_for_growth(shapes, keep, args.lora_rank) * 1e4) / 1e4
        starts = {}
        for k in sorted({keep, grow_keep}):
            path = str(out / f"whiten_{k}")
            wall = run(["rankcut", "compress", dense, "--keep", str(k), *compress, "-o", path], log)
            record = json.loads((Path(path) / "rankcut.json").read_text())["record"]
            starts[k] = {"path": path, "ppl": evaluate(path, held, args.windows, out, log), "compress_s": wall,
                         "keep_targets": record["keep_targets"], "params": record["summary"]["model_params_after"]}
        for mode, init in (("factors", "zero"), ("factors", "residual"), ("grow", "zero"), ("grow", "residual")):
            start = starts[keep if mode == "factors" else grow_keep]
            path = str(out / f"recovered_{keep}_{mode}_{init}" + (f"_distill{args.distill:g}" if args.distill else ""))
            argv = ["rankcut", "recover", start["path"], "--data", calib, "--eval", held, "--eval-windows", "24",
                    "--mode", mode, "--init", init, "--lora-rank", str(args.lora_rank), "--steps", str(args.steps),
                    "--seq-len", "256", "--batch-size", str(args.batch_size), "--lr", args.lr, "--seed", "0",
                    *(["--distill", f"{args.distill:g}"] if args.distill else []),
                    *(["--dense", dense] if (mode, init) == ("grow", "residual") or args.distill else []),
                    "-o", path, "--overwrite", "--quiet", "--json", path + ".json"]
            wall = run(argv, log)
            recovery = json.loads(Path(path + ".json").read_text())["recovery"]
            results["points"].append({
                "keep": keep, "mode": mode, "init": init, "distill": args.distill,
                "start_keep": keep if mode == "factors" else grow_keep,
                "start_keep_targets": start["keep_targets"], "start_ppl": start["ppl"],
                "ppl": evaluate(path, held, args.windows, out, log), "recover_s": wall,
                "tokens_tuned": recovery["tokens_tuned"], "epochs": recovery["epochs"],
                "params": recovery["params_after"], "keep_targets": recovery["keep_targets_after"],
                "keep_model": recovery["params_after"] / results["dense"]["params"],
                "trainable": recovery["trainable_params"], "history": recovery["eval"]["history"],
            })
    results.update(target_params=target_params, commands=log, environment={
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine()})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(render(json.loads(json.dumps(results))))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
