"""Layer benchmark (issue #4, item 2): one low-rank projection at decode sizes, kernel time by CUDA-graph replay.

For each shape (out × in), rank (128 … break-even) and M (rows: 1 and 16): dense cuBLAS ``F.linear``, the
two-``F.linear`` low-rank baseline, and rankcut's kernel (its automatic plan, plus tuning variants on a
subset), each as the median per-call time of a replayed CUDA graph that rotates among enough weight copies to
stream ≥ 512 MB per replay (more than the 60 MB L2). Also measures the launch floor (an empty kernel,
graph-replayed), the fused kernel's own floor (a tiny problem), and device-to-device copy bandwidth.

Target: speedup ≥ 0.85 × min(bound, dense time / launch floor) for every rank ≥ 256, and never slower than
two ``F.linear``.

Example::

    PYTHONPATH=$PWD python benchmarks/layer_bench.py --json benchmarks/results/layer_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch.nn import functional as F

from rankcut.units import max_useful_rank
from rankcut.bench.timing import copies_for, copy_bandwidth, graph_time, launch_floor
from rankcut.utils import environment
from rankcut.kernels import dispatch
from rankcut.kernels.plan import kernel_pays

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (1024, 4096)]
TUNE_SHAPES = {(4096, 4096), (11008, 4096), (4096, 11008)}
VARIANTS = {1: {"fused": {"mode": "fused"}, "nopdl": {"pdl": False}, "e4k": {"max_elems": 4096}, "e8k": {"max_elems": 8192}},
            16: {"fused": {"mode": "fused"}, "nopdl": {"pdl": False}, "bn16": {"block_n": 16}, "bn64": {"block_n": 64},
                 "br32": {"block_r": 32}}}


class _Holder:  # owner of the kernel scratch shared by all copies of one benchmark point
    pass


def ranks_for(m: int, n: int) -> list[int]:
    top = max_useful_rank(m, n)
    return [r for r in (128, 256, 512, 1024, 2048) if r < top] + [top]


def time_point(m: int, n: int, r: int, rows: int, dtype, variants: dict, t_dense: float) -> dict:
    size = r * (m + n)
    copies = copies_for(size * 2)
    V = [torch.randn(r, n, device="cuda", dtype=dtype) / math.sqrt(n) for _ in range(copies)]
    U = [torch.randn(m, r, device="cuda", dtype=dtype) / math.sqrt(r) for _ in range(copies)]
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    out = {"m": m, "n": n, "rank": r, "rows": rows, "bytes": size * 2, "bound": m * n / size, "copies": copies,
           "dense_s": t_dense}
    out["two_linear_s"] = graph_time([(lambda v=v, u=u: F.linear(F.linear(x, v), u)) for v, u in zip(V, U)])
    holder = _Holder()
    ref = F.linear(F.linear(x.double(), V[0].double()), U[0].double())
    for name, overrides in [("kernel", {})] + list(variants.items()):
        with dispatch.plan_overrides(**overrides):
            plan = dispatch.get_plan(rows, n, [r], [m], x.device)
            y = dispatch.run_kernel(x, V[0], U[0], None, [r], [m], holder)
            err = float((y.double() - ref).norm() / ref.norm())
            t = graph_time([(lambda v=v, u=u: dispatch.run_kernel(x, v, u, None, [r], [m], holder)) for v, u in zip(V, U)])
        out[f"{name}_s"] = t
        out[f"{name}_plan"] = plan.__dict__
        out[f"{name}_rel_err"] = err
    out["sync_error_flag"] = int(holder._rankcut_scratch.sync[3].item())
    from rankcut.kernels.lowrank import launch  # Triton: only where the kernels run

    plan = dispatch.get_plan(rows, n, [r], [m], x.device)  # profile: each launch of the automatic plan alone
    y = torch.empty(rows, m, device="cuda", dtype=dtype)
    for ph in (1, 2):
        out[f"phase{ph}_only"] = graph_time([(lambda v=v, u=u: launch(x, v, u, None, y, holder._rankcut_scratch, plan, (ph,)))
                                             for v, u in zip(V, U)])
    del V, U
    return out


def time_glue(dtype) -> dict:
    """Graph-replayed time of the small kernels of a Llama decode step (batch 1, Llama-2-7B / -3-8B sizes)."""
    from rankcut.kernels import glue

    out = {}
    H, D, T = 4096, 128, 384
    h, res, w = (torch.randn(1, 1, H, device="cuda", dtype=dtype) for _ in range(3))
    out["add_rmsnorm"] = graph_time([lambda: glue.add_rmsnorm(h, res, w.view(-1), 1e-5)] * 50)
    for name, kv, inter in (("llama2", 32, 11008), ("llama3", 8, 14336)):
        qkv = torch.randn(1, 1, (32 + 2 * kv) * D, device="cuda", dtype=dtype)
        cos, sin = (torch.randn(1, 1, D, device="cuda", dtype=dtype) for _ in range(2))
        kc, vc = (torch.randn(1, kv, T, D, device="cuda", dtype=dtype) for _ in range(2))
        pos = torch.tensor([200], device="cuda")
        out[f"rope_cache_{name}"] = graph_time([lambda: glue.rope_cache(qkv, cos, sin, kc, vc, pos, 32, kv, D)] * 50)
        q = torch.randn(1, kv, 32 // kv, D, device="cuda", dtype=dtype)
        mask = torch.zeros(1, 1, 1, T, device="cuda", dtype=dtype)
        out[f"sdpa_{name}"] = graph_time([lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)] * 50)
        gu = torch.randn(1, 1, 2 * inter, device="cuda", dtype=dtype)
        out[f"silu_mul_{name}"] = graph_time([lambda: glue.silu_mul(gu)] * 50)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--no-tune", action="store_true", help="only the automatic plan")
    ap.add_argument("--summarize", action="store_true", help="re-summarize an existing --json file (no GPU)")
    args = ap.parse_args()
    if args.summarize:  # derived fields (the dispatched path) follow the current dispatch rule
        with open(args.json) as fh:
            result = json.load(fh)
        summarize(result)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        return 0
    dtype = getattr(torch, args.dtype)
    rows_list = [int(v) for v in args.rows.split(",")]
    torch.manual_seed(0)
    start = time.time()
    result = {"command": " ".join(["python", *sys.argv]), "environment": environment(), "dtype": args.dtype}
    result["copy_bandwidth_Bps"] = copy_bandwidth()
    result["launch_floor_s"] = {"grid_132": launch_floor(grid=132), "grid_1": launch_floor(grid=1)}
    floors = {}
    for rows in rows_list:  # the kernels' fixed cost: a problem too small to matter in bytes
        p = time_point(256, 256, 16, rows, dtype, {"fused": {"mode": "fused"}}, float("nan"))
        floors[str(rows)] = {"two": p["kernel_s"], "fused": p["fused_s"], "two_linear": p["two_linear_s"]}
    result["kernel_floor_s"] = floors
    result["glue_s"] = time_glue(dtype)
    points = []
    for m, n in SHAPES:
        for rows in rows_list:
            W = [torch.randn(m, n, device="cuda", dtype=dtype) / math.sqrt(n) for _ in range(copies_for(m * n * 2))]
            x = torch.randn(rows, n, device="cuda", dtype=dtype)
            t_dense = graph_time([(lambda w=w: F.linear(x, w)) for w in W])
            # rankcut's dense GEMV (one token; the decode step's dense path), beside cuBLAS
            t_gemv = graph_time([(lambda w=w: dispatch.dense_forward(w, None, x)) for w in W]) if rows == 1 else None
            del W
            for r in ranks_for(m, n):
                variants = VARIANTS[rows] if (m, n) in TUNE_SHAPES and not args.no_tune else {}
                p = time_point(m, n, r, rows, dtype, variants, t_dense)
                p["dense_rankcut_gemv"] = t_gemv  # seconds (not a "*_s" kernel variant of the summary)
                points.append(p)
                print(f"{m:>6}x{n:<6} M={rows:<2} r={r:<5} dense {t_dense * 1e6:6.2f} us  2xlinear {p['two_linear_s'] * 1e6:6.2f}"
                      f"  kernel {p['kernel_s'] * 1e6:6.2f}  " + "  ".join(f"{k}={p[k + '_s'] * 1e6:.2f}" for k in variants)
                      + f"  err {p['kernel_rel_err']:.1e}", flush=True)
                torch.cuda.empty_cache()
    result["points"] = points
    result["seconds"] = time.time() - start
    summarize(result)  # adds each point's dispatched time
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


def summarize(result: dict) -> None:
    """Print the per-point table against the issue's target."""
    floor = result["launch_floor_s"]["grid_132"]
    print(f"launch floor {floor * 1e6:.2f} us (grid 132), {result['launch_floor_s']['grid_1'] * 1e6:.2f} us (grid 1); "
          f"kernel floors {result['kernel_floor_s']}; copy {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
    print("glue (us):", {k: round(v * 1e6, 2) for k, v in result.get("glue_s", {}).items()})
    misses = 0
    for p in result["points"]:
        best = min((p[k], k) for k in p if k.endswith("_s") and k not in ("dense_s", "two_linear_s"))
        phases = f"p1 {p['phase1_only'] * 1e6:5.2f} p2 {p['phase2_only'] * 1e6:5.2f}" if "phase1_only" in p else ""
        auto = p["kernel_s"] if kernel_pays(p["rows"], [p["rank"]]) else p["two_linear_s"]  # what LowRankLinear runs
        p["dispatched_s"] = auto
        speed = p["dense_s"] / auto
        target = 0.85 * min(p["bound"], p["dense_s"] / floor)
        ok = (p["rank"] < 256 or speed >= target) and auto <= p["two_linear_s"]
        misses += not ok
        print(f"{p['m']:>6}x{p['n']:<6} M={p['rows']:<2} r={p['rank']:<5} bound {p['bound']:5.2f} speedup {speed:5.2f} "
              f"(kernel {p['dense_s'] / p['kernel_s']:5.2f}) "
              f"target {target:5.2f} 2xlinear {p['dense_s'] / p['two_linear_s']:5.2f} GB/s {p['bytes'] / p['kernel_s'] / 1e9:6.0f} "
              f"best {best[1]} {p['dense_s'] / best[0]:5.2f} {phases} {'ok' if ok else 'MISS'}"
              + (f" | vs rankcut dense GEMV {p['dense_rankcut_gemv'] * 1e6:.2f} us: {p['dense_rankcut_gemv'] / auto:5.2f}x"
                 if p.get("dense_rankcut_gemv") else ""))
    print(f"{misses} points miss the target")


if __name__ == "__main__":
    sys.exit(main())
