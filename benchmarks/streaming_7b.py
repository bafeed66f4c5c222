"""Streaming vs in-memory compression of a Llama-2-7B-shaped model: peak host RSS and wall time of each.

1. Writes a Llama-2-7B-shaped model with random weights (``--dtype``, default bf16: matrices ~ N(0, 0.02²),
   norms 1) to ``WORKDIR/source`` as sharded safetensors with an index, one tensor at a time (the writer never
   holds more than one shard), unless a source of the same shape is already there.
2. Runs each mode in a fresh child process (so that each peak RSS is its own, read from ``VmHWM``):
   - ``streaming``: ``rankcut.compress_streaming(source, WORKDIR/streaming, ...)`` (one block in memory);
   - ``memory``: ``from_pretrained`` + ``rankcut.compress_`` + ``rankcut.save`` into ``WORKDIR/memory`` (the
     whole model in host memory, one block at a time on the device).
   Both calibrate on the same random token windows (``--calib-samples`` x ``--seq-len``, seeded).
3. With ``--check``, compares the two checkpoints tensor by tensor (bit-identical expected).

Prints a table and writes ``--json``. Compute dtype is rankcut's ``auto`` (float32 on a CPU, the stored dtype on a
GPU); the checkpoints store the source's dtype. Small runs on a CPU: ``--layers 2 --hidden 256 --intermediate 688
--heads 4 --vocab 1000``.

Example (H200)::

    PYTHONPATH=$PWD python benchmarks/streaming_7b.py --workdir /tmp/s7b --layers 32 --calib-samples 128 \\
        --seq-len 2048 --check --json benchmarks/results/streaming_7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def peak_rss() -> int:
    """This process's peak resident set size (``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_config(args):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(4096, args.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=False,
        use_cache=False, dtype=args.dtype, architectures=["LlamaForCausalLM"],
    )


def write_source(path: Path, args) -> dict:
    """The random model as sharded safetensors (shards of at most ``--shard-mb``), its index and config."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    import transformers

    config = model_config(args)
    marker = path / "shape.json"
    shape = {**config.to_diff_dict(), "seed": args.seed}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(shape, default=str)):
        return {"written": False, "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    start = time.perf_counter()
    with init_empty_weights(include_buffers=False):
        skeleton = transformers.LlamaForCausalLM(config)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    limit = args.shard_mb << 20
    plan, size = [[]], 0  # the shards' tensor names, planned from the shapes (the file names hold the count)
    for name, param in skeleton.named_parameters():
        nbytes = param.numel() * itemsize
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append((name, param.shape))
        size += nbytes
    gen = torch.Generator().manual_seed(args.seed)
    weight_map, total = {}, 0
    for i, names in enumerate(plan, 1):  # one shard in memory at a time
        file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, shape_ in names:
            if len(shape_) == 1:
                shard[name] = torch.ones(shape_, dtype=dtype)
            else:
                shard[name] = torch.empty(shape_, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)
            weight_map[name] = file
            total += shard[name].numel() * itemsize
        save_file(shard, str(path / file), metadata={"format": "pt"})
        del shard
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(path)
    marker.write_text(json.dumps(shape, default=str))
    return {"written": True, "seconds": round(time.perf_counter() - start, 1), "bytes": total}


def child(args) -> None:
    """One mode in this (fresh) process; prints one JSON line."""
    import torch

    import rankcut

    torch.manual_seed(0)
    windows = torch.randint(0, args.vocab, (args.calib_samples, args.seq_len),
                            generator=torch.Generator().manual_seed(args.seed + 1))
    options = {"solver": args.solver} if args.solver else {}
    alloc = {"rank": args.rank} if args.rank else {"keep": args.keep}
    config = rankcut.CompressConfig(method=args.method, options=options, calib_samples=args.calib_samples,
                                    seq_len=args.seq_len, batch_size=args.batch_size, **alloc)
    device = rankcut.utils.resolve_device(args.device)
    source, out = Path(args.workdir) / "source", Path(args.workdir) / args.child
    start = time.perf_counter()
    times = {}
    if args.child == "streaming":
        summary = rankcut.compress_streaming(source, out, config, calib=windows, device=device, overwrite=True,
                                             resume=False, progress=False)
    else:
        import transformers

        dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.dtype)
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        times["load"] = time.perf_counter() - t0
        summary = rankcut.compress_(model, config, calib=windows, device=device, progress=False)
        t0 = time.perf_counter()
        rankcut.save(model, out, overwrite=True, dtype=getattr(torch, args.dtype))
        times["save"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: steadier than wall time on a shared machine
    result = {"mode": args.child, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "peak_rss_bytes": peak_rss(),
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
              "stage_times": {k: round(v, 2) for k, v in {**summary.times, **times}.items()},
              "keep_targets": summary.keep_targets, "device": str(device)}
    print("RESULT " + json.dumps(result), flush=True)


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two checkpoints, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    def index(path):
        data = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"] \
            if (path / "model.safetensors.index.json").is_file() else None
        if data is None:
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                data = {k: "model.safetensors" for k in f.keys()}
        return data

    ia, ib = index(a), index(b)
    differ = [k for k in ia if k not in ib] + [k for k in ib if k not in ia]
    for name in ia:
        if name not in ib:
            continue
        with safe_open(str(a / ia[name]), "pt") as fa, safe_open(str(b / ib[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            differ.append(name)
    ra, rb = (json.loads((p / "rankcut.json").read_text()) for p in (a, b))
    return {"tensors": len(ia), "bit_identical": not differ, "differing_tensors": differ[:5],
            "same_record_targets": ra["targets"] == rb["targets"] and ra["dense"] == rb["dense"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/rankcut_streaming_7b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-mb", type=int, default=2048, help="source shard size in MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="whiten")
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--solver", default=None)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default="streaming,memory")
    p.add_argument("--repeat", type=int, default=1, help="run each mode this many times (alternating)")
    p.add_argument("--check", action="store_true", help="compare the two checkpoints tensor by tensor")
    p.add_argument("--keep-outputs", action="store_true", help="leave the checkpoints in the workdir")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    workdir = Path(args.workdir)
    source = write_source(workdir / "source", args)
    print(f"source: {workdir / 'source'} ({source['bytes'] / GiB:.2f} GiB; "
          f"{'written in ' + str(source['seconds']) + ' s' if source['written'] else 'reused'})", flush=True)
    results = []
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--check"]
    modes = args.modes.split(",")
    for rep in range(args.repeat):  # alternating, so that a busy moment of a shared machine hits both modes
        for mode in modes:
            cmd = [sys.executable, __file__, *forwarded, "--child", mode]
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
                raise SystemExit(f"{mode} failed (exit {run.returncode})")
            results.append(json.loads(lines[-1][len("RESULT "):]))
            r = results[-1]
            print(f"{mode:<10} wall {r['wall_s']:8.1f} s   CPU {r['cpu_s']:8.1f} s   peak host RSS {r['peak_rss_bytes'] / GiB:7.3f} GiB "
                  f"({r['peak_rss_bytes'] >> 20} MiB)"
                  + (f"   peak GPU {r['peak_gpu_bytes'] / GiB:6.2f} GiB" if r["peak_gpu_bytes"] else ""), flush=True)
    best = {mode: {"wall_s_min": min(r["wall_s"] for r in results if r["mode"] == mode),
                   "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in results if r["mode"] == mode)}
            for mode in modes}
    if args.repeat > 1:
        for mode, b in best.items():
            print(f"{mode:<10} best of {args.repeat}: wall {b['wall_s_min']:.1f} s, largest peak RSS "
                  f"{b['peak_rss_bytes_max'] >> 20} MiB")
    report = {"shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab",
                                                      "dtype")},
              "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len, "random_tokens_seed": args.seed + 1},
              "method": args.method, "keep": args.keep, "rank": args.rank, "source_bytes": source["bytes"],
              "results": results, "summary": best}
    if args.check and {"streaming", "memory"} <= set(modes):
        report["check"] = compare(workdir / "streaming", workdir / "memory")
        print(f"check: {report['check']}")
    if not args.keep_outputs:
        import shutil

        for mode in modes:
            shutil.rmtree(workdir / mode, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
