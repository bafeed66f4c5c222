"""Issue 12, item 4: batch-1 decode of layers that share a basis, against the same bytes unshared.

On the Llama-2-7B shape (random bf16 weights), every target gets the rank of uniform keep ``--keep``. The
*unshared* model is :class:`~rankcut.modules.LowRankLinear` everywhere (each layer reads its own U); the *shared*
models are :class:`~rankcut.modules.SharedBasisLinear` with the output basis U tied across G consecutive layers
of each tensor type: a decode step reads exactly the same bytes (a shared U is read once per layer that uses it),
but a layer may find the U the previous layer of its group just read in L2 (60 MB on the H200). The bound is
the unshared bytes per token; the "unique" bytes (what the checkpoint holds) are printed beside it. Every model
runs the identical decode loop (``rankcut.bench.run.bench_model``, CUDA graphs, no q/k/v fusion for any row so
that the rows differ only in sharing), kernels on, then the unshared and G=all rows again with kernels off.

    PYTHONPATH=$PWD python3 benchmarks/shared_decode_bench.py --json OUT/decode_shared.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from rankcut.bench.models import preset_config, random_lowrank_, random_model, weight_bytes
from rankcut.bench.run import bench_model
from rankcut.bench.timing import copy_bandwidth
from rankcut.kernels import dispatch
from rankcut.modules import SharedBasisLinear, low_rank_modules


@torch.no_grad()
def share_(model, group: int) -> None:
    """Replace each LowRankLinear by a SharedBasisLinear of the same rank; tie U across ``group`` layers."""
    owners: dict[tuple[str, int], SharedBasisLinear] = {}
    for name, layer in list(low_rank_modules(model).items()):
        index, _, kind = name.split("layers.", 1)[1].partition(".")
        key = (kind, int(index) // group)
        new = SharedBasisLinear(layer.in_features, layer.out_features, layer.rank, bias=False,
                                device=layer.V.weight.device, dtype=layer.V.weight.dtype)
        new.V.weight.copy_(layer.V.weight)
        if key in owners:
            new.tie("U.weight", "owner", owners[key].U.weight)
        else:
            new.U.weight.copy_(layer.U.weight)
            owners[key] = new
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--groups", type=int, nargs="+", default=[2, 4, 32])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args()
    config = preset_config("llama2-7b", args.layers)
    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    out = {"command": " ".join(["python3", *sys.argv]), "keep": args.keep, "bandwidth_bytes_per_s": bandwidth,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "rows": []}

    def run(label: str, group: int | None, kernels: bool = True, dense: bool = False) -> None:
        model = random_model(config, torch.bfloat16, args.device)
        if not dense:
            random_lowrank_(model, args.keep)
            read = weight_bytes(model)  # the unshared bytes: what every variant reads per token
            if group:
                share_(model, group)
        else:
            read = weight_bytes(model)
        dispatch.set_enabled(kernels)
        try:
            res = bench_model(model, 1, 128, args.new_tokens, 3, fuse=False)
        finally:
            dispatch.set_enabled(True)
        row = {"label": label, "group": group, "kernels": kernels, "tokens_per_s": res["tokens_per_s"],
               "bytes_read_per_token": read, "unique_weight_bytes": weight_bytes(model),
               "kv_cache_bytes": res["kv_cache_bytes"]}
        if bandwidth:
            row["bound_tokens_per_s"] = bandwidth / (read + res["kv_cache_bytes"])
            row["fraction_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    run("dense", None, dense=True)
    run("low-rank, unshared", None)
    for g in args.groups:
        run(f"shared output basis, G={g}", g)
    run("low-rank, unshared (kernels off)", None, kernels=False)
    run(f"shared output basis, G={max(args.groups)} (kernels off)", max(args.groups), kernels=False)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
