"""``rankcut generate MODEL --prompt TEXT``: text from a checkpoint or model directory
(:func:`rankcut.bench.generate.generate`), streamed for one prompt, and the speed at the end.

The text goes to standard output (the prompt, then its continuation; several prompts each under a
``--- prompt i/n ---`` line, printed when all are done); the summary line (tokens, seconds, tokens/s, which
loop ran) and any fallback notice go to standard error.
"""

from __future__ import annotations

import argparse
import sys

from rankcut import report
from rankcut.cli import CLIError, flags


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="generate text (static KV cache and CUDA graphs on a GPU) and print tokens/s",
                       description="Generate a continuation of each prompt, all prompts in one batch: rankcut's "
                                   "fast loop on CUDA for the Llama family and GPT-2, else Hugging Face generate.")
    flags.add_model(g, "rankcut checkpoint, local model directory or Hub id")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompt-file", metavar="FILE",
                   help="more prompts: one per line of this file (blank lines skipped)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help=flags.helptext("tokens to generate per prompt", 64))
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help=flags.helptext("sampling temperature; 0 is greedy decoding", 0.0))
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help=flags.helptext("nucleus sampling mass in (0, 1]; needs --temperature > 0", 1.0))
    g.add_argument("--seed", type=int, metavar="S",
                   help="sampling seed: the same seed gives the same text (default: random; no effect on greedy "
                        "decoding)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a prompt's text once it contains STR, cut before it (repeatable)")
    g.add_argument("--engine", default="auto", choices=["auto", "fast", "hf"],
                   help=flags.helptext("fast: rankcut's static-cache loop (eager off CUDA); hf: Hugging Face "
                                       "generate; auto: fast on CUDA where supported, else hf", "auto"))
    flags.add_device(g)
    flags.add_dtype(g)
    g.add_argument("--no-graph", action="store_true", help="fast loop: run the decode step eagerly, no CUDA graph")
    g.add_argument("--json", metavar="FILE", help="write the texts, token ids and speed as JSON here")
    flags.add_quiet(g)
    return g


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except OSError as err:
            raise CLIError(f"--prompt-file {args.prompt_file}: {err.strerror or err}") from None
    if not prompts:
        raise CLIError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    from rankcut.fuse import prepare_for_inference
    from rankcut.bench.generate import check_settings, choose_engine, format_summary, generate, tokenize_prompts
    from rankcut.hf import load_any
    from rankcut.utils import resolve_device

    check_settings(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.stop, args.engine)
    prompts = read_prompts(args)
    empty = [i for i, p in enumerate(prompts, 1) if not p]
    if empty:
        raise CLIError(f"prompt {empty[0]} is empty")
    device = resolve_device(args.device)
    model, tokenizer = load_any(args.model, flags.compute_dtype(args.dtype, device), device)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer")
    rows = tokenize_prompts(model, tokenizer, prompts, args.max_new_tokens)  # bad prompts fail before any output
    engine = choose_engine(model, args.engine, max(len(r) for r in rows) + args.max_new_tokens)
    if engine == "hf" and device.type == "cuda":
        prepare_for_inference(model)  # fused q/k/v and gate/up in Hugging Face's forward too
    def show(row: int, text: str) -> None:
        print(text, end="", flush=True)

    stream = show if len(prompts) == 1 else None  # one prompt: its text as it comes, after the prompt
    if stream is not None:
        print(prompts[0], end="", flush=True)
    result = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, stop=args.stop, seed=args.seed, stream=stream, engine=engine,
                      use_graph=False if args.no_graph else None)
    if stream is not None:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(prompts, result.texts), 1):
            print(f"--- prompt {i}/{len(prompts)} ---")
            print(prompt + text)
    print(format_summary(result), file=sys.stderr)
    if args.json:
        data = {"prompts": prompts, "texts": result.texts, "token_ids": result.token_ids,
                "finish_reasons": result.finish_reasons, "new_tokens": result.new_tokens, "seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s, "prefill_seconds": result.prefill_seconds,
                "decode_tokens_per_s": result.decode_tokens_per_s, "engine": result.engine, "cuda_graph": result.cuda_graph,
                "settings": result.settings, **report.invocation(args.argv, device)}
        report.write_json(args.json, data)
    return 0
