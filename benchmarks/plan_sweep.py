"""Sweep of the M = 1 kernels' tile parameters, phase by phase (issue #15: phase 2's bandwidth, the layer table).

Each phase is timed alone (CUDA-graph replay over enough weight copies that every call reads HBM), under plans
forced through :func:`rankcut.kernels.plan.plan_lowrank`'s overrides: phase 2 over rows per program × warps,
phase 1 over rows per program × tile width × warps. A third part times phase 1 used as a *dense* GEMV (``V`` =
the dense weight) against cuBLAS ``F.linear``: whether a Triton GEMV with programmatic dependent launch could
replace cuBLAS in the dense decode step. Prints the best variants per shape; ``--json`` keeps every point.

    PYTHONPATH=$PWD python benchmarks/plan_sweep.py --json OUT/plan_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
from torch.nn import functional as F

from rankcut.bench.timing import copies_for, graph_time
from rankcut.kernels import dispatch
from rankcut.kernels.lowrank import Scratch, launch
from rankcut.kernels.plan import plan_lowrank

# (out N, in K, rank): the layer table's missed points and the decode step's keep-0.5 shapes
SHAPES = [(4096, 4096, 256), (4096, 4096, 512), (4096, 4096, 1024), (11008, 4096, 1024), (14336, 4096, 1024),
          (11008, 4096, 1492), (4096, 11008, 1492), (4096, 11008, 512)]
DENSE = [(4096, 4096), (12288, 4096), (11008, 4096), (22016, 4096), (4096, 11008)]


def _weights(n: int, k: int, r: int, copies: int):
    V = [torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k) for _ in range(copies)]
    U = [torch.randn(n, r, device="cuda", dtype=torch.bfloat16) / math.sqrt(r) for _ in range(copies)]
    return V, U


def _time(x, V, U, y, sc, plan, phases) -> float:
    return graph_time([(lambda v=v, u=u: launch(x, v, u, None, y, sc, plan, phases)) for v, u in zip(V, U)])


def sweep_shape(n: int, k: int, r: int, sms: int, budget: float) -> list[dict]:
    copies = copies_for(r * (n + k) * 2)
    V, U = _weights(n, k, r, copies)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    sc = Scratch(x.device, r, [r], [n])
    rows = []
    t0 = time.time()
    base = plan_lowrank(1, k, [r], [n], sms, pdl=True)
    variants = [("auto", {})]
    variants += [(f"p2 bn{bn} w{w}", {"block_n": bn, "num_warps": w})
                 for bn, w in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8)) if bn * base.block_rk <= 32768]
    variants += [(f"p2 bn{bn} w{w} chunk512", {"block_n": bn, "num_warps": w, "single_tile": False,
                                               "block_rk": 512})
                 for bn, w in itertools.product((4, 8, 16), (4, 8)) if r > 512]
    variants += [(f"p1 br{br} bk{bk} w{w}", {"block_r": br, "block_k": bk, "num_warps": w})
                 for br, bk, w in itertools.product((1, 2, 4), (1024, 2048, 4096), (2, 4, 8)) if bk <= k]
    for name, ov in variants:
        if time.time() - t0 > budget:
            print(f"  budget spent, {name} and later skipped", flush=True)
            break
        plan = plan_lowrank(1, k, [r], [n], sms, pdl=True, **ov)
        ph = (1,) if name.startswith("p1") else (2,) if name.startswith("p2") else (1, 2)
        row = {"shape": [n, k, r], "variant": name, "plan": plan.__dict__}
        if 1 in ph:
            row["p1_us"] = _time(x, V, U, y, sc, plan, (1,)) * 1e6
            row["p1_tbs"] = r * k * 2 / row["p1_us"] / 1e6
        if 2 in ph:
            row["p2_us"] = _time(x, V, U, y, sc, plan, (2,)) * 1e6
            row["p2_tbs"] = r * n * 2 / row["p2_us"] / 1e6
        if name == "auto":
            row["both_us"] = _time(x, V, U, y, sc, plan, (1, 2)) * 1e6
        rows.append(row)
    del V, U
    torch.cuda.empty_cache()
    return rows


def dense_points(sms: int) -> list[dict]:
    rows = []
    for n, k in DENSE:
        copies = copies_for(n * k * 2)
        W = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        sc = Scratch(x.device, n, [1], [1])
        cublas = graph_time([(lambda w=w: F.linear(x, w)) for w in W]) * 1e6
        best = None
        for br, bk, w in itertools.product((1, 2, 4, 8), (2048, 4096), (4, 8)):
            if bk > k:
                continue
            plan = plan_lowrank(1, k, [n], [1], sms, pdl=True, block_r=br, block_k=bk, num_warps=w)
            us = graph_time([(lambda v=v: launch(x, v, v, None, y, sc, plan, (1,))) for v in W]) * 1e6
            if best is None or us < best[0]:
                best = (us, br, bk, w, plan.split_k)
        rows.append({"shape": [n, k], "cublas_us": cublas, "triton_us": best[0], "block_r": best[1],
                     "block_k": best[2], "num_warps": best[3], "split_k": best[4]})
        gb = n * k * 2 / 1e3
        print(f"dense {n}x{k}: cuBLAS {cublas:.2f} us ({gb / cublas:.2f} TB/s)  triton GEMV {best[0]:.2f} us "
              f"({gb / best[0]:.2f} TB/s) br{best[1]} bk{best[2]} w{best[3]} sk{best[4]}", flush=True)
        del W
        torch.cuda.empty_cache()
    return rows


def m16_sweep(sms: int, budget: float) -> list[dict]:
    """M = 16 (the tensor-core path): each phase alone under forced tiles, against two cuBLAS products."""
    rows = []
    for n, k, r in [(4096, 4096, 512), (4096, 4096, 1024), (11008, 4096, 1024), (4096, 11008, 1024),
                    (14336, 4096, 512)]:
        copies = copies_for(r * (n + k) * 2)
        V, U = _weights(n, k, r, copies)
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(16, n, device="cuda", dtype=torch.bfloat16)
        sc = Scratch(x.device, r, [r], [n])
        two = graph_time([(lambda v=v, u=u: F.linear(F.linear(x, v), u)) for v, u in zip(V, U)]) * 1e6
        t0 = time.time()
        res = {"shape": [n, k, r], "two_linear_us": two, "p2": [], "p1": []}
        auto = plan_lowrank(16, k, [r], [n], sms, pdl=True)
        res["auto_p1_us"] = _time(x, V, U, y, sc, auto, (1,)) * 1e6
        res["auto_p2_us"] = _time(x, V, U, y, sc, auto, (2,)) * 1e6
        for bn, brk, w, st in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 4)):
            if time.time() - t0 > budget:
                break
            plan = plan_lowrank(16, k, [r], [n], sms, pdl=True, block_n=bn, block_rk=brk, num_warps=w, num_stages=st)
            res["p2"].append({"block_n": bn, "block_rk": brk, "num_warps": w, "num_stages": st,
                              "us": _time(x, V, U, y, sc, plan, (2,)) * 1e6})
        for br, bk, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8)):
            if time.time() - t0 > 2 * budget:
                break
            plan = plan_lowrank(16, k, [r], [n], sms, pdl=True, block_r=br, block_k=bk, num_warps=w)
            res["p1"].append({"block_r": br, "block_k": bk, "num_warps": w, "split_k": plan.split_k,
                              "us": _time(x, V, U, y, sc, plan, (1,)) * 1e6})
        b2 = min(res["p2"], key=lambda v: v["us"])
        b1 = min(res["p1"], key=lambda v: v["us"])
        print(f"M=16 {n}x{k} r{r}: 2xlinear {two:.2f}; auto p1 {res['auto_p1_us']:.2f} p2 {res['auto_p2_us']:.2f}; "
              f"best p1 {b1['us']:.2f} {b1} best p2 {b2['us']:.2f} {b2} ({len(res['p1'])}+{len(res['p2'])} plans)",
              flush=True)
        rows.append(res)
        del V, U
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, default=25.0, help="seconds per shape")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--m16", action="store_true", help="only the M = 16 tile sweep")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dispatch.set_enabled(True)
    if args.m16:
        out = {"m16": m16_sweep(sms, args.budget_s)}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
        return 0
    out = {"points": [], "dense": []}
    for n, k, r in SHAPES:
        rows = sweep_shape(n, k, r, sms, args.budget_s)
        out["points"] += rows
        auto = rows[0]
        p2 = min((x for x in rows if "p2_us" in x and x["variant"] != "auto"), key=lambda x: x["p2_us"])
        p1 = min((x for x in rows if "p1_us" in x and x["variant"] != "auto"), key=lambda x: x["p1_us"])
        print(f"{n}x{k} r{r}: auto p1 {auto['p1_us']:.2f} ({auto['p1_tbs']:.2f} TB/s) p2 {auto['p2_us']:.2f} "
              f"({auto['p2_tbs']:.2f}) both {auto['both_us']:.2f} | best p2 {p2['p2_us']:.2f} ({p2['p2_tbs']:.2f}) "
              f"{p2['variant']} | best p1 {p1['p1_us']:.2f} ({p1['p1_tbs']:.2f}) {p1['variant']}", flush=True)
    if not args.no_dense:
        out["dense"] = dense_points(sms)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
