"""Time and check the SVD routes available for whitened Llama-2-7B-shaped matrices on one GPU.

The matrix is the one ``whiten`` factorises: ``A = W L`` with ``W`` a random (m×n) weight (std 0.02,
rounded through bfloat16) and ``L`` the Cholesky factor of the Gram matrix of synthetic activations whose
channel scales are log-normal with a few large outlier channels (as in real LLM activations). Each route
computes the top-k triplets, ``k = floor(0.8·mn/(m+n))`` (keep 0.8), and is compared with a float64 SVD:

* ``sv_err``: max over the top k of |σ_i − σ_i(ref)| / σ_1(ref);
* ``sv_rel``: max over the top k of |σ_i − σ_i(ref)| / σ_i(ref);
* ``recon``: ‖A − U_k S_k V_kᵀ‖_F divided by the Eckart–Young optimum sqrt(Σ_{i>k} σ_i(ref)²) (1.0 = optimal);
* ``orth``: max(‖U_kᵀU_k − I‖_max, ‖V_kᵀV_k − I‖_max).

Usage: ``python benchmarks/svd_gpu_solvers.py --json out.json`` (needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from rankcut.linalg import _gram_eigh_svd, randomized_svd, truncated_svd


def whitened_matrix(m: int, n: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(m, n, generator=gen, device=device) * 0.02).to(torch.bfloat16).to(torch.float64)
    tokens = max(2 * n, 16384)
    scale = torch.exp(torch.randn(n, generator=gen, device=device, dtype=torch.float64))
    scale[torch.randperm(n, generator=gen, device=device)[: max(1, n // 512)]] *= 20.0
    G = torch.zeros(n, n, dtype=torch.float64, device=device)
    for start in range(0, tokens, 8192):
        X = torch.randn(min(8192, tokens - start), n, generator=gen, device=device, dtype=torch.float64) * scale
        G += X.mT @ X
    L = torch.linalg.cholesky(G)
    return (W @ L).to(torch.float32)


def _sync_time(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def routes():
    def driver(name):
        def run(A, k):
            U, S, Vh = torch.linalg.svd(A, full_matrices=False, driver=name)
            return U[:, :k], S[:k], Vh[:k]

        return run

    return {
        "rankcut truncated_svd (exact)": truncated_svd,
        "torch default driver": driver(None),
        "driver=gesvd": driver("gesvd"),
        "driver=gesvdj": driver("gesvdj"),
        "driver=gesvda": driver("gesvda"),
        "gram eigh float64 (rankcut)": _gram_eigh_svd,
        "cpu LAPACK float32": lambda A, k: [t.to(A.device) for t in truncated_svd(A.cpu(), k)],
        "randomized (q=2, p=16)": lambda A, k: randomized_svd(A, k),
    }


def check(A, k, U, S, Vh, S_ref, tail_ref):
    U, S, Vh = U[:, :k].to(torch.float64), S[:k].to(torch.float64), Vh[:k].to(torch.float64)
    A64 = A.to(torch.float64)
    recon = float(torch.linalg.matrix_norm(A64 - (U * S) @ Vh)) / tail_ref
    eye = torch.eye(k, dtype=torch.float64, device=A.device)
    orth = max(float((U.mT @ U - eye).abs().max()), float((Vh @ Vh.mT - eye).abs().max()))
    diff = (S - S_ref[:k]).abs()
    return {
        "sv_err": float(diff.max() / S_ref[0]),
        "sv_rel": float((diff / S_ref[:k]).max()),
        "recon": recon,
        "orth": orth,
        "finite": bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--skip", default="", help="comma-separated route names to skip")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.linalg.svd(torch.randn(64, 64, device=device))  # create the cuSOLVER handle outside the timings
    torch.linalg.eigh(torch.randn(64, 64, device=device, dtype=torch.float64))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = []
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        k = max(1, math.floor(args.keep * m * n / (m + n)))
        A = whitened_matrix(m, n, seed=m + n, device=device)
        (_, S_ref, _), t_ref = _sync_time(lambda: torch.linalg.svd(A.to(torch.float64), full_matrices=False))
        tail_ref = float(S_ref[k:].pow(2).sum().sqrt())
        print(f"{m}x{n} k={k}: float64 reference SVD {t_ref:.2f}s; sigma_1 {float(S_ref[0]):.4g}, "
              f"sigma_k {float(S_ref[k - 1]):.4g}, sigma_min {float(S_ref[-1]):.4g}", flush=True)
        results.append({"shape": [m, n], "k": k, "route": "float64 reference (torch default driver)", "seconds": t_ref})
        for name, fn in routes().items():
            if name in skip:
                continue
            try:
                (U, S, Vh), secs = _sync_time(lambda: fn(A, k))
                row = {"shape": [m, n], "k": k, "route": name, "seconds": secs, **check(A, k, U, S, Vh, S_ref, tail_ref)}
                del U, S, Vh
            except Exception as err:  # a driver may refuse a shape; record it and go on
                row = {"shape": [m, n], "k": k, "route": name, "error": f"{type(err).__name__}: {err}"[:300]}
            results.append(row)
            if "error" in row:
                print(f"  {name:<32} ERROR {row['error']}", flush=True)
            else:
                print(f"  {name:<32} {row['seconds']:8.3f}s  sv_err {row['sv_err']:.2e}  sv_rel {row['sv_rel']:.2e}  "
                      f"recon/opt {row['recon']:.7f}  orth {row['orth']:.1e}", flush=True)
        del A
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
