"""Phase-level profile of the M = 1 kernels on one shape (time per launch alone, plan variants), for the
closing analysis in BENCHMARKS.md. Run it under Nsight Compute to read occupancy and DRAM throughput::

    PYTHONPATH=$PWD python benchmarks/profile_phases.py --json out.json
    ncu --clock-control none --kernel-name regex:'_p[12]_gemv|gemv' --launch-skip 40 --launch-count 6 \\
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers \\
        python benchmarks/profile_phases.py --ncu
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.nn import functional as F

from rankcut.bench.timing import copies_for, graph_time
from rankcut.kernels import dispatch
from rankcut.kernels.lowrank import launch

SHAPES = [(11008, 4096, 1501), (4096, 11008, 1501), (11008, 4096, 2388), (4096, 4096, 1638), (11008, 4096, 2985),
          (14336, 4096, 1024)]
VARIANTS = {"auto": {}, "single": {"single_tile": True}, "chunked": {"single_tile": False},
            "e8k": {"max_elems": 8192}}


class _Holder:
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--ncu", action="store_true", help="a few plain launches for Nsight Compute, no timing")
    args = ap.parse_args()
    out = []
    for m, n, r in SHAPES:
        copies = 4 if args.ncu else copies_for(r * (m + n) * 2)
        V = [torch.randn(r, n, device="cuda", dtype=torch.bfloat16) / math.sqrt(n) for _ in range(copies)]
        U = [torch.randn(m, r, device="cuda", dtype=torch.bfloat16) / math.sqrt(r) for _ in range(copies)]
        W = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, m, device="cuda", dtype=torch.bfloat16)
        holder = _Holder()
        for name, ov in VARIANTS.items():
            if args.ncu and name not in ("auto", "e8k"):
                continue
            with dispatch.plan_overrides(**ov):
                dispatch.run_kernel(x, V[0], U[0], None, [r], [m], holder)
                plan = dispatch.get_plan(1, n, [r], [m], x.device)
                sc = holder._rankcut_scratch
                if args.ncu:
                    for i in range(2):
                        launch(x, V[i % copies], U[i % copies], None, y, sc, plan)
                    F.linear(x, W)
                    torch.cuda.synchronize()
                    continue
                row = {"shape": [m, n, r], "variant": name, "plan": plan.__dict__}
                for ph in (1, 2):
                    row[f"p{ph}_s"] = graph_time([(lambda v=v, u=u: launch(x, v, u, None, y, sc, plan, (ph,)))
                                                  for v, u in zip(V, U)])
                row["both_s"] = graph_time([(lambda v=v, u=u: launch(x, v, u, None, y, sc, plan)) for v, u in zip(V, U)])
                out.append(row)
                print(f"{m}x{n} r={r} {name:5} p1 {row['p1_s'] * 1e6:6.2f} ({r * n * 2 / row['p1_s'] / 1e12:.2f} TB/s) "
                      f"p2 {row['p2_s'] * 1e6:6.2f} ({r * m * 2 / row['p2_s'] / 1e12:.2f} TB/s) both {row['both_s'] * 1e6:6.2f} "
                      f"br{plan.block_r} bk{plan.block_k} bn{plan.block_n} brk{plan.block_rk} w{plan.num_warps}", flush=True)
        del V, U, W
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
