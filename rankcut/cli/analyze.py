"""``rankcut analyze MODEL -o DIR``: :func:`rankcut.analyze`, written as report.json, report.md and PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankcut import report
from rankcut.cli import CLIError, flags


def add_parser(sub) -> argparse.ArgumentParser:
    from rankcut.analyze import DEFAULT_THRESHOLDS

    a = sub.add_parser("analyze", help="singular values, energy ranks, break-even and speedup bounds of every target",
                       description="Spectral analysis of a model's targets (the model is not changed).")
    flags.add_model(a)
    a.add_argument("-o", "--output", required=True, help="report directory to write (report.json, report.md, PNGs)")
    thresholds = ",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS)
    a.add_argument("--thresholds", default=thresholds,
                   help=flags.helptext("comma-separated energy thresholds in (0, 1]", thresholds))
    a.add_argument("--method", default="whiten", help=flags.helptext(
        "with --calib: the data-aware method whose matrix is analysed too (whiten: W·L; asvd: W·diag(s))", "whiten"))
    flags.add_method_options(a)
    flags.add_calibration(a, "calibration text file or dataset name: adds the spectra of the matrix --method "
                             "truncates (activation-aware)")
    flags.add_targets(a)
    flags.add_device(a, "where SVDs and calibration run: auto (CUDA when available), cpu, cuda, cuda:N")
    flags.add_dtype(a)
    a.add_argument("--overwrite", action="store_true", help="replace an existing report directory at --output")
    flags.add_quiet(a)
    return a


def run(args: argparse.Namespace) -> int:
    from rankcut.analyze import MATRIX, analyze, check_thresholds, render_markdown
    from rankcut.hf import load_any
    from rankcut.io import check_output
    from rankcut.plots import _pyplot, write_plots
    from rankcut.utils import resolve_device

    thresholds = check_thresholds(flags.parse_list("--thresholds", args.thresholds, float))
    options = flags.method_options(args, args.method)
    output = Path(args.output)
    check_output(output, args.overwrite, marker="report.json", kind="rankcut analyze report", flag="--overwrite")
    try:
        _pyplot()
    except ImportError as err:
        raise CLIError(str(err)) from None
    flags.check_sources(calib=args.calib)
    device = resolve_device(args.device)
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device))
    if args.calib is not None and tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; --calib text needs one")
    result = analyze(model, thresholds, calib=args.calib, tokenizer=tokenizer, method=args.method, options=options,
                     calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, sampling=args.sampling,
                     batch_size=args.batch_size, include=args.include or None, exclude=args.exclude or None,
                     device=device, progress=not args.quiet)
    info = {"model": args.model, **report.invocation(args.argv, device)}
    with report.staged_dir(output) as staging:  # an interrupted run leaves no half report
        plots = write_plots(result, staging)
        report.write_json(staging / "report.json", {**info, **result.to_dict()}, indent=1)
        report.write_text(staging / "report.md", render_markdown(result, info, [p.name for p in plots]))
    print(result.summary_table("weight"))
    if args.method in result.kinds:
        print(f"\nactivation-aware ({MATRIX.get(args.method, args.method)}):")
        print(result.summary_table(args.method))
    print(f"wrote {output}/report.json, report.md, {', '.join(p.name for p in plots)}")
    return 0
