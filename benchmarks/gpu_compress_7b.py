"""Compress a Llama-2-7B-shaped model (random bf16 weights, held on the CPU) block by block on one GPU.

Measures what issue #2 item 12 asks: wall time per stage, peak GPU memory against the dense model's size,
host peak RSS and the achieved keep, for ``whiten`` at keep 0.8 with random-token calibration windows.

The model is built with its parameters on the meta device and then materialised one tensor at a time on
the CPU (normal(0, 0.02) for matrices, ones for norms; the random numbers are drawn on the GPU when there
is one and copied back). Non-persistent buffers (rotary ``inv_freq``) are computed normally.
``compress_(..., device="cuda")`` then moves one transformer block at a time to the GPU (the embeddings,
final norm and LM head go there for the whole run); the other blocks stay on the CPU.

Beyond the library's own stage times (``summary.times``), the script times the main kernels inside the
stages by wrapping them with CUDA synchronisations (``--no-kernel-times`` turns that off): Gram
accumulation (inside "statistics"), Cholesky and SVD (inside "decomposition"). It also records, at the
start of every block, how many parameter bytes are resident on the GPU.

Example::

    PYTHONPATH=$PWD python benchmarks/gpu_compress_7b.py --layers 32 --samples 256 --seq-len 2048 \\
        --keep 0.8 --method whiten --json benchmarks/results/gpu_compress_7b.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict

import torch
import transformers

from accelerate import init_empty_weights

import rankcut
import rankcut.calibrate
import rankcut.methods.spectral
import rankcut.methods.whiten
import rankcut.pipeline
from rankcut.targets import find_blocks

GiB = 2**30


def llama2_7b_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, use_cache=False,
    )


@torch.no_grad()
def build_random_model(layers: int, dtype: torch.dtype, seed: int) -> transformers.PreTrainedModel:
    """The model on the CPU in ``dtype``: matrices ~ N(0, 0.02²), norm weights 1, buffers as constructed."""
    with init_empty_weights(include_buffers=False):
        model = transformers.LlamaForCausalLM(llama2_7b_config(layers))
    draw = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=draw).manual_seed(seed)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if param.ndim == 1:
                value = torch.ones(param.shape, dtype=dtype)
            else:
                value = torch.empty(param.shape, dtype=dtype, device=draw).normal_(0.0, 0.02, generator=gen).cpu()
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            raise RuntimeError(f"buffer {name} left on the meta device")
    if draw == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model.eval()


class KernelTimes:
    """Wrap the library's heavy kernels with synchronised timers (seconds summed per label, and call counts)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list = []

    def _wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def __enter__(self) -> KernelTimes:
        self._wrap(rankcut.calibrate.StatAccumulator, "update", "gram accumulation (in statistics)")
        self._wrap(rankcut.methods.whiten, "safe_cholesky", "cholesky (in decomposition)")
        self._wrap(rankcut.methods.spectral, "svd_top", "svd (in decomposition)")
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)


class BlockWatch:
    """At each block's first call: wall clock, and parameter bytes resident on the GPU (whole model)."""

    def __init__(self, model) -> None:
        self.model = model
        self.starts: list[float] = []
        self.gpu_param_bytes: list[int] = []
        self.gpu_allocated: list[int] = []
        self.handles = []
        _, blocks = find_blocks(model)
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._hook, index)))

    def _hook(self, index, module, args):
        if len(self.starts) <= index:
            self.starts.append(time.perf_counter())
            self.gpu_param_bytes.append(
                sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type == "cuda")
            )
            self.gpu_allocated.append(torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def captured_bytes(calls: list) -> dict:
    """Bytes of the tensors in the captured first-block calls, by argument name (shared tensors once)."""
    seen, sizes = set(), defaultdict(int)
    for args, kwargs in calls:
        items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        for key, value in items:
            values = value if isinstance(value, (tuple, list)) else [value]
            for v in values:
                if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    sizes[key] += v.numel() * v.element_size()
    return dict(sizes)


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rankcut": rankcut.__version__,
        "cpu_count": __import__("os").cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()
            env["nvidia_smi"] = out
            env["driver"] = out.split(",")[1].strip() if out.count(",") >= 2 else None
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--solver", default="exact")
    parser.add_argument("--allocation", default=None, help="allocation policy (default: uniform keep)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kernel-times", action="store_true", help="do not wrap kernels with synchronised timers")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        sys.exit("CUDA is not available")
    dtype = getattr(torch, args.dtype)
    command = " ".join(["python", *sys.argv])

    start = time.perf_counter()
    model = build_random_model(args.layers, dtype, args.seed)
    build_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prefix, blocks = find_blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    outside_bytes = dense_bytes - sum(p.numel() * p.element_size() for p in blocks.parameters())
    print(f"built {args.layers}-layer Llama-2-7B-shaped model on the CPU in {build_s:.1f}s: {n_params:,} params, "
          f"{dense_bytes / GiB:.2f} GiB ({args.dtype}); one block {block_bytes / GiB:.3f} GiB, "
          f"outside the blocks {outside_bytes / GiB:.3f} GiB", flush=True)

    tokens = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                           generator=torch.Generator().manual_seed(args.seed))
    config = rankcut.CompressConfig(
        method=args.method, keep=args.keep, calib_samples=args.samples, seq_len=args.seq_len,
        batch_size=args.batch_size, options={"solver": args.solver}, allocation=args.allocation,
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    watch = BlockWatch(model)
    captured: dict[str, int] = {}
    original_capture = rankcut.pipeline.capture_block_inputs

    def capture(*a, **kw):  # measure the captured inputs; keep no reference to them
        calls = original_capture(*a, **kw)
        captured.update(captured_bytes(calls))
        return calls

    rankcut.pipeline.capture_block_inputs = capture
    kernels = KernelTimes()
    wall = time.perf_counter()
    if args.no_kernel_times:
        summary = rankcut.compress_(model, config, calib=tokens, device=device, progress=False)
    else:
        with kernels:
            summary = rankcut.compress_(model, config, calib=tokens, device=device, progress=False)
    compress_s = time.perf_counter() - wall
    watch.close()
    rankcut.pipeline.capture_block_inputs = original_capture
    result = {
        "command": command,
        "environment": environment(),
        "model": {
            "shape": "Llama-2-7B (hidden 4096, intermediate 11008, 32 heads, 32 KV heads, vocab 32000)",
            "layers": args.layers, "dtype": args.dtype, "weights": "random normal(0, 0.02), norms 1",
            "params": n_params, "dense_bytes": dense_bytes, "block_bytes": block_bytes,
            "outside_blocks_bytes": outside_bytes, "starts_on": "cpu",
        },
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "tokens": args.samples * args.seq_len,
                        "kind": "uniform random token ids, torch.randint, seed %d" % args.seed},
        "config": config.to_dict(),
        "build_seconds": build_s,
        "compress_wall_seconds": compress_s,
        "stage_seconds": dict(summary.times),
        "stage_seconds_unattributed": summary.times["total"] - sum(v for k, v in summary.times.items() if k != "total"),
        "kernel_seconds": None if args.no_kernel_times else dict(kernels.seconds),
        "kernel_calls": None if args.no_kernel_times else dict(kernels.calls),
        # block i: from its first forward call to the next block's (the last one: to the end of compress_)
        "block_seconds": [b - a for a, b in zip(watch.starts, [*watch.starts[1:], wall + compress_s])],
        "gpu_param_bytes_at_block_start_max": max(watch.gpu_param_bytes, default=0),
        "gpu_allocated_at_block_start_max": max(watch.gpu_allocated, default=0),
        "captured_block_inputs_bytes": captured,
        "keep_targets": summary.keep_targets,
        "keep_model": summary.keep_model,
        "target_params_before": summary.target_params_before,
        "target_params_after": summary.target_params_after,
        "model_params_before": summary.model_params_before,
        "model_params_after": summary.model_params_after,
        "targets": len(summary.rows),
        "dense_targets": summary.dense_targets,
        "ranks": sorted({(tuple(r.shape), r.rank) for r in summary.rows}),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        result.update(
            gpu_bytes_before=gpu_before,
            peak_gpu_allocated_bytes=torch.cuda.max_memory_allocated(device),
            peak_gpu_reserved_bytes=torch.cuda.max_memory_reserved(device),
            summary_peak_gpu_bytes=summary.peak_gpu_bytes,
        )
    result["params_on_gpu_after"] = sum(p.numel() for p in model.parameters() if p.device.type != "cpu")

    # Sanity: the compressed model still runs and gives finite logits (after all measurements).
    if device.type == "cuda":
        with torch.no_grad():
            model.to(device)
            logits = model(input_ids=tokens[:2, :256].to(device)).logits
            result["logits_finite_after"] = bool(torch.isfinite(logits).all())
            model.to("cpu")

    t = result["stage_seconds"]
    print("\nstage                              seconds")
    for key, value in t.items():
        print(f"  {key:<32} {value:8.1f}")
    print(f"  {'(unattributed: checks, setup)':<32} {result['stage_seconds_unattributed']:8.1f}")
    if result["kernel_seconds"]:
        for key, value in result["kernel_seconds"].items():
            print(f"    {key:<34} {value:8.1f}  ({result['kernel_calls'][key]} calls)")
    if result["block_seconds"]:
        bs = result["block_seconds"]
        print(f"  per block (first-call to first-call): mean {sum(bs) / len(bs):.1f}s, min {min(bs):.1f}, max {max(bs):.1f}")
    print(f"model build {build_s:.1f}s; compress_ wall {compress_s:.1f}s")
    if device.type == "cuda":
        print(f"peak GPU allocated {result['peak_gpu_allocated_bytes'] / GiB:.2f} GiB, reserved "
              f"{result['peak_gpu_reserved_bytes'] / GiB:.2f} GiB; dense model {dense_bytes / GiB:.2f} GiB; max params on "
              f"GPU at a block start {result['gpu_param_bytes_at_block_start_max'] / GiB:.3f} GiB")
        print(f"captured first-block inputs (GPU): " + ", ".join(
            f"{k} {v / GiB:.3f} GiB" for k, v in result["captured_block_inputs_bytes"].items()))
    print(f"host peak RSS {result['host_peak_rss_bytes'] / GiB:.2f} GiB")
    print(f"keep: targets {summary.keep_targets:.4f}, whole model {summary.keep_model:.4f}; "
          f"{len(summary.dense_targets)} of {len(summary.rows)} targets dense; params left on GPU {result['params_on_gpu_after']}")
    print(f"logits finite after: {result.get('logits_finite_after')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
