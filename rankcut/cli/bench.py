"""``rankcut bench MODEL [--compare DENSE]``: decode speed through rankcut's static-cache, CUDA-graph loop
(:func:`rankcut.bench.run.bench`)."""

from __future__ import annotations

import argparse

from rankcut import report
from rankcut.cli import flags


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="decode speed (tokens/s, GB/s, energy) with a static KV cache and CUDA graphs",
                       description="Decode speed of a model, and of a baseline with the identical loop.")
    b.add_argument("model", help="rankcut checkpoint, model directory, Hub id, or random:SHAPE (llama2-7b, llama3-8b, "
                                 "gpt2, ...)")
    b.add_argument("--compare", metavar="MODEL", help="dense baseline benchmarked in the same run with the identical loop")
    b.add_argument("--random-lowrank", type=float, metavar="KEEP",
                   help="replace MODEL's targets by random factors at this uniform keep (speed only)")
    from rankcut.quant import FORMATS

    b.add_argument("--factor-dtype", choices=FORMATS, help="with --random-lowrank: store the random factors quantised")
    b.add_argument("--factor-group", type=int, default=128, help=flags.helptext("int4: input columns per scale", 128))
    b.add_argument("--batch", default="1", help=flags.helptext(
        "sequences decoded at once; a comma-separated list (1,8,32,128) measures each on the same models", 1))
    b.add_argument("--prompt-len", type=int, default=128, help=flags.helptext("prompt tokens (prefill)", 128))
    b.add_argument("--new-tokens", type=int, default=256, help=flags.helptext("tokens decoded and timed", 256))
    b.add_argument("--repeats", type=int, default=3, help=flags.helptext("timed repetitions (median reported)", 3))
    b.add_argument("--layers", type=int, help=flags.helptext("random:SHAPE only: number of blocks",
                                                             default_text="the shape's"))
    flags.add_dtype(b, "weights and activations", default="bfloat16", choices=["float16", "bfloat16"])
    flags.add_device(b, "cuda, cuda:N, or cpu (a functional run: no CUDA graph, no speed prediction)", default="cuda")
    b.add_argument("--no-fuse", action="store_true", help="do not fuse q/k/v and gate/up projections")
    b.add_argument("--attention", choices=["auto", "sdpa"], default="auto", help=flags.helptext(
        "decode attention: auto = rotary, cache write and split-KV attention in one kernel on CUDA; sdpa = rotary "
        "kernel + F.scaled_dot_product_attention over the whole static cache", "auto"))
    b.add_argument("--fold", action="store_true",
                   help="batch 1, Llama family: compute add + RMSNorm and SiLU*up inside the next low-rank projection's "
                        "first kernel instead of their own kernels (experimental)")
    b.add_argument("--dense-gemv", choices=["rankcut", "cublas"], default="rankcut", help=flags.helptext(
        "one-token dense projections (dense models, the dense layers of compressed ones): rankcut's Triton GEMV or "
        "cuBLAS", "rankcut"))
    b.add_argument("--no-graph", action="store_true", help="run the decode step eagerly instead of replaying a CUDA graph")
    b.add_argument("--json", metavar="FILE", help="write all figures as JSON here")
    flags.add_quiet(b)
    return b


def run(args: argparse.Namespace) -> int:
    from rankcut.bench.run import bench, check_args, check_spec, format_batch_table, format_table
    from rankcut.utils import parse_dtype

    batches = flags.parse_list("--batch", args.batch, int)
    if not batches:
        raise flags.CLIError("--batch needs at least one batch size")
    for batch in batches:
        check_args(batch, args.prompt_len, args.new_tokens, args.repeats, args.random_lowrank)
    for spec in [args.model] + ([args.compare] if args.compare else []):
        check_spec(spec)
    result = bench(args.model, compare=args.compare, random_lowrank=args.random_lowrank, batch=batches if "," in args.batch else batches[0],
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                   dtype=parse_dtype(args.dtype), device=args.device, fuse=not args.no_fuse,
                   use_graph=False if args.no_graph else None, layers=args.layers, progress=not args.quiet,
                   factor_dtype=args.factor_dtype, factor_group=args.factor_group, attention=args.attention,
                   fold=args.fold, dense_gemv=args.dense_gemv == "rankcut")
    result.update(report.invocation(args.argv, args.device))
    print(format_batch_table(result) if "batches" in result else format_table(result))
    report.write_json(args.json, result)
    return 0
