"""``rankcut eval MODEL [--baseline B]``: perplexity (:func:`rankcut.perplexity`), zero-shot tasks
(:mod:`rankcut.evaluate.tasks`, lm-evaluation-harness) and encoder embedding fidelity
(:mod:`rankcut.evaluate.fidelity`), side by side with a baseline."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from rankcut import report
from rankcut.cli import CLIError, flags

#: Below this many batches per text no time estimate is printed (it would take as long as the evaluation).
ESTIMATE_MIN_BATCHES = 5


def add_parser(sub) -> argparse.ArgumentParser:
    from rankcut.evaluate.fidelity import DEFAULT_MAX_SENTENCES
    from rankcut.evaluate.tasks import TASKS

    e = sub.add_parser("eval", help="evaluate perplexity and zero-shot tasks of a model or checkpoint",
                       description="Evaluate a model or checkpoint, optionally side by side with a baseline.")
    flags.add_model(e, "rankcut checkpoint, local model directory or Hub id")
    e.add_argument("--ppl", action="append", default=[], metavar="TEXT",
                   help="perplexity on this text file or dataset name (repeatable)")
    e.add_argument("--tasks", help=f"comma-separated zero-shot tasks: with --data-dir {','.join(TASKS)}; without, any "
                                   "lm-evaluation-harness task on its Hub data")
    e.add_argument("--data-dir", help="offline task files, laid out like ../shared/data (piqa/, arc/, ...)")
    e.add_argument("--harness", action="store_true",
                   help="accepted for compatibility, no effect: lm-evaluation-harness scores every task")
    e.add_argument("--limit", type=int, help="evaluate only the first N items of each task (default: all)")
    e.add_argument("--baseline", help="also evaluate this model (the dense one, or another checkpoint) side by side")
    e.add_argument("--seq-len", type=int, help=flags.helptext("perplexity window length in tokens",
                                                              default_text="min(2048, the model's maximum)"))
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows of each text (default: all)")
    e.add_argument("--batch-size", type=int, default=8, help=flags.helptext("windows (or items) per forward pass", 8))
    flags.add_device(e)
    flags.add_dtype(e)
    e.add_argument("--fidelity", action="append", default=[], metavar="TEXT",
                   help="encoders: embedding fidelity against --baseline on the lines of this text file (repeatable)")
    e.add_argument("--max-sentences", type=int, default=DEFAULT_MAX_SENTENCES,
                   help=flags.helptext("--fidelity: use the first N sentences", DEFAULT_MAX_SENTENCES))
    e.add_argument("--runtime-plan", metavar="FILE",
                   help="runtime activation decomposition plan (JSON: layers, rank, mode, outlier_fraction, thresholds) "
                        "applied to the model evaluated (not to --baseline)")
    e.add_argument("--runtime-calib", metavar="TEXT",
                   help="text to calibrate the plan's outlier thresholds on when it has none (first 32 windows)")
    e.add_argument("--json", metavar="FILE", help="write results as JSON here")
    e.add_argument("--markdown", metavar="FILE", help="write the side-by-side tables as Markdown here")
    flags.add_quiet(e)
    return e


def parse_tasks(args: argparse.Namespace) -> list[str]:
    """``--tasks a,b``: with ``--data-dir``, the offline tasks; without, any lm-eval task on its Hub data."""
    if not args.tasks:
        if args.data_dir or args.limit is not None or args.harness:
            raise CLIError("--data-dir/--limit/--harness apply to --tasks; give --tasks too")
        return []
    from rankcut.evaluate.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks: no task named")
    if not args.data_dir:
        return tasks  # lm-eval checks the names against its own index
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CLIError(f"--tasks: unknown offline task(s) {', '.join(unknown)}; with --data-dir the tasks are "
                       f"{', '.join(TASKS)} (drop --data-dir to run any lm-eval task on its Hub data)")
    if not os.path.isdir(os.path.expanduser(args.data_dir)):
        raise CLIError(f"--data-dir {args.data_dir} is not a directory")
    return tasks


def run_tasks(args: argparse.Namespace, model, tokenizer, tasks: list[str], device) -> dict:
    if args.data_dir:
        from rankcut.evaluate.tasks import evaluate_tasks

        return evaluate_tasks(model, tokenizer, tasks, args.data_dir, args.limit, args.batch_size, device, not args.quiet)
    from rankcut.evaluate.harness import evaluate_harness

    return evaluate_harness(model, tokenizer, tasks, None, args.limit, args.batch_size, progress=not args.quiet)


def perplexities(args: argparse.Namespace, model, tokenizer, label: str, device) -> dict:
    """Perplexity of each ``--ppl`` text, each announced by one line (windows, tokens and, on a CPU, a time
    estimate from one timed batch), its progress bar labelled ``ppl TEXT (label)``."""
    from rankcut.data import source_name, token_stream
    from rankcut.evaluate import perplexity
    from rankcut.utils import default_seq_len

    seq_len = args.seq_len or default_seq_len(model)
    out = {}
    for text in args.ppl:
        name = source_name(text)
        ids = token_stream(text, tokenizer, split="test")
        windows = ids.numel() // seq_len
        evaluated = windows if args.max_windows is None else min(windows, args.max_windows)
        if evaluated >= 1:
            estimate = None
            batches = math.ceil(evaluated / args.batch_size)
            if device.type == "cpu" and batches >= ESTIMATE_MIN_BATCHES:
                start = time.perf_counter()
                perplexity(model, tokenizer, ids[: args.batch_size * seq_len], seq_len, None, args.batch_size, device,
                           False)
                estimate = (time.perf_counter() - start) * batches
            print(report.windows_line(name, label, ids.numel(), seq_len, evaluated, estimate, args.batch_size,
                                      device.type), flush=True)
        out[name] = perplexity(model, tokenizer, ids, seq_len, args.max_windows, args.batch_size, device,
                               not args.quiet, label=f"{name} ({label})")
    return out


def evaluate_one(args, spec: str, label: str, tasks: list[str], sentences: dict, dtype, device) -> dict:
    """Everything asked of one model: ``{"model", "params", "perplexity", "settings", "tasks"?, ...}``."""
    from rankcut.evaluate.fidelity import sentence_embeddings
    from rankcut.hf import load_any
    from rankcut.record import get_record
    from rankcut.utils import count_params, default_seq_len

    model, tokenizer = load_any(spec, dtype, device)
    if tokenizer is None:
        raise CLIError(f"{spec} has no tokenizer; perplexity on text, tasks and fidelity need one")
    record = get_record(model)
    plan = None
    if getattr(args, "runtime_plan", None) and spec == args.model:
        plan = apply_plan_file(model, tokenizer, args.runtime_plan, args.runtime_calib, args.seq_len, args.batch_size)
    for line in report.held_out_notes(spec, record, args.ppl):
        print(line)
    result = {"model": spec, "params": count_params(model), "perplexity": perplexities(args, model, tokenizer, label, device),
              "settings": {"seq_len": args.seq_len or default_seq_len(model), "max_windows": args.max_windows,
                           "batch_size": args.batch_size}}
    if record is not None:
        result["keep_model"] = record.keep_model
    if plan is not None:
        from rankcut.runtime import extracted_fractions

        result["runtime_plan"] = plan.to_json()
        result["outliers_extracted"] = extracted_fractions(model)
    if tasks:
        result["tasks"] = run_tasks(args, model, tokenizer, tasks, device)
    if sentences:
        result["_embeddings"] = {name: sentence_embeddings(model, tokenizer, s, args.batch_size, device)
                                 for name, s in sentences.items()}
    return result


def apply_plan_file(model, tokenizer, path: str, calib: str | None, seq_len: int | None, batch_size: int):
    """Read a runtime plan, calibrate its thresholds on ``calib`` if it needs them, apply it to ``model``."""
    import json

    from rankcut.data import calibration_windows
    from rankcut.runtime import RuntimePlan, apply_runtime
    from rankcut.utils import default_seq_len

    try:
        plan = RuntimePlan.from_json(json.loads(Path(os.path.expanduser(path)).read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise CLIError(f"--runtime-plan {path}: {err}") from None
    window = seq_len or default_seq_len(model)
    windows = None
    if plan.outlier_fraction > 0 and not plan.thresholds:
        if not calib:
            raise CLIError(f"--runtime-plan {path} has an outlier fraction but no thresholds: give --runtime-calib TEXT")
        flags.check_sources(runtime_calib=[calib])
        windows = calibration_windows(os.path.expanduser(calib), tokenizer, 32, window, 0, "first")
    if plan.rank > window:
        raise CLIError(f"--runtime-plan {path}: rank {plan.rank} is larger than the sequence ({window} tokens per window)")
    try:
        apply_runtime(model, plan, windows, batch_size)
    except ValueError as err:
        raise CLIError(f"--runtime-plan {path}: {err}") from None
    return plan


def run(args: argparse.Namespace) -> int:
    from rankcut.evaluate.fidelity import compare_embeddings, read_sentences
    from rankcut.io import is_checkpoint
    from rankcut.utils import resolve_device

    tasks = parse_tasks(args)
    if args.fidelity and not args.baseline:
        raise CLIError("--fidelity compares against the dense model: give --baseline DENSE")
    if not args.ppl and not tasks and not args.fidelity:
        raise CLIError("nothing to evaluate: give at least one --ppl TEXT, --tasks NAMES, or --fidelity TEXT")
    flags.check_sources(ppl=args.ppl, fidelity=args.fidelity)
    sentences = {Path(t).stem: read_sentences(os.path.expanduser(t), args.max_sentences) for t in args.fidelity}
    device = resolve_device(args.device)
    dtype = flags.compute_dtype(args.dtype, device)

    mine = report.model_label(args.model, is_checkpoint(os.path.expanduser(args.model)))
    output = evaluate_one(args, args.model, mine, tasks, sentences, dtype, device)
    label = None
    if args.baseline:
        label = report.baseline_label(args.baseline, is_checkpoint(os.path.expanduser(args.baseline)))
        output["baseline"] = {**evaluate_one(args, args.baseline, label, tasks, sentences, dtype, device),
                              "label": label}
    if sentences:
        ours, theirs = output.pop("_embeddings"), output["baseline"].pop("_embeddings")
        output["fidelity"] = {name: compare_embeddings(ours[name], theirs[name]) for name in ours}
    output.update(report.invocation(args.argv, device))
    base = output.get("baseline")
    if output["perplexity"]:
        print(report.perplexity_table(output["perplexity"], base and base["perplexity"], label or report.DENSE_LABEL))
    if tasks:
        print(report.task_table(output["tasks"], base and base["tasks"], label or report.DENSE_LABEL))
    if base is not None:
        print(report.params_line(output["params"], base["params"], label, base.get("keep_model")))
    if sentences:
        print(report.fidelity_table(output["fidelity"], label))
    report.write_json(args.json, output)
    if args.markdown:
        report.write_text(args.markdown, report.markdown_report(output))
    return 0
