"""Data-parallel compression of a Llama-2-7B-shaped model: N GPUs against one (issue 17).

The benchmark of BENCHMARKS.md "Compressing a Llama-2-7B-shaped model on one H200" (random bf16 weights held on
the CPU, ``whiten`` keep 0.8, 256 × 2048 random-token windows, batch 8, layer by layer), run with each process
count of ``--gpus`` (default 1,2,4,8): N processes of one ``torch.distributed`` world (NCCL; gloo with
``--device cpu``), started by :func:`rankcut.distributed.launch` (NVLink multicast off), each building the same
model (same seed), calibrating on its 1/N of the windows, decomposing 1/N of the units, and ending with the same
compressed model. One process (N = 1) runs without a world: the baseline.

Per N it reports the wall time of ``compress_`` (between two barriers), the library's stage times of rank 0 and
their maximum over the ranks (capture, statistics — which includes the float64 all-reduce of the Gram matrices
—, decomposition, broadcast of the factors, total), the speedup against N = 1, peak GPU memory and host peak RSS
per rank, and checks that the result is that of N = 1: the same ranks, and every target's ‖UV‖_F (a fingerprint
that does not depend on the factors' gauge) within summation-order tolerance.

Every process holds the whole model on the host: N × 12.55 GiB of host memory for N GPUs.

Examples::

    # the measurement (a machine with 8 H200s)
    PYTHONPATH=$PWD python benchmarks/gpu_dp_7b.py --gpus 1,2,4,8 --json benchmarks/results/gpu_dp_7b.json
    # the same code, small, on a CPU (gloo): the check that it runs
    PYTHONPATH=$PWD python benchmarks/gpu_dp_7b.py --device cpu --gpus 1,2 --layers 2 --hidden 64 \\
        --intermediate 128 --heads 4 --vocab 512 --samples 16 --seq-len 32 --batch-size 4 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GiB = 2**30
STAGES = ("capture", "statistics", "decomposition", "broadcast", "plan", "total")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4,8", help="process counts to measure, comma-separated (1 is the baseline)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--method", default="whiten")
    p.add_argument("--solver", default="exact")
    p.add_argument("--allocation", default=None, help="allocation policy (default: uniform keep)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one process; its result file
    return p.parse_args()


# --------------------------------------------------------------------------------------------- one process


def build_model(args, device):
    """The Llama model on the CPU: matrices ~ N(0, 0.02²) drawn on ``device`` (the same in every process: the
    same seed), norms 1, buffers as constructed."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(4096, args.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=False,
        use_cache=False)
    dtype = getattr(torch, args.dtype)
    with init_empty_weights(include_buffers=False):
        model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if param.ndim == 1:
                    value = torch.ones(param.shape, dtype=dtype)
                else:
                    value = torch.empty(param.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen).cpu()
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model.eval()


def fingerprint(model) -> dict[str, list]:
    """Per decomposed target: ``[rank, ‖UV‖_F]`` (float64; ‖UV‖² = tr(UᵀU · VVᵀ), independent of the factors'
    gauge)."""
    import torch

    from rankcut.modules import rankcut_modules

    out = {}
    for name, layer in rankcut_modules(model).items():
        U = getattr(getattr(layer, "U", None), "weight", None)
        V = getattr(getattr(layer, "V", None), "weight", None)
        if U is None or V is None:
            continue
        U, V = U.detach().double(), V.detach().double()
        out[name] = [int(U.shape[1]), float(torch.trace((U.mT @ U) @ (V @ V.mT)).clamp_min(0).sqrt())]
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import rankcut
    from rankcut.distributed import current, init_from_env

    device = torch.device(args.device)
    world, device = init_from_env(device)  # a world of N > 1 (launch's environment), or None
    rank = 0 if world is None else world.rank
    start = time.perf_counter()
    model = build_model(args, device)
    build_s = time.perf_counter() - start
    tokens = torch.randint(0, args.vocab, (args.samples, args.seq_len),
                           generator=torch.Generator().manual_seed(args.seed))
    config = rankcut.CompressConfig(method=args.method, keep=args.keep, calib_samples=args.samples,
                                    seq_len=args.seq_len,
                                    batch_size=args.batch_size, options={"solver": args.solver},
                                    allocation=args.allocation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if world is not None:
        world.barrier()
    wall = time.perf_counter()
    summary = rankcut.compress_(model, config, calib=tokens, device=device, progress=False)
    if world is not None:
        world.barrier()
    wall = time.perf_counter() - wall
    mine = {"rank": rank, "build_seconds": build_s, "wall_seconds": wall, "stage_seconds": dict(summary.times),
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    ranks = [mine]
    if world is not None:
        ranks = [None] * world.size
        dist.all_gather_object(ranks, mine)
    if rank == 0:
        result = {"processes": 1 if world is None else world.size,
                  "backend": None if world is None else world.backend,
                  "wall_seconds": max(r["wall_seconds"] for r in ranks),
                  "stage_seconds_rank0": dict(summary.times),
                  "stage_seconds_max": {k: max(r["stage_seconds"].get(k, 0.0) for r in ranks)
                                        for k in sorted({k for r in ranks for k in r["stage_seconds"]})},
                  "per_rank": ranks, "keep_targets": summary.keep_targets, "keep_model": summary.keep_model,
                  "dense_targets": len(summary.dense_targets), "targets": len(summary.rows),
                  "fingerprint": fingerprint(model)}
        with open(args.worker, "w") as fh:
            json.dump(result, fh)
    if current() is not None:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the driver


def environment(args) -> dict:
    import platform

    import torch
    import transformers

    import rankcut

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "rankcut": rankcut.__version__, "cpu_count": os.cpu_count()}
    if args.device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpus=torch.cuda.device_count(),
                   cuda=torch.version.cuda)
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
    return env


def compare(base: dict, other: dict) -> dict:
    """Ranks equal, and the largest relative difference of ‖UV‖_F over the targets."""
    a, b = base["fingerprint"], other["fingerprint"]
    same = a.keys() == b.keys() and all(a[k][0] == b[k][0] for k in a)
    diff = max((abs(a[k][1] - b[k][1]) / max(abs(a[k][1]), 1e-30) for k in a if k in b), default=0.0)
    return {"same_ranks": same, "max_rel_diff_norm_UV": diff}


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    import torch

    from rankcut.distributed import NO_MULTICAST, launch

    counts = [int(x) for x in args.gpus.split(",")]
    if args.device == "cpu":  # one thread per process unless told otherwise (the same for every N)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("CUDA is not available (pass --device cpu for the small gloo check)")
        if max(counts) > torch.cuda.device_count():
            sys.exit(f"--gpus {args.gpus}: this host has {torch.cuda.device_count()} GPU(s)")
    passthrough = sys.argv[1:]
    drop = {"--gpus", "--json"}
    forwarded, skip = [], False
    for a in passthrough:  # every option but --gpus and --json goes to the workers as given
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop:
            skip = "=" not in a
            continue
        forwarded.append(a)
    results = {"command": " ".join(["python", *sys.argv]), "environment": environment(args),
               "model": {"shape": f"Llama (hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
                                  f"vocab {args.vocab}), {args.layers} layers", "dtype": args.dtype,
                         "weights": "random normal(0, 0.02), norms 1", "starts_on": "cpu (every process)"},
               "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                               "kind": f"uniform random token ids, seed {args.seed}"},
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = os.path.join(tmp, f"n{n}.json")
            command = [sys.executable, os.path.abspath(__file__), *forwarded, "--worker", out]
            print(f"--- {n} process(es) ...", flush=True)
            if n == 1:
                subprocess.run(command, check=True, env={**os.environ, **NO_MULTICAST})
            else:
                launch(n, command, cpu=args.device == "cpu")
            with open(out) as fh:
                results["runs"].append(json.load(fh))
    base = next((r for r in results["runs"] if r["processes"] == 1), results["runs"][0])
    print(f"\n{'N':>3} {'wall s':>8} {'speedup':>7} " + " ".join(f"{s:>13}" for s in STAGES)
          + f" {'peak GPU GiB':>12} {'host RSS GiB':>12}  same as N=1")
    for run in results["runs"]:
        run["vs_one_process"] = compare(base, run)
        run["speedup"] = base["wall_seconds"] / run["wall_seconds"]
        stages = run["stage_seconds_max"]
        peak = [r["peak_gpu_allocated_bytes"] for r in run["per_rank"] if r["peak_gpu_allocated_bytes"] is not None]
        rss = max(r["host_peak_rss_bytes"] for r in run["per_rank"])
        check = run["vs_one_process"]
        print(f"{run['processes']:>3} {run['wall_seconds']:8.2f} {run['speedup']:7.2f} "
              + " ".join(f"{stages.get(s, 0.0):13.2f}" for s in STAGES)
              + f" {max(peak) / GiB if peak else float('nan'):12.2f} {rss / GiB:12.2f}  ranks "
              f"{'equal' if check['same_ranks'] else 'DIFFER'}, "
              f"max rel diff ||UV|| {check['max_rel_diff_norm_UV']:.1e}")
    print("(stage seconds: the maximum over the processes; statistics include the all-reduce; the sum of stages is "
          "not the wall time)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
