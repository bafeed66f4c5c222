"""Phase 2 of a gate/up low-rank group alone: the ordinary phase 2 (writes [gate | up]) + the SiLU·up kernel
against the GLU phase 2 (rankcut.kernels.glu) at several tile heights; registers and spills of each compile.

    python benchmarks/glu_bench.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from rankcut.kernels import glu, glue
from rankcut.kernels.dispatch import get_plan
from rankcut.kernels.lowrank import Scratch, _p2_gemv, launch, launch_args
from rankcut.kernels.plan import with_overrides


def _regs(compiled) -> dict:
    """Registers per thread and spilled bytes of a compiled kernel (what a Triton launch returns)."""
    return {"regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    for I, K, r in [(11008, 4096, 1492), (14336, 4096, 1593), (11008, 4096, 512)]:
        V = torch.randn(2 * r, K, device=dev, dtype=dt) / 64
        U = torch.randn(2 * I * r, device=dev, dtype=dt) / 32
        x = torch.randn(1, K, device=dev, dtype=dt)
        scratch = Scratch(dev, 2 * r, [r, r], [I, I])
        plan = get_plan(1, K, [r, r], [I, I], dev)
        y2 = torch.empty(1, 2 * I, device=dev, dtype=dt)
        y1 = torch.empty(1, I, device=dev, dtype=dt)
        launch(x, V, U, None, y2, scratch, plan, phases=(1,))
        t_p2 = triton.testing.do_bench(lambda: launch(x, V, U, None, y2, scratch, plan, phases=(2,)), rep=200)
        seg, _, _ = launch_args(scratch, plan)
        p2 = _p2_gemv[(plan.tiles2,)](U, y2, y2, scratch.t, scratch.sync, 2 * r, plan.tiles2, *seg, BN=plan.block_n,
                                      BRK=plan.block_rk, HAS_BIAS=False, SPLIT=plan.split, SINGLE=plan.block_rk >= r,
                                      PDL=plan.pdl, num_warps=plan.num_warps, num_stages=plan.num_stages,
                                      launch_pdl=plan.pdl)
        t_silu = triton.testing.do_bench(lambda: glue.silu_mul(y2), rep=200)
        row = {"I": I, "K": K, "rank": r, "plan_block_n": plan.block_n, "block_rk": plan.block_rk,
               "p2_us": t_p2 * 1e3, "p2_regs": _regs(p2), "silu_us": t_silu * 1e3, "glu": {}}
        for bn_plan in (2, 4, 8, 16):
            p = with_overrides(plan, block_n=bn_plan)
            for warps in (4, 8):
                q = with_overrides(p, num_warps=warps)

                def run():
                    # phase 2 only: the GLU launch without its phase 1 (t already in the scratch)
                    bn = glu.glu_block_n(q)
                    grid = triton.cdiv(I, bn)
                    return glu._p2_glu[(grid,)](U, y1, y1, scratch.t, scratch.sync, 2 * r, grid, I, r, r, BN=bn,
                                         BRK=q.block_rk, HAS_BIAS=False, SPLIT=q.split, PDL=q.pdl, SINGLE=True,
                                         NCG=1, NCU=1, num_warps=q.num_warps, num_stages=1, launch_pdl=q.pdl)

                compiled = run()
                ms = triton.testing.do_bench(run, rep=200)
                row["glu"][f"bn{glu.glu_block_n(q)}_w{warps}"] = {"us": ms * 1e3, **_regs(compiled)}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
