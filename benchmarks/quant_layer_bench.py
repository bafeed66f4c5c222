"""Issue 14: one projection of quantised factors through the Triton kernels against the same bf16 factors and the
dense cuBLAS GEMV (H200, bf16 activations, M = 1 and M = 16): µs per call (CUDA graph of 50 calls, median of 5)
and the bytes each reads.

    python3 benchmarks/quant_layer_bench.py --json results/quant_layer_bench.json [--elems 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from rankcut.kernels import dispatch
from rankcut.modules import LowRankLinear, QuantLowRankLinear

SHAPES = [(4096, 4096, 1638), (11008, 4096, 2312), (4096, 11008, 2312), (4096, 4096, 1024)]


def timed(fn, calls: int = 50, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--elems", type=int, nargs="+", default=[8192])
    p.add_argument("--magic", type=int, nargs="+", default=[1])
    p.add_argument("--warps", type=int, nargs="+", default=[4])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "rows": []}
    torch.manual_seed(0)
    for n_out, n_in, rank in SHAPES:
        dense = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        low = LowRankLinear(n_in, n_out, rank, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for w in (low.V.weight, low.U.weight):
                w.normal_(0, w.shape[1] ** -0.5)
        for m in args.rows:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                base = {"dense bf16": (lambda: dense(x), n_in * n_out * 2),
                        "lowrank bf16": (lambda: dispatch.lowrank_forward(low, x, force=True), rank * (n_in + n_out) * 2)}
                for name, (fn, nbytes) in base.items():
                    us = timed(fn)
                    row = {"shape": [n_out, n_in, rank], "m": m, "variant": name, "us": us, "bytes": nbytes,
                           "gbps": nbytes / us / 1e3}
                    out["rows"].append(row)
                    print(row, flush=True)
                for fmt in ("int8", "fp8", "int4"):
                    q = QuantLowRankLinear.from_lowrank(low.float(), fmt, 128, compensate=False).to("cuda", torch.bfloat16)
                    low.to(torch.bfloat16)
                    for elems in args.elems:
                      for warps in args.warps:
                        for magic in (args.magic if fmt == "int8" else [1]):
                            from rankcut.kernels import lowrank_quant

                            dispatch._PLANS.clear()
                            old = dispatch.QUANT_ELEMS
                            dispatch.QUANT_ELEMS, lowrank_quant.MAGIC_INT8 = elems, bool(magic)
                            dispatch.QUANT_WARPS = warps
                            try:
                                us = timed(lambda: dispatch.run_quant_kernel(x, q.V.codes, q.V.scale, q.U.codes,
                                                                             q.U.scale, None, [q.rank], [n_out],
                                                                             q.group, q))
                            finally:
                                dispatch.QUANT_ELEMS, lowrank_quant.MAGIC_INT8 = old, True
                                dispatch.QUANT_WARPS = None
                                dispatch._PLANS.clear()
                            nbytes = q.nbytes()
                            row = {"shape": [n_out, n_in, rank], "m": m, "variant": f"{fmt} elems={elems} warps={warps} magic={magic}",
                                   "elems": elems, "warps": warps, "format": fmt,
                                   "us": us, "bytes": nbytes, "gbps": nbytes / us / 1e3}
                            out["rows"].append(row)
                            print(row, flush=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
