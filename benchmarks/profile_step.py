"""Where a decode step's time goes (issue #15): kernel time per kind, from the profiler, against the replayed step.

Random Llama-2-7B-shaped bf16 model, dense and at uniform keep 0.5 (``--keeps``), rankcut's decode step (batch 1,
384-slot cache, position 255). Eager steps run under ``torch.profiler``; each kernel's device time is summed by
kind and divided by the number of steps. The CUDA-graph step time (``time_decode``) is measured on the same
decoder; ``gaps`` = graph step − the sum of kernel times (launch gaps and dependency waits between kernels).

Example::

    PYTHONPATH=$PWD python benchmarks/profile_step.py --json benchmarks/results/decode15/profile_step.json
"""

from __future__ import annotations

import argparse
import json

import torch

from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import time_decode
from rankcut.bench.models import preset_config, random_lowrank_, random_model
from rankcut.utils import environment

KINDS = [("attention", ("_decode_attention",)), ("rankcut phase 1", ("_p1_",)), ("rankcut phase 2", ("_p2_",)),
         ("rankcut dense GEMV", ("_dense_gemv", "_dense_glu")),
         ("cuBLAS GEMV", ("nvjet", "gemv", "gemm", "splitKreduce", "cutlass")), ("add+RMSNorm", ("_add_rmsnorm",)),
         ("rotary+cache", ("_rope_cache",)), ("SiLU*up", ("_silu_mul",)), ("SDPA", ("fmha", "flash", "cudnn", "attn"))]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def profile(model, steps: int = 8) -> dict:
    dec = make_decoder(model, 1, 384)
    prompt = torch.randint(0, model.config.vocab_size, (1, 255), device="cuda")
    graph = time_decode(dec, prompt, 64, repeats=3)
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), 255, dtype=torch.long, device="cuda")
    with torch.no_grad():
        dec.forward(prompt, torch.zeros(1, dtype=torch.long, device="cuda"))
        for _ in range(3):
            dec.forward(ids, pos)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.forward(ids, pos)
            torch.cuda.synchronize()
    kinds: dict[str, dict] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA" or "Memcpy" in e.name or "Memset" in e.name:
            continue
        k = kinds.setdefault(kind_of(e.name), {"us": 0.0, "count": 0, "names": {}})
        k["us"] += e.device_time / steps
        k["count"] += 1
        k["names"][e.name[:50]] = k["names"].get(e.name[:50], 0) + 1
    for k in kinds.values():
        k["count"] /= steps
        k["names"] = {n: c / steps for n, c in sorted(k["names"].items(), key=lambda kv: -kv[1])[:4]}
    total = sum(k["us"] for k in kinds.values())
    dec.groups = []
    return {"graph_ms_per_token": graph["ms_per_token"], "kernel_sum_ms": total / 1e3,
            "gaps_ms": graph["ms_per_token"] - total / 1e3, "kinds": kinds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--keeps", default="dense,0.5")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {}
    for keep in args.keeps.split(","):
        model = random_model(preset_config(args.shape), torch.bfloat16, "cuda")
        if keep != "dense":
            random_lowrank_(model, float(keep))
        r = out[keep] = profile(model)
        print(f"{keep}: graph step {r['graph_ms_per_token']:.3f} ms, kernels {r['kernel_sum_ms']:.3f} ms, "
              f"gaps {r['gaps_ms']:.3f} ms")
        for kind, k in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["us"]):
            print(f"  {kind:<16} {k['us']:>8.1f} us  {k['count']:>5.0f} kernels  {list(k['names'])[:2]}")
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "shape": args.shape, "rows": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
