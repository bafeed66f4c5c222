"""``rankcut sweep MODEL --methods … --keep … -o DIR``: :func:`rankcut.sweep` over a (method, keep) grid."""

from __future__ import annotations

import argparse

from rankcut import report
from rankcut.cli import CLIError, flags


def add_parser(sub) -> argparse.ArgumentParser:
    w = sub.add_parser("sweep", help="compress at each (method, keep) pair, evaluate each, tabulate and plot",
                       description="Compress a model at every (method, keep) pair and evaluate every point; "
                                   "finished points are kept, so an interrupted sweep resumes.")
    flags.add_model(w)
    w.add_argument("--methods", default="svd,asvd,whiten", help=flags.helptext("comma-separated methods", "svd,asvd,whiten"))
    w.add_argument("--keep", default="0.9,0.8,0.6",
                   help=flags.helptext("comma-separated keep fractions in (0, 1]", "0.9,0.8,0.6"))
    w.add_argument("--ppl", action="append", required=True, metavar="TEXT",
                   help="perplexity text file or dataset name (repeatable; at least one)")
    flags.add_targets(w)
    flags.add_overrides(w)
    flags.add_method_options(w)
    flags.add_calibration(w, "calibration text file or dataset name (its statistics are computed once and shared "
                             "by all points)")
    flags.add_full_model(w)
    w.add_argument("--max-windows", type=int, help="evaluate only the first N windows of each text (default: all)")
    w.add_argument("--eval-seq-len", type=int, help=flags.helptext("perplexity window length in tokens",
                                                                   default_text="min(2048, the model's maximum)"))
    flags.add_device(w)
    flags.add_dtype(w)
    flags.add_output(w, "sweep directory (resumable: finished points are skipped)",
                     "discard an existing sweep with different settings")
    flags.add_quiet(w)
    return w


def run(args: argparse.Namespace) -> int:
    from rankcut.hf import load_any
    from rankcut.plots import _pyplot
    from rankcut.sweep import check_grid, check_options, render_markdown, sweep
    from rankcut.utils import resolve_device

    methods, keeps = check_grid(flags.parse_list("--methods", args.methods), flags.parse_list("--keep", args.keep, float))
    options = flags.given_options(args)
    check_options(methods, options)
    base = flags.compress_config(args)  # validates the shared settings before any work
    flags.check_sources(calib=args.calib, ppl=args.ppl)
    try:
        _pyplot()
    except ImportError as err:
        raise CLIError(str(err)) from None
    device = resolve_device(args.device)
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device), device)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; calibration and perplexity need one")
    info = {"model": args.model, "seed": args.seed, "device": str(device), **report.invocation(args.argv, device)}
    args.interrupted = f"finished points are kept in {args.output}: re-run the same command to resume"
    results = sweep(model, tokenizer, args.output, methods, keeps, calib=args.calib, ppl=args.ppl,
                    calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, max_windows=args.max_windows,
                    eval_seq_len=args.eval_seq_len, batch_size=args.batch_size, device=device, overwrite=args.overwrite,
                    progress=not args.quiet, info=info, base=base, options=options)
    print(render_markdown(results))
    print(f"wrote {args.output}/results.json, results.md, quality_vs_keep.png "
          f"({len(results['computed'])} of {len(results['points'])} points computed now)")
    return 0
