"""Issue 13, item 4: the seed's Tables 2 and 3 on a testbed model — held-out perplexity with the inputs of chosen
decoder layers decomposed at run time (rankcut.runtime), input only (dense weights) and input + weight (`whiten`
at keep 0.8), against the rank and the outlier fraction; and the outlier-fraction curve (the seed's Figure 10).

Testbed protocol: `whiten` calibration and the outlier thresholds on the first 32 windows of 256 tokens of the
calibration text; evaluation on the first 24 windows of 256 tokens of the held-out text (each window is one
prompt, decomposed on its own); Lanczos with full reorthogonalisation; float32, 2 threads.

    python3 benchmarks/dcom_quality.py codellama-16m --json benchmarks/results/dcom/quality_codellama-16m.json \\
        --png benchmarks/results/dcom/outliers_codellama-16m.png
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import transformers

import rankcut
from rankcut.data import calibration_windows
from rankcut.runtime import RuntimePlan, apply_runtime, calibrate_thresholds, extracted_fractions, remove_runtime

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"
LAYER_SETS = [[3], [2, 4], [1, 3, 5]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="codellama-16m")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 10, 20])
    p.add_argument("--outliers", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.05, 0.10])
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = str(D / args.model)
    calib, held = str(D / "calib" / "python_calib.txt"), str(D / "heldout" / "python_heldout.txt")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    compressed = copy.deepcopy(dense)
    rankcut.compress_(compressed, rankcut.CompressConfig(method="whiten", keep=0.8, calib_samples=32, seq_len=256,
                                                         sampling="first"), calib=calib, tokenizer=tok, progress=False)
    windows = calibration_windows(calib, tok, 32, 256, 0, "first")

    def ppl(model):
        return rankcut.perplexity(model, tok, held, seq_len=256, max_windows=24, progress=False)

    out = {"command": "python3 benchmarks/dcom_quality.py " + args.model, "dense": ppl(dense),
           "whiten_0.8": ppl(compressed), "rows": []}
    print("dense", out["dense"], "whiten 0.8", out["whiten_0.8"], flush=True)
    for mode, model in (("input", dense), ("input+weight", compressed)):
        for layers in LAYER_SETS:
            for rank in args.ranks:
                for frac in args.outliers:
                    start = time.time()
                    plan = calibrate_thresholds(model, RuntimePlan(layers=layers, rank=rank, mode=mode,
                                                                   outlier_fraction=frac), windows)
                    apply_runtime(model, plan)
                    value = ppl(model)
                    fractions = extracted_fractions(model)
                    remove_runtime(model)
                    row = {"mode": mode, "layers": layers, "rank": rank, "outlier_fraction": frac, "ppl": value,
                           "extracted": sum(fractions.values()) / max(1, len(fractions)), "seconds": time.time() - start}
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, mode in zip(axes, ("input", "input+weight")):
            for rank in args.ranks:
                pts = [(r["outlier_fraction"] * 100, r["ppl"]) for r in out["rows"]
                       if r["mode"] == mode and r["rank"] == rank and r["layers"] == LAYER_SETS[1]]
                ax.plot(*zip(*pts), marker="o", label=f"rank {rank}")
            ax.axhline(out["dense"] if mode == "input" else out["whiten_0.8"], color="k", ls="--", lw=1,
                       label="no runtime decomposition")
            ax.set(title=f"{args.model}: {mode}, layers {LAYER_SETS[1]}", xlabel="outlier channels (%)",
                   ylabel="held-out perplexity", yscale="log")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
