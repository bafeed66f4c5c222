"""rankcut's HOOI against tensorly's ``tucker`` (PyTorch backend) on the same stacked tensor: time and squared
error. Issue 12 asks to measure before choosing.

    python3 benchmarks/hooi_vs_tensorly.py --device cpu
"""

import argparse
import json
import sys
import time

import tensorly as tl
import torch
from tensorly.decomposition import tucker

from rankcut.linalg import hooi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", type=int, nargs=3, default=[6, 1024, 384])
    p.add_argument("--ranks", type=int, nargs=2, default=[128, 128])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    G, m, n = args.shape
    # slices with a shared decaying spectrum, like stacked projections
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    T = torch.stack([base + 0.5 * torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(G)]).to(args.device)
    r1, r2 = args.ranks
    start = time.perf_counter()
    _, _, _, info = hooi(list(T), r1, r2, tol=0.0, max_iter=args.iters)
    ours = time.perf_counter() - start
    tl.set_backend("pytorch")
    start = time.perf_counter()
    core, factors = tucker(T, rank=[G, r1, r2], n_iter_max=args.iters, tol=0.0, init="svd")
    theirs = time.perf_counter() - start
    err = float(((T - tl.tucker_to_tensor((core, factors))) ** 2).sum())
    out = {"command": " ".join(["python3", *sys.argv]), "shape": args.shape, "ranks": args.ranks, "iterations": args.iters,
           "rankcut_s": ours, "tensorly_s": theirs, "rankcut_error": info["total"] - info["energy"],
           "tensorly_error": err, "torch": torch.__version__, "tensorly": tl.__version__}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
