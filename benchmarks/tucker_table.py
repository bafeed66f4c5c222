"""Issue 12's quality table: per-layer whiten against Tucker per matrix, per head, and bases shared across
G = 2, 4 and all layers, at keep 0.8, 0.6 and 0.4 (testbed protocol, DESIGN §4).

    python3 benchmarks/tucker_table.py codellama-16m codegpt2-23m --json benchmarks/results/tucker_table.json

Calibration: the first 32 windows of 256 tokens of the calibration text; evaluation: the first 24 windows of 256
tokens of the held-out text; float32, 2 threads, seed 0. Every variant is a uniform keep per unit, so the
parameters are equal up to each unit's rank rounding (the kept fraction of the targets is printed with it).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import rankcut

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"
VARIANTS = {
    "whiten (per layer)": ("whiten", {}),
    "tucker, per matrix": ("tucker", {"group": "matrix"}),
    "tucker, per head": ("tucker", {"group": "heads"}),
    "shared input basis, G=2": ("tucker", {"group": "layers", "group_size": 2, "share": "in"}),
    "shared input basis, G=4": ("tucker", {"group": "layers", "group_size": 4, "share": "in"}),
    "shared input basis, G=all": ("tucker", {"group": "layers", "group_size": 0, "share": "in"}),
    "shared output basis, G=all": ("tucker", {"group": "layers", "group_size": 0, "share": "out"}),
    "shared larger side, G=all": ("tucker", {"group": "layers", "group_size": 0, "share": "auto"}),
    "shared both factors, G=all": ("tucker", {"group": "layers", "group_size": 0, "share": "both"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--calib", default=str(D / "calib" / "python_calib.txt"))
    p.add_argument("--eval", default=str(D / "heldout" / "python_heldout.txt"))
    p.add_argument("--json")
    p.add_argument("--render", action="store_true", help="only print the Markdown table of an existing --json")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.json).read_text())))
        return
    torch.set_num_threads(2)
    out = {"command": "python3 benchmarks/tucker_table.py " + " ".join(args.models), "rows": []}
    for name in args.models:
        path = str(D / name) if not Path(name).is_dir() else name
        tok = transformers.AutoTokenizer.from_pretrained(path)

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

        dense = load()
        dense_ppl = rankcut.perplexity(dense, tok, args.eval, seq_len=256, max_windows=24, progress=False)
        out["rows"].append({"model": name, "variant": "dense", "keep": 1.0, "ppl": dense_ppl, "keep_targets": 1.0})
        print(name, "dense", round(dense_ppl, 4), flush=True)
        for keep in args.keeps:
            for variant in args.variants:
                method, options = VARIANTS[variant]
                model = load()
                config = rankcut.CompressConfig(method=method, keep=keep, options=options, calib_samples=32,
                                                seq_len=256, sampling="first")
                start = time.time()
                summary = rankcut.compress_(model, config, calib=args.calib, tokenizer=tok, progress=False)
                wall = time.time() - start
                ppl = rankcut.perplexity(model, tok, args.eval, seq_len=256, max_windows=24, progress=False)
                row = {"model": name, "variant": variant, "keep": keep, "ppl": ppl,
                       "keep_targets": summary.keep_targets, "keep_model": summary.keep_model if hasattr(
                           summary, "keep_model") else None, "compress_s": wall}
                out["rows"].append(row)
                print(name, keep, variant, round(ppl, 4), round(summary.keep_targets, 4), f"{wall:.1f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def render(data: dict) -> str:
    """One Markdown table: a row per variant, a column per (model, keep); kept fraction of the targets beside."""
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    keeps = sorted({r["keep"] for r in rows if r["variant"] != "dense"}, reverse=True)
    cols = [(m, k) for m in models for k in keeps]
    lines = ["| variant | " + " | ".join(f"{m} keep {k}" for m, k in cols) + " |", "|---|" + "---|" * len(cols)]
    dense = {r["model"]: r["ppl"] for r in rows if r["variant"] == "dense"}
    lines.append("| dense | " + " | ".join(f"{dense[m]:.3f}" if k == keeps[0] else "" for m, k in cols) + " |")
    best = {}
    for m, k in cols:
        cands = [r for r in rows if r["model"] == m and r["keep"] == k]
        best[(m, k)] = min(r["ppl"] for r in cands)
    for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "dense"):
        cells = []
        for m, k in cols:
            r = next((r for r in rows if r["model"] == m and r["keep"] == k and r["variant"] == variant), None)
            if r is None:
                cells.append("")
                continue
            text = f"{r['ppl']:.3f} ({r['keep_targets']:.3f})"
            cells.append(f"**{text}**" if r["ppl"] == best[(m, k)] else text)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
