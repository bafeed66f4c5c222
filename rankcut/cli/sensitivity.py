"""``rankcut sensitivity MODEL --calib TEXT -o DIR``: :func:`rankcut.sensitivity.measure_sensitivity`, cached."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankcut.cli import CLIError, flags


def add_parser(sub) -> argparse.ArgumentParser:
    from rankcut.config import CompressConfig
    from rankcut.methods import available_methods
    from rankcut.sensitivity import SensitivitySettings

    p = sub.add_parser("sensitivity", help="measure each target's truncation cost on a grid of ranks (cached)",
                       description="Per target: the cost of truncating it alone at a grid of ranks, scored on windows "
                                   "of the calibration text (never the evaluation text). Cached in the output "
                                   "directory by the model's weights, the data and every setting.")
    flags.add_model(p)
    p.add_argument("--method", default=CompressConfig().method,
                   help=flags.helptext(f"decomposition method: {', '.join(available_methods())}", CompressConfig().method))
    flags.add_method_options(p)
    flags.add_targets(p)
    flags.add_calibration(p, "calibration text file or dataset name: statistics and scoring windows come from it")
    defaults = SensitivitySettings()
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in defaults.fractions), help=flags.helptext(
        "ranks measured, as fractions of each target's largest useful rank", ",".join(f"{f:g}" for f in defaults.fractions)))
    p.add_argument("--score", default=defaults.score, choices=["kl", "loss"], help=flags.helptext(
        "kl: KL(dense || truncated) of the next-token distributions; loss: increase of the next-token loss",
        defaults.score))
    p.add_argument("--score-windows", type=int, default=defaults.windows,
                   help=flags.helptext("scoring windows (of the calibration text, not used by calibration)", defaults.windows))
    p.add_argument("--score-seq-len", type=int, help=flags.helptext("scoring window length", default_text="--seq-len"))
    p.add_argument("--score-seed", type=int, default=defaults.seed, help=flags.helptext("seed of the scoring windows", defaults.seed))
    p.add_argument("--rank-multiple", type=int, default=defaults.rank_multiple,
                   help=flags.helptext("measured ranks are multiples of this", defaults.rank_multiple))
    p.add_argument("--score-batch-size", type=int, default=defaults.batch_size,
                   help=flags.helptext("scoring windows per forward pass", defaults.batch_size))
    flags.add_full_model(p)
    flags.add_device(p)
    flags.add_dtype(p)
    p.add_argument("-o", "--output", required=True,
                   help="directory of the cached measurement (resumed when interrupted; reused when unchanged)")
    flags.add_quiet(p)
    return p


def settings_from(args: argparse.Namespace):
    from rankcut.sensitivity import SensitivitySettings

    return SensitivitySettings(fractions=tuple(flags.parse_list("--fractions", args.fractions, float)),
                               score=args.score, windows=args.score_windows, seq_len=args.score_seq_len,
                               seed=args.score_seed, rank_multiple=args.rank_multiple, batch_size=args.score_batch_size)


def run(args: argparse.Namespace) -> int:
    from rankcut import report
    from rankcut.compress import check_inputs
    from rankcut.hf import load_any
    from rankcut.sensitivity import measure_sensitivity, write_figures
    from rankcut.utils import resolve_device

    config = flags.compress_config(args, method=args.method, options=flags.method_options(args, args.method))
    settings = settings_from(args)
    if args.calib is None:
        raise CLIError("sensitivity scores on calibration text: give --calib TEXT")
    check_inputs(config, args.calib)
    flags.check_sources(calib=args.calib)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()) and not (output / "sensitivity.json").exists():
        raise CLIError(f"refusing to write into {output}: it is not a rankcut sensitivity directory")
    device = resolve_device(args.device)
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device))
    args.interrupted = f"the targets measured so far are kept in {output}: re-run the same command to resume"
    result = measure_sensitivity(model, tokenizer, args.calib, config, settings, output=output, device=device,
                                 progress=not args.quiet)
    figures = write_figures(result, output)
    report.write_json(output / "command.json", report.invocation(args.argv, device))
    print(report.sensitivity_table(result))
    print(f"wrote {output}/sensitivity.json, {', '.join(f.name for f in figures)} "
          f"({result.times.get('total', 0):.1f} s)")
    return 0
