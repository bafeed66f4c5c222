"""``rankcut compress MODEL -o OUT``: :func:`rankcut.compress_` then :func:`rankcut.save`; with ``--streaming``,
:func:`rankcut.compress_streaming` (one block in memory at a time, written as it goes, resumable)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rankcut import report
from rankcut.cli import dataparallel, flags

#: Storage dtypes ``--save-dtype`` offers besides ``source`` (float64 doubles the file for nothing).
SAVE_DTYPES = ("float32", "float16", "bfloat16")


def add_parser(sub) -> argparse.ArgumentParser:
    from rankcut.config import CompressConfig
    from rankcut.methods import available_methods

    p = sub.add_parser("compress", help="compress a model and save a checkpoint",
                       description="Compress a model's linear layers by low-rank decomposition and save a checkpoint.")
    flags.add_model(p)
    p.add_argument("--method", default=CompressConfig().method,
                   help=flags.helptext(f"decomposition method: {', '.join(available_methods())}", CompressConfig().method))
    alloc = p.add_mutually_exclusive_group()
    alloc.add_argument("--keep", type=float, help=flags.helptext(
        "fraction of the targets' parameters to keep, in (0, 1]", default_text=f"{CompressConfig().keep:g}, "
        "unless --energy or --rank is given"))
    alloc.add_argument("--energy", type=float,
                       help="per target, the smallest rank holding this fraction of the spectral energy, in (0, 1]")
    alloc.add_argument("--rank", type=int, help="the same rank for every target (>= 1)")
    alloc.add_argument("--speedup", type=float, help="budget of a global --allocation as a predicted batch-1 decode "
                       "speedup (> 1) of the whole model (the roofline cost model of an H200 in bf16)")
    from rankcut.policies import available_policies

    p.add_argument("--allocation", choices=[a for a in available_policies() if a != "plan"], help=flags.helptext(
        "allocation policy: uniform (--keep), energy, rank, or the global spectrum (no extra forward pass) and "
        "sensitivity (measured, --sensitivity DIR)", default_text="from --keep/--energy/--rank: uniform, energy, rank"))
    p.add_argument("--sensitivity", metavar="DIR", help="with --allocation sensitivity: the measurement written by "
                   "rankcut sensitivity (checked to be of this model and these settings)")
    p.add_argument("--plan", metavar="FILE", help="apply a plan.json from rankcut search (ranks per target) as it is")
    p.add_argument("--rank-multiple", type=int, help=flags.helptext(
        "global allocations: ranks are multiples of this (the kernels' and cuBLAS's fast paths)", 8))
    flags.add_targets(p)
    flags.add_overrides(p)
    flags.add_method_options(p)
    flags.add_calibration(p, "calibration text file, or dataset name (wikitext2, ptb, c4); needed by the "
                             "data-aware methods (asvd, whiten)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each block on the outputs of the already-compressed blocks before it")
    flags.add_full_model(p)
    from rankcut.quant import FORMATS

    p.add_argument("--factor-dtype", choices=FORMATS, help="store the factors quantised: int8 or fp8 (e4m3) with "
                   "one scale per output channel, int4 with one scale per --factor-group input columns")
    p.add_argument("--factor-group", type=int, default=CompressConfig().factor_group, help=flags.helptext(
        "int4: input columns per scale (must divide every target's input dimension)", CompressConfig().factor_group))
    p.add_argument("--no-compensate", dest="compensate", action="store_false", help="quantise U and V as they are "
                   "(default: V first, then U refitted to it in the layer's input norm, a second calibration pass)")
    flags.add_device(p, "where blocks are processed: auto (CUDA when available), cpu, cuda, cuda:N")
    dataparallel.add_gpus(p)
    flags.add_dtype(p)
    p.add_argument("--save-dtype", default="source", choices=["source", *SAVE_DTYPES], help=flags.helptext(
        "dtype of the checkpoint's weights; source: the dtype the source model stores (the dtype it was computed "
        "in when that is unknown)", "source"))
    flags.add_output(p, "checkpoint directory to write", "replace an existing checkpoint at --output")
    p.add_argument("--streaming", action="store_true", help="models larger than host memory: read one block at a "
                   "time from MODEL's safetensors (a local directory) and write each compressed block to --output as "
                   "it is done; the same command resumes an interrupted run")
    p.add_argument("--restart", action="store_true", help="with --streaming: discard an unfinished streaming "
                   "compression in --output and start over (default: resume it)")
    p.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON here")
    flags.add_quiet(p)
    return p


def source_dtype(spec: str):
    """The dtype the source model stores its weights in: from its config.json (a local directory or checkpoint),
    or from the Hub config of a Hub id; None when it cannot be told."""
    from rankcut.hf import looks_local, stored_dtype
    from rankcut.utils import parse_dtype

    if looks_local(spec):
        return stored_dtype(spec)
    try:
        import transformers

        value = getattr(transformers.AutoConfig.from_pretrained(spec), "dtype", None)
        return parse_dtype(value if not isinstance(value, str) else value.removeprefix("torch."))
    except Exception:  # noqa: BLE001 - unknown means "the dtype it computed in"
        return None


def allocation_flags(args: argparse.Namespace):
    """``(allocation, policy_options, context, model digest a plan expects)`` from --allocation, --sensitivity,
    --plan and --rank-multiple; the files are read (and refused when they are not what they claim) before any
    model is loaded."""
    import json

    from rankcut.cli import CLIError

    allocation, options, context, digest = args.allocation, {}, {}, None
    if args.plan:
        if allocation is not None or any(getattr(args, k) is not None for k in ("keep", "energy", "rank", "speedup")):
            raise CLIError("--plan gives every target's rank: it takes no --allocation, --keep, --energy, --rank or --speedup")
        try:
            plan = json.loads(Path(args.plan).read_text())
            ranks, digest = plan["ranks"], plan.get("model")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CLIError(f"--plan {args.plan}: not a rankcut plan ({err})") from None
        return "plan", {"ranks": ranks, "model": digest, "source": str(args.plan)}, {}, digest
    if args.sensitivity:
        if allocation not in (None, "sensitivity"):
            raise CLIError("--sensitivity applies to --allocation sensitivity")
        from rankcut.sensitivity import load_sensitivity

        allocation = "sensitivity"
        context["sensitivity"] = load_sensitivity(args.sensitivity)
        options["key"] = context["sensitivity"].key
    elif allocation == "sensitivity":
        raise CLIError("--allocation sensitivity needs --sensitivity DIR (measure it with rankcut sensitivity)")
    if args.rank_multiple is not None:
        if allocation not in ("spectrum", "sensitivity"):
            raise CLIError("--rank-multiple applies to the global allocations (spectrum, sensitivity)")
        options["rank_multiple"] = args.rank_multiple
    return allocation, options, context, digest


def check_measurements(model, config, context: dict, expected_model: str | None) -> None:
    """A sensitivity measurement or a plan must be of this model (its weights) and these settings."""
    if expected_model is not None or "sensitivity" in context:
        from rankcut.sensitivity import check_matches, model_digest

        if expected_model is not None and expected_model != model_digest(model):
            raise ValueError("the plan was made for another model (its weights differ)")
        if "sensitivity" in context:
            check_matches(context["sensitivity"], model, config)


def run(args: argparse.Namespace) -> int:
    from rankcut import compress_, save
    from rankcut.hf import load_any, looks_local
    from rankcut.io import check_output, checkpoint_bytes
    from rankcut.cli import CLIError
    from rankcut.utils import dtype_name, parse_dtype, resolve_device

    allocation, policy_options, context, expected_model = allocation_flags(args)
    config = flags.compress_config(args, method=args.method, options=flags.method_options(args, args.method),
                                   keep=args.keep, energy=args.energy, rank=args.rank, speedup=args.speedup,
                                   allocation=allocation, policy_options=policy_options, sequential=args.sequential,
                                   factor_dtype=args.factor_dtype, factor_group=args.factor_group,
                                   compensate=args.compensate)
    output = Path(args.output)
    dataparallel.check(args)
    if args.streaming:
        return run_streaming(args, config, context, expected_model)
    if args.restart:
        raise CLIError("--restart applies to --streaming (an unfinished streaming compression in --output)")
    check_output(output, args.overwrite, flag="--overwrite")  # before any work: fail fast, write nothing
    flags.check_sources(calib=args.calib)
    from rankcut.compress import check_inputs

    check_inputs(config, args.calib)
    device = resolve_device(args.device)
    if dataparallel.spawns(args):  # --gpus N: this same command in N processes of one world
        return dataparallel.spawn(args, device)
    world, device = dataparallel.join(args, device)  # torchrun or --gpus: this process's rank and device
    if args.factor_dtype and device.type == "cuda":
        from rankcut.kernels.dispatch import triton_available

        if not triton_available():
            raise CLIError(f"--factor-dtype {args.factor_dtype} on CUDA needs Triton for its dequantising kernels, "
                           "and Triton is not importable: install triton, or pass --device cpu")
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device))
    check_measurements(model, config, context, expected_model)
    summary = compress_(model, config, calib=args.calib, tokenizer=tokenizer, device=device, progress=not args.quiet,
                        context=context)
    if world is not None and not world.main:  # every process has the same model; rank 0 prints and writes
        return dataparallel.done(world)
    print(summary.table())
    computed = next(p.dtype for p in model.parameters() if p.is_floating_point())
    source = source_dtype(args.model)
    dtype = (source or computed) if args.save_dtype == "source" else parse_dtype(args.save_dtype)
    save(model, output, tokenizer=tokenizer, overwrite=args.overwrite, dtype=dtype)
    after = checkpoint_bytes(output)
    local = looks_local(args.model) and os.path.isdir(os.path.expanduser(args.model))
    before = checkpoint_bytes(os.path.expanduser(args.model)) if local else 0
    estimated = None
    if not before:  # a Hub id (or a directory without weight files): parameters x bytes
        estimated = summary.model_params_before
        before = estimated * (source or computed).itemsize
    sizes = {"bytes": after, "dtype": dtype_name(dtype), "source_bytes": before,
             "source_dtype": dtype_name(source) if source else None, "source_bytes_estimated": estimated is not None}
    report.write_json(args.summary_json, {"summary": summary.to_dict(), "config": config.to_dict(),
                                          "checkpoint": sizes, **report.invocation(args.argv, device)})
    print(f"saved {output}")
    print(report.size_line(after, before, sizes["dtype"], sizes["source_dtype"], estimated))
    return dataparallel.done(world)


def run_streaming(args: argparse.Namespace, config, context: dict, expected_model: str | None) -> int:
    """``--streaming``: :func:`rankcut.compress_streaming` from a local directory into --output."""
    from rankcut.cli import CLIError
    from rankcut.hf import stored_dtype
    from rankcut.io import checkpoint_bytes
    from rankcut.streaming import SourceModel, check_source, compress_streaming, source_digest
    from rankcut.utils import dtype_name, resolve_device

    flags.check_sources(calib=args.calib)
    from rankcut.compress import check_inputs

    check_inputs(config, args.calib)
    check_source(args.model)
    if args.factor_dtype:
        raise CLIError("--factor-dtype quantises the factors in a second pass over the whole compressed model, which "
                       "--streaming does not do: compress without --streaming, or without --factor-dtype")
    if "sensitivity" in context:
        raise CLIError("--allocation sensitivity plans every target at once: it does not combine with --streaming")
    device = resolve_device(args.device)
    dtype = flags.compute_dtype(args.dtype, device)
    if expected_model is not None:  # the plan names the weights it was made for: hash the source block by block
        if source_digest(SourceModel(args.model, dtype, device)) != expected_model:
            raise CLIError("the plan was made for another model (its weights differ)")
    args.interrupted = (f"the blocks finished so far are in {args.output}: run the same command again to resume")
    try:
        summary = compress_streaming(args.model, args.output, config, calib=args.calib, device=device, dtype=dtype,
                                     save_dtype="source" if args.save_dtype == "source" else args.save_dtype,
                                     resume=not args.restart, overwrite=args.overwrite, progress=not args.quiet)
    except ValueError as err:
        raise ValueError(str(err).replace("resume=False (--restart)", "--restart")) from None
    print(summary.table())
    stored = stored_dtype(args.output)
    source = source_dtype(args.model)
    after, before = checkpoint_bytes(args.output), checkpoint_bytes(os.path.expanduser(args.model))
    sizes = {"bytes": after, "dtype": dtype_name(stored) if stored else None, "source_bytes": before,
             "source_dtype": dtype_name(source) if source else None, "source_bytes_estimated": False}
    report.write_json(args.summary_json, {"summary": summary.to_dict(), "config": config.to_dict(),
                                          "checkpoint": sizes, "streaming": True,
                                          **report.invocation(args.argv, device)})
    print(f"saved {args.output}")
    print(report.size_line(after, before, sizes["dtype"], sizes["source_dtype"], None))
    return 0
