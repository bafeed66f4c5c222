"""``rankcut search MODEL --tau 0.05 --dev TEXT --calib TEXT -o DIR``: :func:`rankcut.search.search`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankcut.cli import CLIError, flags


def add_parser(sub) -> argparse.ArgumentParser:
    from rankcut.config import CompressConfig
    from rankcut.methods import available_methods
    from rankcut.search import OBJECTIVES, SearchSettings

    d = SearchSettings()
    p = sub.add_parser("search", help="search the decomposition design space for the lowest latency x energy under "
                       "a dev-perplexity tolerance (verified points, Pareto front, plan.json)",
                       description="Moar et al.'s design space (pruned rank x tensors x layers) and allocated plans, "
                                   "scored on a dev text, the best within tau verified as rankcut compress --plan "
                                   "would make them.")
    flags.add_model(p)
    p.add_argument("--method", default=CompressConfig().method,
                   help=flags.helptext(f"decomposition method: {', '.join(available_methods())}", CompressConfig().method))
    flags.add_method_options(p)
    p.add_argument("--tau", type=float, default=d.tau,
                   help=flags.helptext("tolerated relative dev perplexity increase over the dense model (0.05 = 5%)", d.tau))
    p.add_argument("--objective", default=d.objective, choices=list(OBJECTIVES),
                   help=flags.helptext("what to minimise (latency and energy from the cost model)", d.objective))
    p.add_argument("--dev", required=True, metavar="TEXT",
                   help="dev text the tolerance is judged on (not the calibration text, not the final test text)")
    p.add_argument("--dev-windows", type=int, default=d.dev_windows,
                   help=flags.helptext("first windows of the dev text scored", d.dev_windows))
    p.add_argument("--dev-seq-len", type=int, help=flags.helptext("dev window length", default_text="--seq-len"))
    p.add_argument("--allocation", choices=["spectrum", "sensitivity"], default="spectrum",
                   help=flags.helptext("policy of the allocated plans", "spectrum"))
    p.add_argument("--sensitivity", metavar="DIR", help="with --allocation sensitivity: the rankcut sensitivity result")
    p.add_argument("--keeps", default=",".join(f"{k:g}" for k in d.keeps),
                   help=flags.helptext("parameter budgets of the allocated plans", ",".join(f"{k:g}" for k in d.keeps)))
    p.add_argument("--ranks", default=",".join(f"{r:g}" for r in d.ranks), help=flags.helptext(
        "pruned ranks of the structured space (integers: ranks; fractions: of each target's largest useful rank)",
        ",".join(f"{r:g}" for r in d.ranks)))
    p.add_argument("--first-layer", type=int, help=flags.helptext(
        "first layer the structured space decomposes", default_text="a quarter of the depth, at least 1"))
    p.add_argument("--verify", type=int, default=d.verify,
                   help=flags.helptext("feasible configurations verified besides the Pareto front", d.verify))
    flags.add_targets(p)
    flags.add_calibration(p, "calibration text file or dataset name")
    flags.add_device(p)
    flags.add_dtype(p)
    p.add_argument("--save-dtype", default="source", choices=["source", "float32", "float16", "bfloat16"],
                   help=flags.helptext("the checkpoint dtype verified configurations are evaluated in (as rankcut "
                                       "compress --plan would save them)", "source"))
    flags.add_output(p, "search directory to write (search.json, search.md, plan.json, search_front.png)",
                     "replace an existing search directory at --output")
    flags.add_quiet(p)
    return p


def run(args: argparse.Namespace) -> int:
    from rankcut.cli.compress import source_dtype
    from rankcut.compress import check_inputs
    from rankcut.hf import load_any
    from rankcut.io import check_output
    from rankcut.report import staged_dir
    from rankcut.search import SearchSettings, search, write_search
    from rankcut.utils import parse_dtype, resolve_device

    settings = SearchSettings(tau=args.tau, objective=args.objective, dev_windows=args.dev_windows,
                              dev_seq_len=args.dev_seq_len, keeps=tuple(flags.parse_list("--keeps", args.keeps, float)),
                              ranks=tuple(flags.parse_list("--ranks", args.ranks, float)), first_layer=args.first_layer,
                              verify=args.verify)
    config = flags.compress_config(args, method=args.method, options=flags.method_options(args, args.method),
                                   allocation=args.allocation, keep=0.8)
    check_inputs(config, args.calib)
    flags.check_sources(calib=args.calib, dev=args.dev)
    output = Path(args.output)
    check_output(output, args.overwrite, marker="search.json", kind="rankcut search", flag="--overwrite")
    context = {}
    if args.allocation == "sensitivity":
        if not args.sensitivity:
            raise CLIError("--allocation sensitivity needs --sensitivity DIR (measure it with rankcut sensitivity)")
        from rankcut.sensitivity import load_sensitivity

        context["sensitivity"] = load_sensitivity(args.sensitivity)
    device = resolve_device(args.device)
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device))
    if "sensitivity" in context:
        from rankcut.sensitivity import check_matches

        check_matches(context["sensitivity"], model, config)
    store = (source_dtype(args.model) if args.save_dtype == "source" else parse_dtype(args.save_dtype))
    result = search(model, tokenizer, args.calib, args.dev, config, settings, context=context, store_dtype=store,
                    device=device, progress=not args.quiet)
    from rankcut import report

    result.update(report.invocation(args.argv, device))
    with staged_dir(output) as staging:
        files = write_search(result, staging)
    print((output / "search.md").read_text())
    best = result["configurations"][result["best"]]
    if best["family"] == "dense":
        print(f"no decomposition lowers the {args.objective} within tau {args.tau:g}: the best configuration is the "
              f"dense model (plan.json keeps every target dense); search {result['times']['total']:.0f} s")
        return 0
    print(f"best within tau {args.tau:g}: {best['family']}, verified dev perplexity {best['verified']['dev_ppl']:.4f} "
          f"({best['verified']['increase']:+.2%}); plan: {output / 'plan.json'} "
          f"(rankcut compress {args.model} --plan {output / 'plan.json'} --calib ...); search {result['times']['total']:.0f} s")
    return 0
