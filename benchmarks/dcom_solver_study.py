"""Issue 13, item 2 (seed 001's Figure 2 made real): time and error of SVD solvers on activation-shaped
matrices, against rank, on one GPU.

Inputs: X (S × 4096) with S in ``--seqs``, synthetic activation-like spectra (singular values i^-0.8 times a
random orthogonal pair, plus 2 % of channels scaled ×20 as outlier channels), given in bf16 and decomposed in
fp32 (``--dtype``). Solvers: the exact SVD through each CUDA driver PyTorch exposes (``gesvd``, ``gesvdj``,
``gesvda``; rank-independent: one full SVD, truncated), ``torch.svd_lowrank`` (randomized, 2 power
iterations), rankcut's randomized SVD (oversample 16, 2 power iterations) and rankcut's Lanczos (full and
selective reorthogonalisation), each on one prompt and batched over 8 prompts. Error: ‖X − X_k‖_F divided
by the optimum ‖X − X_k*‖_F of the exact truncated SVD (1.0 = optimal). Time: median of 3 after a warm-up,
CUDA-synchronised wall time.

    PYTHONPATH=$PWD python3 benchmarks/dcom_solver_study.py --json OUT/dcom_solver_study.json --png OUT/dcom_solvers.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rankcut.lanczos import lanczos_svd
from rankcut.linalg import randomized_svd


def synthetic(S: int, H: int, batch: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(batch):
        k = min(S, H)
        U, _ = torch.linalg.qr(torch.randn(S, k, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(H, k, generator=gen))
        s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
        X = (U * s) @ V.T
        X[:, torch.randperm(H, generator=gen)[: H // 50]] *= 20
        out.append(X)
    return torch.stack(out).to(device=device, dtype=torch.bfloat16)


def timed(fn, repeats: int = 3):
    fn()
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=240, help="stop adding points after this many seconds")
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args()
    began = time.perf_counter()
    rows = []
    for S in args.seqs:
        X8 = synthetic(S, args.hidden, 8, S, "cuda").float()
        X = X8[:1]
        norms = torch.linalg.svdvals(X[0].double()).pow(2).flip(0).cumsum(0).flip(0)  # tail energies
        def err(U, Sv, Vh, k, A=X[0]):
            opt = float(norms[k].sqrt()) if k < norms.numel() else 0.0
            got = float(torch.linalg.matrix_norm(A - (U[..., :k] * Sv[..., :k]) @ Vh[..., :k, :]))
            return got / opt if opt > 0 else float("nan")
        for driver in ("gesvd", "gesvdj", "gesvda"):
            if time.perf_counter() - began > args.budget_s:
                break
            try:
                t, (U, Sv, Vh) = timed(lambda: torch.linalg.svd(X[0], full_matrices=False, driver=driver))
            except RuntimeError as e:
                rows.append({"S": S, "solver": f"exact ({driver})", "error": str(e)[:200]})
                continue
            for k in args.ranks:
                rows.append({"S": S, "rank": k, "solver": f"exact ({driver})", "batch": 1, "seconds": t,
                             "error_ratio": err(U, Sv, Vh, k)})
        for k in args.ranks:
            if time.perf_counter() - began > args.budget_s:
                break
            cands = {
                "torch.svd_lowrank": lambda: torch.svd_lowrank(X[0], q=min(k + 16, S), niter=2),
                "randomized (rankcut)": lambda: randomized_svd(X[0], k),
                "lanczos full": lambda: lanczos_svd(X[0], k, reorth="full"),
                "lanczos selective": lambda: lanczos_svd(X[0], k, reorth="selective"),
            }
            for name, fn in cands.items():
                t, out = timed(fn)
                U, Sv, V = out
                Vh = V.mT if name == "torch.svd_lowrank" else V
                rows.append({"S": S, "rank": k, "solver": name, "batch": 1, "seconds": t, "error_ratio": err(U, Sv, Vh, k)})
            t, _ = timed(lambda: lanczos_svd(X8, k, reorth="full"))
            rows.append({"S": S, "rank": k, "solver": "lanczos full", "batch": 8, "seconds": t})
            t, _ = timed(lambda: torch.stack([torch.linalg.svd(x, full_matrices=False, driver="gesvdj")[1] for x in X8]), 1)
            rows.append({"S": S, "rank": k, "solver": "exact (gesvdj)", "batch": 8, "seconds": t})
            print(S, k, [(r["solver"], round(r["seconds"] * 1e3, 2), round(r.get("error_ratio", 0) or 0, 4))
                         for r in rows if r["S"] == S and r.get("rank") == k], flush=True)
    out = {"command": " ".join(["python3", *sys.argv]), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "hidden": args.hidden, "rows": rows, "wall_s": time.perf_counter() - began}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seqs = sorted({r["S"] for r in rows})
        fig, axes = plt.subplots(2, len(seqs), figsize=(4 * len(seqs), 7), squeeze=False)
        for j, S in enumerate(seqs):
            for name in sorted({r["solver"] for r in rows if r["S"] == S and r.get("batch") == 1}):
                pts = sorted((r["rank"], r["seconds"], r.get("error_ratio")) for r in rows
                             if r["S"] == S and r["solver"] == name and r.get("batch") == 1 and "seconds" in r)
                if not pts:
                    continue
                axes[0][j].plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=name)
                axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
            axes[0][j].set(title=f"S = {S}, H = {args.hidden}", xscale="log", yscale="log", ylabel="ms (one prompt)")
            axes[1][j].set(xscale="log", xlabel="rank", ylabel="error / optimum", ylim=(0.99, 1.2))
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"SVD solvers on activation-shaped inputs ({torch.cuda.get_device_name()}, fp32)")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
