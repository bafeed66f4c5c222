"""Command line: ``rankcut compress`` and ``rankcut eval``, thin wrappers over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger("rankcut")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    pass


# ------------------------------------------------------------------------------------------- helpers


def _looks_local(spec: str) -> bool:
    """Paths are local; Hub ids are ``name`` or ``org/name``."""
    return os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def resolve_dtype(name: str, device: str) -> torch.dtype | None:
    """``auto``: float32 on CPU, the stored dtype on a GPU."""
    if name == "auto":
        return torch.float32 if device == "cpu" else None
    return DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name} requested but no CUDA device is available")
    return name


def load_model(spec: str, dtype: torch.dtype | None, device: str | None = None):
    """A model and its tokenizer from a rankcut checkpoint, a local Hugging Face directory or a Hub id."""
    import transformers

    from rankcut.io import is_checkpoint, load

    expanded = os.path.expanduser(spec)
    if is_checkpoint(expanded):
        model = load(expanded, device=device, dtype=dtype)
    else:
        if _looks_local(spec) and not os.path.isdir(expanded):
            raise CLIError(f"model path {spec} does not exist")
        if os.path.isdir(expanded) and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise CLIError(f"{spec} is not a model directory (no config.json)")
        try:
            config = transformers.AutoConfig.from_pretrained(expanded)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot load model {spec}: {err}") from None
        arch = (config.architectures or [""])[0]
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            cls = transformers.AutoModelForCausalLM
        else:
            cls = getattr(transformers, arch, None) or transformers.AutoModel
        kwargs = {"dtype": dtype} if dtype is not None else {}
        try:
            model = cls.from_pretrained(expanded, **kwargs)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot load model {spec}: {err}") from None
        if device:
            model.to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(expanded)
    except (OSError, ValueError, TypeError) as err:
        log.warning("no tokenizer for %s (%s)", spec, err)
        tokenizer = None
    return model, tokenizer


def environment() -> dict:
    import transformers

    from rankcut import __version__

    info = {
        "rankcut": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    for name in ("lm_eval", "peft", "triton"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def invocation(args: argparse.Namespace) -> dict:
    """The command line that produced an output (to re-run it) and the environment it ran in."""
    import shlex

    argv = getattr(args, "argv", None)
    argv = ["rankcut", *(sys.argv[1:] if argv is None else argv)]
    return {"command": shlex.join(argv), "argv": argv, "environment": environment()}


def _write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically (a hidden temporary beside it, then a rename): never half-written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        _write_text(path, json.dumps(data, indent=2, default=str))


def parse_override(text: str) -> tuple[str, dict]:
    """``PATTERN=keep:0.9`` / ``PATTERN=rank:64`` / ``PATTERN=energy:0.95`` / ``PATTERN=dense``."""
    pattern, sep, rule = text.rpartition("=")
    if not sep or not pattern:
        raise CLIError(f"--override {text!r}: expected PATTERN=keep:X, PATTERN=energy:X, PATTERN=rank:N or PATTERN=dense")
    if rule == "dense":
        return pattern, {"dense": True}
    key, _, value = rule.partition(":")
    try:
        number = int(value) if key == "rank" else float(value)
    except ValueError:
        raise CLIError(f"--override {text!r}: {value!r} is not a number") from None
    if key not in ("keep", "energy", "rank"):
        raise CLIError(f"--override {text!r}: rule must be keep:, energy:, rank: or dense")
    return pattern, {key: number}


# ------------------------------------------------------------------------------------------ commands


def compress_config(args: argparse.Namespace, **fixed):
    """A CompressConfig from the compression flags shared by ``compress`` and ``sweep`` (plus ``fixed``)."""
    from rankcut import CompressConfig

    return CompressConfig(
        overrides=dict(parse_override(o) for o in args.override),
        include=args.include,
        exclude=args.exclude,
        solver=args.solver,
        oversample=args.oversample,
        power_iters=args.power_iters,
        alpha=args.alpha,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        sampling=args.sampling,
        batch_size=args.batch_size,
        layerwise=not args.full_model,
        svd_dtype=args.svd_dtype,
        **fixed,
    )


def add_compress_flags(p: argparse.ArgumentParser) -> None:
    """Target selection, per-target overrides, solver and calibration flags of ``compress`` and ``sweep``."""
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=RULE",
                   help="per-target rule, e.g. 're:down_proj=keep:0.9', 'model.layers.0.mlp.up_proj=dense'")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="select targets by name (exact or re:REGEX)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="remove targets by name (exact or re:REGEX)")
    p.add_argument("--solver", default="exact", help="exact or randomized")
    p.add_argument("--oversample", type=int, default=16, help="randomized SVD oversampling (default 16)")
    p.add_argument("--power-iters", type=int, default=2, help="randomized SVD power iterations (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD activation exponent (default 0.5)")
    p.add_argument("--svd-dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, help="calibration window length (default min(2048, model max))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", default="random", choices=["random", "first"], help="random or first windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--full-model", action="store_true", help="hook the whole model at once instead of block by block")


def cmd_compress(args: argparse.Namespace) -> int:
    from rankcut import compress_, save
    from rankcut.io import check_output

    config = compress_config(args, method=args.method, keep=args.keep, energy=args.energy, rank=args.rank,
                             sequential=args.sequential)
    output = Path(args.output)
    check_output(output, args.overwrite)  # before any work: fail fast, write nothing
    from rankcut.methods import get_method

    if get_method(config.method).stat is not None and args.calib is None:
        raise CLIError(f"method {config.method} needs --calib (a text file or dataset name)")
    if args.calib is not None and isinstance(args.calib, str) and not os.path.exists(args.calib):
        from rankcut.data import DATASETS

        if args.calib not in DATASETS:
            raise CLIError(f"--calib {args.calib}: no such file, and not a known dataset ({', '.join(DATASETS)})")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device))
    summary = compress_(model, config, calib=args.calib, tokenizer=tokenizer, device=device, progress=not args.quiet)
    print(summary.table())
    save(model, output, tokenizer=tokenizer, overwrite=args.overwrite)
    _write_json(args.summary_json, {"summary": summary.to_dict(), "config": config.to_dict(), **invocation(args)})
    print(f"saved {output}")
    return 0


def _format_table(names: list[str], result: dict, baseline: dict | None) -> str:
    lines = []
    if baseline is None:
        lines.append(f"{'text':<28} {'perplexity':>12}")
        for name in names:
            lines.append(f"{name:<28} {result[name]:>12.4f}")
    else:
        lines.append(f"{'text':<28} {'dense':>12} {'compressed':>12} {'change':>9}")
        for name in names:
            dense, comp = baseline[name], result[name]
            lines.append(f"{name:<28} {dense:>12.4f} {comp:>12.4f} {100 * (comp / dense - 1):>+8.2f}%")
    return "\n".join(lines)


def _parse_tasks(args: argparse.Namespace) -> list[str]:
    """``--tasks a,b``: with ``--data-dir``, the offline tasks (rankcut's scorer, or lm-eval's with
    ``--harness``); without, any lm-evaluation-harness task on its Hub data."""
    if not args.tasks:
        if args.data_dir or args.limit is not None or args.harness:
            raise CLIError("--data-dir/--limit/--harness apply to --tasks; give --tasks too")
        return []
    from rankcut.evaluate.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks: no task named")
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be >= 1")
    if not args.data_dir:
        return tasks  # lm-eval checks the names against its own index
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CLIError(f"--tasks: unknown offline task(s) {', '.join(unknown)}; with --data-dir the tasks are "
                       f"{', '.join(TASKS)} (drop --data-dir to run any lm-eval task on its Hub data)")
    if not os.path.isdir(os.path.expanduser(args.data_dir)):
        raise CLIError(f"--data-dir {args.data_dir} is not a directory")
    return tasks


def _run_tasks(args: argparse.Namespace, model, tokenizer, tasks: list[str], device) -> dict:
    """The ``--tasks`` of ``rankcut eval``: rankcut's offline scorer, or lm-evaluation-harness."""
    if args.data_dir and not args.harness:
        from rankcut.evaluate.tasks import evaluate_tasks

        return evaluate_tasks(model, tokenizer, tasks, args.data_dir, args.limit, args.batch_size, device, not args.quiet)
    from rankcut.evaluate.harness import evaluate_harness

    try:
        return evaluate_harness(model, tokenizer, tasks, args.data_dir, args.limit, args.batch_size)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _task_rows(result: dict, baseline: dict | None) -> list[tuple]:
    """``(task, metric, dense, value, change, unit, n, stderr)`` per task and metric; ``dense``/``change`` are
    None without a baseline, ``stderr`` (of ``value``) is "" where not reported. The change is in percent for
    perplexity, in accuracy points otherwise."""
    rows = []
    for task, metrics in result.items():
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith("_stderr"):  # standard errors stay in the JSON
                continue
            dense = change = unit = None
            if baseline is not None:
                dense = baseline[task][metric]
                change, unit = (100 * (value / dense - 1), "%") if metric == "perplexity" else (100 * (value - dense), "pt")
            err = metrics.get(f"{metric}_stderr")
            err = f"{err:.4f}" if isinstance(err, float) and math.isfinite(err) else ""
            rows.append((task, metric, dense, value, change, unit, metrics.get("n", ""), err))
    return rows


def _format_task_table(result: dict, baseline: dict | None) -> str:
    """One row per task and metric; with a baseline, dense vs compressed and the change
    (accuracy: points; perplexity: percent)."""
    if baseline is None:
        lines = [f"{'task':<16} {'metric':<11} {'value':>10} {'± s.e.':>8} {'n':>7}"]
    else:
        lines = [f"{'task':<16} {'metric':<11} {'dense':>10} {'compressed':>10} {'± s.e.':>8} {'change':>9} {'n':>7}"]
    for task, metric, dense, value, change, unit, n, err in _task_rows(result, baseline):
        if dense is None:
            lines.append(f"{task:<16} {metric:<11} {value:>10.4f} {err:>8} {n:>7}")
        else:
            text = f"{change:>+8.2f}%" if unit == "%" else f"{change:>+7.2f}pt"
            lines.append(f"{task:<16} {metric:<11} {dense:>10.4f} {value:>10.4f} {err:>8} {text:>9} {n:>7}")
    return "\n".join(lines)


def _format_fidelity_table(fidelity: dict) -> str:
    """Markdown: one row per text and metric, dense (the model against itself: 1) vs compressed."""
    lines = ["| text | metric | dense | compressed | change | n |", "|---|---|---|---|---|---|"]
    for name, values in fidelity.items():
        for metric in ("mean_cosine", "min_cosine", "nn_agreement"):
            value = values[metric]
            lines.append(f"| {name} | {metric} | 1.0000 | {value:.4f} | {value - 1:+.4f} | {values['n']} |")
    return "\n".join(lines)


def _markdown_report(output: dict, tasks: list[str]) -> str:
    """The dense-vs-compressed tables of ``rankcut eval`` as a Markdown document."""
    base = output.get("baseline")
    parts = [f"# rankcut eval: {output['model']}", ""]
    if base is not None:
        parts += [f"Baseline (dense): {base['model']}; parameters: dense {base['params']:,}, compressed "
                  f"{output['params']:,} ({output['params'] / base['params']:.4f}).", ""]
    if output["perplexity"]:
        parts += ["## Perplexity", ""]
        if base is None:
            parts += ["| text | perplexity |", "|---|---|"]
            parts += [f"| {name} | {value:.4f} |" for name, value in output["perplexity"].items()]
        else:
            parts += ["| text | dense | compressed | change |", "|---|---|---|---|"]
            for name, comp in output["perplexity"].items():
                dense = base["perplexity"][name]
                parts.append(f"| {name} | {dense:.4f} | {comp:.4f} | {100 * (comp / dense - 1):+.2f}% |")
        parts.append("")
    if tasks:
        parts += ["## Tasks", ""]
        if base is None:
            parts += ["| task | metric | value | ± s.e. | n |", "|---|---|---|---|---|"]
        else:
            parts += ["| task | metric | dense | compressed | ± s.e. | change | n |", "|---|---|---|---|---|---|---|"]
        for task, metric, dense, value, change, unit, n, err in _task_rows(output["tasks"], base and base["tasks"]):
            if dense is None:
                parts.append(f"| {task} | {metric} | {value:.4f} | {err} | {n} |")
            else:
                parts.append(f"| {task} | {metric} | {dense:.4f} | {value:.4f} | {err} | {change:+.2f}{unit} | {n} |")
        parts.append("")
    if output.get("fidelity"):
        parts += ["## Embedding fidelity", "", _format_fidelity_table(output["fidelity"]), ""]
    return "\n".join(parts)


def cmd_eval(args: argparse.Namespace) -> int:
    from rankcut.compress import count_params
    from rankcut.evaluate import evaluate

    tasks = _parse_tasks(args)
    fidelity_texts = getattr(args, "fidelity", None) or []
    if fidelity_texts:
        if not args.baseline:
            raise CLIError("--fidelity compares against the dense model: give --baseline DENSE")
        if args.max_sentences < 2:
            raise CLIError("--max-sentences must be >= 2")
        for text in fidelity_texts:
            if not os.path.isfile(os.path.expanduser(text)):
                raise CLIError(f"--fidelity {text}: no such file")
    if not args.ppl and not tasks and not fidelity_texts:
        raise CLIError("nothing to evaluate: give at least one --ppl TEXT, --tasks NAMES, or --fidelity TEXT")
    if args.max_windows is not None and args.max_windows < 1:
        raise CLIError("--max-windows must be >= 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    def run(spec: str) -> tuple[dict, int]:
        model, tokenizer = load_model(spec, dtype, device)
        if tokenizer is None:
            raise CLIError(f"{spec} has no tokenizer; perplexity on text and tasks need one")
        _tuning_note(spec, model, args.ppl)
        result = evaluate(model, tokenizer, args.ppl, args.seq_len, args.max_windows, args.batch_size, device, not args.quiet)
        if tasks:
            result["tasks"] = _run_tasks(args, model, tokenizer, tasks, device)
        if fidelity_texts:
            from rankcut.evaluate.fidelity import read_sentences, sentence_embeddings

            result["_embeddings"] = {
                Path(text).stem: sentence_embeddings(
                    model, tokenizer, read_sentences(os.path.expanduser(text), args.max_sentences), args.batch_size, device
                )
                for text in fidelity_texts
            }
        return result, count_params(model)

    result, params = run(args.model)
    output = {"model": args.model, "params": params, **result}
    baseline = None
    if args.baseline:
        base_result, base_params = run(args.baseline)
        baseline = base_result["perplexity"]
        output["baseline"] = {"model": args.baseline, "params": base_params, **base_result}
    if fidelity_texts:
        from rankcut.evaluate.fidelity import compare_embeddings

        embeddings, dense_embeddings = output.pop("_embeddings"), output["baseline"].pop("_embeddings")
        output["fidelity"] = {name: compare_embeddings(embeddings[name], dense_embeddings[name]) for name in embeddings}
    output.update(invocation(args))
    if result["perplexity"]:
        print(_format_table(list(result["perplexity"]), result["perplexity"], baseline))
    if tasks:
        print(_format_task_table(result["tasks"], output["baseline"]["tasks"] if baseline is not None else None))
    if baseline is not None:
        print(f"parameters: dense {output['baseline']['params']:,}, compressed {params:,} ({params / output['baseline']['params']:.4f})")
    if fidelity_texts:
        print(_format_fidelity_table(output["fidelity"]))
    _write_json(args.json, output)
    if getattr(args, "markdown", None):
        _write_text(args.markdown, _markdown_report(output, tasks))
    return 0


def _parse_thresholds(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--thresholds {text!r}: expected comma-separated numbers in (0, 1], e.g. 0.8,0.9,0.99") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from rankcut.analyze import analyze, check_thresholds, render_markdown
    from rankcut.plots import _pyplot, write_plots

    thresholds = check_thresholds(_parse_thresholds(args.thresholds))
    output = Path(args.output)
    from rankcut.io import check_output

    check_output(output, args.overwrite, marker="report.json", kind="rankcut analyze report")  # before any work
    try:
        _pyplot()
    except ImportError as err:
        raise CLIError(str(err)) from None
    if args.calib is not None and not os.path.exists(args.calib):
        from rankcut.data import DATASETS

        if args.calib not in DATASETS:
            raise CLIError(f"--calib {args.calib}: no such file, and not a known dataset ({', '.join(DATASETS)})")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device))
    if args.calib is not None and tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; --calib text needs one")
    report = analyze(
        model, thresholds, calib=args.calib, tokenizer=tokenizer, calib_samples=args.calib_samples,
        seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size, include=args.include or None,
        exclude=args.exclude or None, device=device, progress=not args.quiet,
    )
    info = {"model": args.model, **invocation(args)}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o755)
    try:  # written beside the output and renamed into place: an interrupted run leaves no half report
        plots = write_plots(report, staging)
        (staging / "report.json").write_text(json.dumps({**info, **report.to_dict()}, indent=1))
        (staging / "report.md").write_text(render_markdown(report, info, [p.name for p in plots]))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(report.summary_table("weight"))
    if "whiten" in report.kinds:
        print("\nactivation-aware (W·L):")
        print(report.summary_table("whiten"))
    print(f"wrote {output}/report.json, report.md, {', '.join(p.name for p in plots)}")
    return 0


def _parse_list(flag: str, text: str, kind=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected a comma-separated list of numbers") from None


def cmd_sweep(args: argparse.Namespace) -> int:

    from rankcut.methods import available_methods, get_method
    from rankcut.sweep import check_grid, sweep

    methods = _parse_list("--methods", args.methods)
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise CLIError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(available_methods())}")
    keeps = _parse_list("--keep", args.keep, float)
    bad = [k for k in keeps if not 0 < k <= 1]
    if bad:
        raise CLIError(f"--keep: values must be in (0, 1], got {', '.join(map(str, bad))}")
    check_grid(methods, keeps)
    base = compress_config(args)  # validates the shared settings before any work
    if not args.ppl:
        raise CLIError("sweep needs at least one --ppl TEXT")
    if args.max_windows is not None and args.max_windows < 1:
        raise CLIError("--max-windows must be >= 1")
    if any(get_method(m).stat for m in methods) and args.calib is None:
        raise CLIError("methods " + ", ".join(m for m in methods if get_method(m).stat) + " need --calib")
    for flag, source in [("--calib", args.calib)] + [("--ppl", p) for p in args.ppl]:
        _check_source(flag, source)
    try:
        from rankcut.plots import _pyplot

        _pyplot()
    except ImportError as err:
        raise CLIError(str(err)) from None
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device), device)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; calibration and perplexity need one")
    info = {"model": args.model, "seed": args.seed, "device": device, **invocation(args)}
    results = sweep(
        model, tokenizer, args.output, methods, keeps, calib=args.calib, ppl=args.ppl, calib_samples=args.calib_samples,
        seq_len=args.seq_len, seed=args.seed, max_windows=args.max_windows, eval_seq_len=args.eval_seq_len,
        batch_size=args.batch_size, device=device, overwrite=args.overwrite, progress=not args.quiet, info=info,
        base=base,
    )
    from rankcut.sweep import render_markdown

    print(render_markdown(results))
    print(f"wrote {args.output}/results.json, results.md, quality_vs_keep.png "
          f"({len(results['computed'])} of {len(results['points'])} points computed now)")
    return 0


def _check_source(flag: str, source: str | None) -> None:
    """A text source must be an existing file or a known dataset name."""
    if source is not None and not os.path.exists(os.path.expanduser(source)):
        from rankcut.data import DATASETS

        if source not in DATASETS:
            raise CLIError(f"{flag} {source}: no such file, and not a known dataset ({', '.join(DATASETS)})")


def _tuning_note(spec: str, model, texts: list[str]) -> None:
    """Print which data tuned a recovered checkpoint, and flag evaluation texts that were tuning data."""
    from rankcut.data import source_name

    recovery = (getattr(model, "rankcut_record", None) or {}).get("recovery")
    if not recovery:
        return
    tuned = {d["source"] for d in recovery["data"]}
    print(f"note: {spec} was tuned by rankcut recover on {', '.join(sorted(tuned))} "
          f"({recovery['tokens_tuned']:,} tokens); only text it was not tuned on measures recovery")
    for text in texts:
        if source_name(text) in tuned and os.path.isfile(os.path.expanduser(text)):
            print(f"warning: {text} looks like tuning data ({source_name(text)}): its perplexity is not a held-out figure")


def cmd_recover(args: argparse.Namespace) -> int:
    from rankcut.config import RecoverConfig
    from rankcut.io import check_output, is_checkpoint, read_manifest, save
    from rankcut.recover import check_held_out, recover_

    spec = os.path.expanduser(args.model)
    if not os.path.isdir(spec):
        raise CLIError(f"checkpoint directory {args.model} does not exist")
    if not is_checkpoint(spec):
        raise CLIError(f"{args.model} is not a rankcut checkpoint (no rankcut.json): run rankcut compress first")
    read_manifest(spec)
    distill = (1.0 if args.dense else 0.0) if args.distill is None else args.distill
    config = RecoverConfig(
        mode=args.mode, init=args.init, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, seed=args.seed, distill=distill, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
        eval_windows=args.eval_windows, save_every=args.save_every,
    )
    output = Path(args.output)
    check_output(output, args.overwrite)  # before any work: fail fast, write nothing
    if output.resolve() == Path(spec).resolve():
        raise CLIError("the output must not be the input checkpoint")
    for flag, source in [("--data", d) for d in args.data] + [("--eval", args.eval), ("--calib", args.calib)]:
        _check_source(flag, source)
    check_held_out(args.data, args.eval)
    import importlib.util

    if config.mode == "factors" and importlib.util.find_spec("peft") is None:
        raise CLIError("--mode factors needs PEFT: pip install 'rankcut[recover]' (or use --mode grow)")
    if config.mode == "grow" and config.init == "residual" and not args.dense:
        raise CLIError("--mode grow --init residual needs --dense MODEL: the next singular directions of the "
                       "residual W - UV need the dense W, which the checkpoint no longer holds")
    if config.distill > 0 and not args.dense:
        raise CLIError("--distill needs --dense MODEL: the dense model is the teacher")
    device = resolve_device(args.device)
    work = Path(args.work_dir) if args.work_dir else output.parent / f".{output.name}.recover-work"
    model, tokenizer = load_model(spec, None)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; recovery needs one to read the tuning text")
    stored = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.to(DTYPES[args.dtype])
    dense = load_model(args.dense, DTYPES[args.dtype])[0] if args.dense else None
    if config.distill == 0:
        print("note: next-token loss on the tuning text only; with --dense MODEL (the model this checkpoint was "
              "compressed from) recovery distils from it instead, which held-out text favoured in BENCHMARKS.md")
    print(f"tuning data: {', '.join(args.data)}; training state saved every {config.save_every} steps in {work} "
          "(re-run the same command to resume)")
    try:
        result = recover_(model, tokenizer, args.data, config, eval_text=args.eval, dense=dense, calib=args.calib,
                          work_dir=work, restart=args.restart, device=device, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"rankcut: interrupted; the state of the last save is in {work}: re-run the same command to resume",
              file=sys.stderr)
        return 130
    model.to(stored)
    save(model, output, tokenizer=tokenizer, overwrite=args.overwrite)
    if not args.keep_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(result.report())
    print(f"saved {output}")
    _write_json(args.json, {"recovery": result.record, **invocation(args)})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``rankcut bench``: decode speed through rankcut's static-cache CUDA-graph loop (rankcut.bench.run)."""
    from rankcut.bench.run import bench, check_args, check_spec, format_table

    check_args(args.batch, args.prompt_len, args.new_tokens, args.repeats, args.random_lowrank)
    for spec in [args.model] + ([args.compare] if args.compare else []):
        check_spec(spec)
    dtype = DTYPES[args.dtype]
    result = bench(args.model, compare=args.compare, random_lowrank=args.random_lowrank, batch=args.batch,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, dtype=dtype,
                   device=args.device, fuse=not args.no_fuse, use_graph=False if args.no_graph else None,
                   layers=args.layers, progress=not args.quiet)
    from rankcut.bench.timing import environment as gpu_environment

    result.update({k: v for k, v in invocation(args).items() if k != "environment"})
    result["environment"] = gpu_environment(args.device)
    print(format_table(result))
    _write_json(args.json, result)
    return 0


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from rankcut import __version__
    from rankcut.methods import available_methods

    parser = argparse.ArgumentParser(prog="rankcut", description="Low-rank compression of transformer models")
    parser.add_argument("--version", action="version", version=f"rankcut {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model and save a checkpoint")
    p.add_argument("model", help="Hugging Face Hub id or local model directory")
    p.add_argument("--method", default="whiten", help=f"one of {', '.join(available_methods())} (default whiten)")
    alloc = p.add_mutually_exclusive_group()
    alloc.add_argument("--keep", type=float, help="fraction of the targets' parameters to keep, in (0, 1] (default 0.8)")
    alloc.add_argument("--energy", type=float, help="per-target spectral energy threshold in (0, 1]")
    alloc.add_argument("--rank", type=int, help="the same rank for every target")
    add_compress_flags(p)
    p.add_argument("--calib", help="calibration text file, or dataset name (wikitext2, ptb, c4)")
    p.add_argument("--sequential", action="store_true", help="calibrate each block on the compressed blocks' outputs")
    p.add_argument("--device", default="auto", help="where blocks are processed: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype (auto: float32 on CPU)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    p.add_argument("--summary-json", help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="evaluate perplexity and zero-shot tasks of a model or checkpoint")
    e.add_argument("model", help="rankcut checkpoint, local model directory or Hub id")
    e.add_argument("--ppl", action="append", default=[], metavar="TEXT", help="text file or dataset name (repeatable)")
    e.add_argument("--tasks", help="comma-separated zero-shot tasks: with --data-dir piqa,arc_easy,arc_challenge,"
                   "winogrande,hellaswag,lambada; without, any lm-evaluation-harness task (Hub data)")
    e.add_argument("--data-dir", help="offline task files, laid out like ../shared/data (piqa/, arc/, ...)")
    e.add_argument("--harness", action="store_true",
                   help="score the --data-dir tasks with lm-evaluation-harness itself instead of rankcut's scorer")
    e.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    e.add_argument("--baseline", help="also evaluate this (dense) model for a side-by-side table")
    e.add_argument("--seq-len", type=int, help="window length (default min(2048, model max))")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    e.add_argument("--fidelity", action="append", default=[], metavar="TEXT",
                   help="encoders: embedding fidelity against --baseline on the lines of this text file (repeatable)")
    e.add_argument("--max-sentences", type=int, default=500, help="--fidelity: use the first N sentences (default 500)")
    e.add_argument("--json", help="write results as JSON here")
    e.add_argument("--markdown", help="write the dense-vs-compressed tables as Markdown here")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("analyze", help="singular values, energy ranks, break-even and speedup bounds of every target")
    a.add_argument("model", help="Hugging Face Hub id or local model directory")
    a.add_argument("-o", "--output", required=True, help="report directory to write (report.json, report.md, PNGs)")
    a.add_argument("--thresholds", default="0.8,0.85,0.9,0.95,0.99", help="comma-separated energy thresholds in (0, 1]")
    a.add_argument("--calib", help="calibration text file or dataset name: adds the activation-aware spectra of W·L")
    a.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    a.add_argument("--seq-len", type=int, help="calibration window length (default min(2048, model max))")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--include", action="append", default=[], metavar="PATTERN", help="select targets by name (exact or re:REGEX)")
    a.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="remove targets by name (exact or re:REGEX)")
    a.add_argument("--device", default="auto", help="where SVDs and calibration run: auto, cpu, cuda, cuda:N")
    a.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype (auto: float32 on CPU)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing report directory at --output")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_analyze)
    w = sub.add_parser("sweep", help="compress at each (method, keep) pair, evaluate each, tabulate and plot")
    w.add_argument("model", help="Hugging Face Hub id or local model directory")
    w.add_argument("--methods", default="svd,asvd,whiten", help="comma-separated methods (default svd,asvd,whiten)")
    w.add_argument("--keep", default="0.9,0.8,0.6", help="comma-separated keep fractions in (0, 1] (default 0.9,0.8,0.6)")
    w.add_argument("--calib", help="calibration text file or dataset name (computed once, shared by all points)")
    w.add_argument("--ppl", action="append", default=[], metavar="TEXT", help="perplexity text file or dataset (repeatable)")
    add_compress_flags(w)
    w.add_argument("--max-windows", type=int, help="evaluate only the first N windows of each text")
    w.add_argument("--eval-seq-len", type=int, help="perplexity window length (default min(2048, model max))")
    w.add_argument("--device", default="auto")
    w.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    w.add_argument("-o", "--output", required=True, help="sweep directory (resumable: finished points are skipped)")
    w.add_argument("--overwrite", action="store_true", help="discard an existing sweep with different settings")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser("recover", help="win back quality of a compressed checkpoint: LoRA fine-tune, merged back")
    r.add_argument("model", help="rankcut checkpoint directory (from rankcut compress)")
    r.add_argument("--data", action="append", required=True, metavar="TEXT",
                   help="tuning text file or dataset name (train split); repeatable")
    r.add_argument("--eval", metavar="TEXT", help="held-out text for perplexity before, during and after (never tuning data)")
    r.add_argument("--mode", default="factors", choices=["factors", "grow"],
                   help="factors: LoRA on U and V, merged back, rank unchanged (default); grow: residual adapter, rank + lora rank")
    r.add_argument("--init", default="zero", choices=["zero", "residual"],
                   help="zero: LoRA's default; residual: grow = next residual directions (needs --dense), factors = PiSSA")
    r.add_argument("--lora-rank", type=int, default=16)
    r.add_argument("--lora-alpha", type=float, help="adapter scale numerator (default: the lora rank, scale 1)")
    r.add_argument("--lora-dropout", type=float, default=0.0)
    r.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    r.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    r.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch (default 8)")
    r.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    r.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    r.add_argument("--warmup", type=int, help="warm-up steps (default 5%% of --steps)")
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast (auto: bf16 on a GPU that has it, else fp32)")
    r.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    r.add_argument("--eval-every", type=int, help="held-out perplexity every N steps (default: 10 times per run)")
    r.add_argument("--eval-windows", type=int, default=16, help="evaluate the first N windows of --eval (default 16)")
    r.add_argument("--distill", type=float,
                   help="weight in [0, 1] of distillation from --dense (KL to its next-token distribution); "
                        "default 1 with --dense, else 0 (next-token loss only)")
    r.add_argument("--dense", help="the dense model the checkpoint came from (--mode grow --init residual, --distill)")
    r.add_argument("--calib", help="calibration text for that init's statistics (default: the first --data)")
    r.add_argument("--save-every", type=int, default=100, help="save the resumable state every N steps (default 100)")
    r.add_argument("--work-dir", help="where that state lives (default: .OUT.recover-work beside OUT)")
    r.add_argument("--restart", action="store_true", help="discard saved state instead of resuming")
    r.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights during training (default float32); the output keeps the checkpoint's dtype")
    r.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    r.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    r.add_argument("--json", help="also write the recovery record as JSON here")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_recover)
    b = sub.add_parser("bench", help="decode speed (tokens/s, GB/s, energy) with a static KV cache and CUDA graphs")
    b.add_argument("model", help="rankcut checkpoint, model directory, Hub id, or random:SHAPE (llama2-7b, llama3-8b, gpt2)")
    b.add_argument("--compare", help="dense baseline benchmarked in the same run with the identical loop")
    b.add_argument("--random-lowrank", type=float, metavar="KEEP",
                   help="replace MODEL's targets by random factors at this uniform keep (speed only)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    b.add_argument("--layers", type=int, help="random:SHAPE only: number of blocks (default: the shape's)")
    b.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    b.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (functional run, no CUDA graph)")
    b.add_argument("--no-fuse", action="store_true", help="do not fuse q/k/v and gate/up projections")
    b.add_argument("--no-graph", action="store_true", help="run the decode step eagerly instead of replaying a CUDA graph")
    b.add_argument("--json", help="write all figures as JSON here")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="rankcut: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (CLIError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"rankcut: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankcut: interrupted; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
