"""Issue 13, item 5: the real GPU cost of runtime activation decomposition at the Llama-2-7B shape.

Random bf16 weights (the times are real; quality is not measured here). Per decomposed input: the
decomposition of X (batch × S × 4096, fp32) at rank k by each solver, the decomposed products of the layers
that read it (q/k/v: 3 × 4096², gate/up: 2 × 11008 × 4096, bf16) against the dense GEMMs they replace. End to
end: prefill latency and peak memory of the whole model, dense and with the seed's layer set [10, 15, 20, 25]
decomposed (rank ``--rank``, 3 % outlier channels calibrated on 2 random windows), in the same run.
CUDA-synchronised wall times, median of 3 after a warm-up.

    PYTHONPATH=$PWD python3 benchmarks/dcom_cost.py --json OUT/dcom_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rankcut.bench.models import preset_config, random_model
from rankcut.dcom import apply_linear, decompose
from rankcut.lanczos import lanczos_svd
from rankcut.linalg import randomized_svd
from rankcut.runtime import RuntimePlan, apply_runtime, calibrate_thresholds, remove_runtime


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--layers", type=int, nargs="+", default=[10, 15, 20, 25])
    p.add_argument("--budget-s", type=float, default=200)
    p.add_argument("--json")
    args = p.parse_args()
    began = time.perf_counter()
    out = {"command": " ".join(["python3", *sys.argv]), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rank": args.rank, "layers": args.layers, "micro": [], "prefill": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    H, F, k = 4096, 11008, args.rank
    W_qkv = [torch.randn(H, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(3)]
    W_gu = [torch.randn(F, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(2)]
    for S in args.seqs:
        for B in args.batches:
            if time.perf_counter() - began > args.budget_s / 2:
                break
            X = torch.randn(B, S, H, device="cuda", dtype=torch.bfloat16, generator=gen)
            row = {"S": S, "batch": B}
            row["dense qkv_ms"] = timed(lambda: [X @ w.mT for w in W_qkv]) * 1e3
            row["dense gate_up_ms"] = timed(lambda: [X @ w.mT for w in W_gu]) * 1e3
            Xf = X.float()
            row["lanczos_ms"] = timed(lambda: lanczos_svd(Xf, k)) * 1e3
            row["randomized_ms"] = timed(lambda: [randomized_svd(x, k) for x in Xf]) * 1e3
            if B * S <= 4096:
                row["exact_gesvdj_ms"] = timed(lambda: [torch.linalg.svd(x, full_matrices=False, driver="gesvdj")
                                                        for x in Xf], 1) * 1e3
            f = decompose(X, k, threshold=None)
            row["decomposed qkv_ms"] = timed(lambda: [apply_linear(f, weight=w) for w in W_qkv]) * 1e3
            row["decomposed gate_up_ms"] = timed(lambda: [apply_linear(f, weight=w) for w in W_gu]) * 1e3
            out["micro"].append(row)
            print(json.dumps(row), flush=True)
            del X, Xf, f
    del W_qkv, W_gu
    torch.cuda.empty_cache()
    model = random_model(preset_config("llama2-7b"), torch.bfloat16, "cuda")
    plan = RuntimePlan(layers=args.layers, rank=k, outlier_fraction=0.03)
    ids_cal = torch.randint(0, model.config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calibrate_thresholds(model, plan, ids_cal.cuda(), batch_size=2)
    for S in args.seqs:
        for B in args.batches:
            if time.perf_counter() - began > args.budget_s:
                break
            ids = torch.randint(0, model.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(2)).cuda()
            row = {"S": S, "batch": B}
            with torch.no_grad():
                for label in ("dense", "decomposed"):
                    if label == "decomposed":
                        apply_runtime(model, plan)
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    row[f"{label}_ms"] = timed(lambda: model(input_ids=ids, logits_to_keep=1)) * 1e3
                    row[f"{label}_peak_activation_bytes"] = torch.cuda.max_memory_allocated() - base
                    remove_runtime(model)
            row["slowdown"] = row["decomposed_ms"] / row["dense_ms"]
            out["prefill"].append(row)
            print(json.dumps(row), flush=True)
    out["wall_s"] = time.perf_counter() - began
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
