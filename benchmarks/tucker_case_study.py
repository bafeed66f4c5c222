"""Issue 12, item 5: seed 004's Table IV recipe on the testbed, beside the same budget spent otherwise.

The recipe: rank-1 Tucker (HOOI, here of the whitened weights: ``tucker`` per matrix at rank 1) on *all* tensors
of a few chosen layers, early layers avoided, chosen layers far apart. For each layer set, the same kept fraction
of the targets' parameters is then given to per-layer ``whiten`` at uniform keep over every layer, and to bases
shared across all layers (``tucker``, group layers, shared input basis). Testbed protocol (DESIGN §4):
calibration on the first 32 windows of 256 tokens, evaluation on the first 24 windows of 256 tokens of the
held-out text, float32, 2 threads.

    python3 benchmarks/tucker_case_study.py codellama-16m --json benchmarks/results/tucker_case_study.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import rankcut

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"
LAYER_SETS = [[5], [1, 5], [1, 3, 5], [1, 2, 4, 5], [1, 2, 3, 4, 5]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="codellama-16m")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = str(D / args.model)
    calib, held = str(D / "calib" / "python_calib.txt"), str(D / "heldout" / "python_heldout.txt")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = dict(calib_samples=32, seq_len=256, sampling="first")

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def run(config):
        model = load()
        start = time.time()
        summary = rankcut.compress_(model, config, calib=calib, tokenizer=tok, progress=False)
        ppl = rankcut.perplexity(model, tok, held, seq_len=256, max_windows=24, progress=False)
        return {"ppl": ppl, "keep_targets": summary.keep_targets, "compress_s": time.time() - start,
                "params": sum(q.numel() for q in model.parameters())}

    dense = load()
    dense_params = sum(q.numel() for q in dense.parameters())
    out = {"command": "python3 benchmarks/tucker_case_study.py " + args.model, "dense_params": dense_params,
           "dense_ppl": rankcut.perplexity(dense, tok, held, seq_len=256, max_windows=24, progress=False), "rows": []}
    print("dense", out["dense_ppl"], flush=True)
    for layers in LAYER_SETS:
        include = [f"re:^model\\.layers\\.({'|'.join(map(str, layers))})\\."]
        recipe = run(rankcut.CompressConfig(method="tucker", rank=1, include=include,
                                            options={"group": "matrix"}, **base))
        # keep_targets of the recipe is over the chosen layers' targets; over all targets it is:
        kept = 1 - (dense_params - recipe["params"]) / sum(
            m.weight.numel() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
        row = {"layers": layers, "reduction": 1 - recipe["params"] / dense_params, "keep_all_targets": kept,
               "seed recipe (rank-1 Tucker)": recipe}
        row["whiten, uniform"] = run(rankcut.CompressConfig(method="whiten", keep=kept, **base))
        row["shared input basis, G=all"] = run(rankcut.CompressConfig(method="tucker", keep=kept,
                                                                      options={"group": "layers", "share": "in"}, **base))
        out["rows"].append(row)
        print(layers, f"reduction {row['reduction']:.4f}", *(f"{k}: {row[k]['ppl']:.4f} ({row[k]['params']})" for k in
              ("seed recipe (rank-1 Tucker)", "whiten, uniform", "shared input basis, G=all")), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
