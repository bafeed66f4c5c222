"""``rankcut compress MODEL -o OUT``: :func:`rankcut.compress_` then :func:`rankcut.save`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rankcut import report
from rankcut.cli import flags

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
    flags.add_targets(p)
    flags.add_overrides(p)
    flags.add_method_options(p)
    flags.add_calibration(p, "calibration text file, or dataset name (wikitext2, ptb, c4); needed by the "
                             "data-aware methods (asvd, whiten)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each block on the outputs of the already-compressed blocks before it")
    flags.add_full_model(p)
    flags.add_device(p, "where blocks are processed: auto (CUDA when available), cpu, cuda, cuda:N")
    flags.add_dtype(p)
    p.add_argument("--save-dtype", default="source", choices=["source", *SAVE_DTYPES], help=flags.helptext(
        "dtype of the checkpoint's weights; source: the dtype the source model stores (the dtype it was computed "
        "in when that is unknown)", "source"))
    flags.add_output(p, "checkpoint directory to write", "replace an existing checkpoint at --output")
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


def run(args: argparse.Namespace) -> int:
    from rankcut import compress_, save
    from rankcut.hf import load_any, looks_local
    from rankcut.io import check_output, checkpoint_bytes
    from rankcut.utils import dtype_name, parse_dtype, resolve_device

    config = flags.compress_config(args, method=args.method, options=flags.method_options(args, args.method),
                                   keep=args.keep, energy=args.energy, rank=args.rank, sequential=args.sequential)
    output = Path(args.output)
    check_output(output, args.overwrite, flag="--overwrite")  # before any work: fail fast, write nothing
    flags.check_sources(calib=args.calib)
    from rankcut.compress import check_inputs

    check_inputs(config, args.calib)
    device = resolve_device(args.device)
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device))
    summary = compress_(model, config, calib=args.calib, tokenizer=tokenizer, device=device, progress=not args.quiet)
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
    return 0
