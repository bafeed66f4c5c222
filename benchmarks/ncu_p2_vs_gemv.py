"""Nsight Compute comparison of phase 2 (U of 11008 × 1024) and the dense GEMV over the same bytes (5504 × 4096):
why phase 2 streams slower at equal bytes (issue #15). No timing here; run it under ncu::

    ncu --clock-control none --kernel-name regex:'_p2_gemv|_dense_gemv' --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        python benchmarks/ncu_p2_vs_gemv.py
"""
import math, torch
from rankcut.kernels import dispatch
from rankcut.kernels.lowrank import Scratch, launch
from rankcut.kernels.plan import plan_lowrank
from rankcut.kernels.gemv import dense_gemv
from rankcut.kernels.plan import plan_dense
n, k, r = 11008, 4096, 1024
V = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
U = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
sc = Scratch(x.device, r, [r], [n])
plan = plan_lowrank(1, k, [r], [n], 132, pdl=False)
W = torch.randn(n * r // 4096, 4096, device="cuda", dtype=torch.bfloat16)   # the same bytes as U
y2 = torch.empty(1, W.shape[0], device="cuda", dtype=torch.bfloat16)
dp = plan_dense(*W.shape, pdl=False)
for i in range(3):
    launch(x, V, U, None, y, sc, plan)
    dense_gemv(x, W, None, y2, dp)
torch.cuda.synchronize()
