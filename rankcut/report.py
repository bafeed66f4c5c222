"""Everything the command line shows or writes besides the API's own tables: the perplexity, task and fidelity
tables of ``rankcut eval`` and its Markdown report, the notes on held-out text, the window count and time
estimate before an evaluation, checkpoint sizes, the invocation record (command line + environment), and
atomic writers for text, JSON and report directories.

Pure formatting over plain data: nothing here loads a model. Heavy modules are imported where used.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

#: Column name of the model ``rankcut eval`` evaluates, and of a baseline that is not a rankcut checkpoint.
MODEL_LABEL, DENSE_LABEL = "compressed", "dense"
#: Windows above which an evaluation on a CPU is slow enough to say so.
MANY_WINDOWS = 1000


# ------------------------------------------------------------------------------------------- writers


def invocation(argv: list[str] | None = None, device=None) -> dict:
    """The command line that produced an output (to re-run it) and the environment it ran in."""
    from rankcut.utils import environment

    argv = ["rankcut", *(sys.argv[1:] if argv is None else argv)]
    return {"command": shlex.join(argv), "argv": argv, "environment": environment(device)}


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically (a hidden temporary beside it, then a rename): never half-written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)


def write_json(path: str | os.PathLike | None, data: dict, indent: int = 2) -> None:
    """Write ``data`` as JSON atomically; nothing when ``path`` is None."""
    if path:
        write_text(path, json.dumps(data, indent=indent, default=str))


@contextlib.contextmanager
def staged_dir(output: str | os.PathLike):
    """Yield a hidden directory beside ``output``; on success it replaces ``output`` (an interrupted or failed
    run leaves no half-written report and the previous one in place)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o755)
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# ------------------------------------------------------------------------------------- sizes, windows


def format_bytes(n: float) -> str:
    """Decimal units: ``31473456`` -> ``31.5 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def size_line(checkpoint: int, source: int, dtype: str, source_dtype: str | None = None,
              estimated_from: int | None = None) -> str:
    """``checkpoint: 27.6 MB (source model 31.5 MB; float16)``; ``estimated_from`` (a parameter count) marks a
    source size computed as parameters x bytes rather than read from its files."""
    if estimated_from is not None:
        src = (f"source model ~{format_bytes(source)} estimated: {estimated_from:,} parameters in "
               f"{source_dtype or dtype}")
    else:
        src = f"source model {format_bytes(source)}"
    stored = dtype if source_dtype in (None, dtype) else f"{dtype}; the source stores {source_dtype}"
    return f"checkpoint: {format_bytes(checkpoint)} ({src}; {stored})"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def windows_line(name: str, label: str, tokens: int, seq_len: int, evaluated: int, estimate_s: float | None = None,
                 batch_size: int | None = None, device: str = "cpu") -> str:
    """What an evaluation of one text is about to do, e.g. ``ppl python_heldout (compressed): 877,056 tokens =
    1,713 windows of 512 tokens, all evaluated; about 3 min on this CPU (estimate: one batch of 8 timed)``, and
    a warning line when a CPU faces more than :data:`MANY_WINDOWS` windows."""
    windows = tokens // seq_len
    which = "all evaluated" if evaluated >= windows else f"the first {evaluated:,} evaluated"
    line = f"ppl {name} ({label}): {tokens:,} tokens = {windows:,} windows of {seq_len} tokens, {which}"
    if estimate_s is not None:
        line += (f"; about {format_duration(estimate_s)} on this {device.upper()} (an estimate from one timed batch "
                 f"of {batch_size} windows)")
    if device == "cpu" and evaluated > MANY_WINDOWS:
        line += (f"\nwarning: {evaluated:,} windows per model is slow on a CPU (minutes to tens of minutes); "
                 "--max-windows N evaluates only the first N")
    return line


# ---------------------------------------------------------------------------------- held-out warnings


def _name(spec: str) -> str:
    path = Path(os.path.expanduser(spec))
    return (path.resolve().name if path.exists() else path.name) or spec


def baseline_label(spec: str, is_checkpoint: bool) -> str:
    """``dense`` for a baseline that is not a rankcut checkpoint, else its directory name."""
    if not is_checkpoint:
        return DENSE_LABEL
    name = _name(spec)
    return f"baseline {name}" if name in (MODEL_LABEL, DENSE_LABEL) else name


def model_label(spec: str, is_checkpoint: bool) -> str:
    """What progress bars call the evaluated model: ``compressed`` for a rankcut checkpoint, else its name."""
    return MODEL_LABEL if is_checkpoint else _name(spec)


def held_out_notes(spec: str, record, texts: list[str]) -> list[str]:
    """Notes and warnings about evaluating ``spec`` on ``texts``: which data tuned a recovered checkpoint,
    texts named like a tuning source, and a text that is the checkpoint's recorded calibration source
    (compared by file stem, like the tuning check; a dataset name is not flagged: calibration reads its train
    split, evaluation its test split)."""
    from rankcut.data import source_name

    if record is None:
        return []
    lines = []
    files = [t for t in texts if os.path.isfile(os.path.expanduser(t))]
    calibrated = (record.calibration or {}).get("source")
    for text in files:
        if calibrated and source_name(text) == calibrated:
            lines.append(f"warning: {text} looks like the calibration text of {spec} ({calibrated}): never evaluate "
                         "on calibration text; its perplexity is not a held-out figure")
    recovery = record.recovery
    if recovery:
        tuned = {d["source"] for d in recovery["data"]}
        lines.append(f"note: {spec} was tuned by rankcut recover on {', '.join(sorted(tuned))} "
                     f"({recovery['tokens_tuned']:,} tokens); only text it was not tuned on measures recovery")
        for text in files:
            if source_name(text) in tuned:
                lines.append(f"warning: {text} looks like tuning data ({source_name(text)}): its perplexity is not a "
                             "held-out figure")
    return lines


# ------------------------------------------------------------------------------------ rankcut eval tables


def perplexity_table(result: dict, baseline: dict | None, base_label: str = DENSE_LABEL) -> str:
    """One row per text: perplexity, or baseline vs compressed and the change."""
    if baseline is None:
        lines = [f"{'text':<28} {'perplexity':>12}"]
        lines += [f"{name:<28} {value:>12.4f}" for name, value in result.items()]
        return "\n".join(lines)
    w = max(12, len(base_label))
    lines = [f"{'text':<28} {base_label:>{w}} {MODEL_LABEL:>12} {'change':>9}"]
    for name, comp in result.items():
        base = baseline[name]
        lines.append(f"{name:<28} {base:>{w}.4f} {comp:>12.4f} {100 * (comp / base - 1):>+8.2f}%")
    return "\n".join(lines)


def params_line(params: int, base_params: int, base_label: str = DENSE_LABEL, base_keep: float | None = None) -> str:
    """``parameters: dense 15,733,632, compressed 13,825,152 (0.8787)``; for a compressed baseline the ratio is
    relative to it, and its own kept fraction of its source model is stated."""
    ratio = params / base_params
    if base_label == DENSE_LABEL:
        return f"parameters: dense {base_params:,}, compressed {params:,} ({ratio:.4f})"
    line = f"parameters: {base_label} {base_params:,}, compressed {params:,} ({ratio:.4f} of {base_label})"
    if base_keep is not None:
        line += f"; {base_label} itself keeps {base_keep:.4f} of its source model"
    return line


def task_rows(result: dict, baseline: dict | None) -> list[tuple]:
    """``(task, metric, base, value, change, unit, n, stderr)`` per task and metric; ``base``/``change`` are
    None without a baseline, ``stderr`` (of ``value``) is "" where not reported. The change is in percent for
    perplexity, in accuracy points otherwise."""
    rows = []
    for task, metrics in result.items():
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith("_stderr"):  # standard errors stay in the JSON
                continue
            base = change = unit = None
            if baseline is not None:
                base = baseline[task][metric]
                change, unit = (100 * (value / base - 1), "%") if metric == "perplexity" else (100 * (value - base), "pt")
            err = metrics.get(f"{metric}_stderr")
            err = f"{err:.4f}" if isinstance(err, float) and math.isfinite(err) else ""
            rows.append((task, metric, base, value, change, unit, metrics.get("n", ""), err))
    return rows


def task_table(result: dict, baseline: dict | None, base_label: str = DENSE_LABEL) -> str:
    """One row per task and metric; with a baseline, baseline vs compressed and the change."""
    w = max(10, len(base_label))
    if baseline is None:
        lines = [f"{'task':<16} {'metric':<11} {'value':>10} {'± s.e.':>8} {'n':>7}"]
    else:
        lines = [f"{'task':<16} {'metric':<11} {base_label:>{w}} {MODEL_LABEL:>10} {'± s.e.':>8} {'change':>9} {'n':>7}"]
    for task, metric, base, value, change, unit, n, err in task_rows(result, baseline):
        if base is None:
            lines.append(f"{task:<16} {metric:<11} {value:>10.4f} {err:>8} {n:>7}")
        else:
            text = f"{change:>+8.2f}%" if unit == "%" else f"{change:>+7.2f}pt"
            lines.append(f"{task:<16} {metric:<11} {base:>{w}.4f} {value:>10.4f} {err:>8} {text:>9} {n:>7}")
    return "\n".join(lines)


def fidelity_table(fidelity: dict, base_label: str = DENSE_LABEL) -> str:
    """Markdown: one row per text and metric, the baseline (against itself: 1) vs compressed."""
    lines = [f"| text | metric | {base_label} | {MODEL_LABEL} | change | n |", "|---|---|---|---|---|---|"]
    for name, values in fidelity.items():
        for metric in ("mean_cosine", "min_cosine", "nn_agreement"):
            value = values[metric]
            lines.append(f"| {name} | {metric} | 1.0000 | {value:.4f} | {value - 1:+.4f} | {values['n']} |")
    return "\n".join(lines)


def markdown_report(output: dict) -> str:
    """The tables of ``rankcut eval`` (its JSON ``output``) as a Markdown document."""
    base = output.get("baseline")
    label = base.get("label", DENSE_LABEL) if base else DENSE_LABEL
    parts = [f"# rankcut eval: {output['model']}", ""]
    if base is not None:
        parts += [f"Baseline ({label}): {base['model']}; "
                  + params_line(output["params"], base["params"], label, base.get("keep_model")) + ".", ""]
    if output["perplexity"]:
        parts += ["## Perplexity", ""]
        if base is None:
            parts += ["| text | perplexity |", "|---|---|"]
            parts += [f"| {name} | {value:.4f} |" for name, value in output["perplexity"].items()]
        else:
            parts += [f"| text | {label} | {MODEL_LABEL} | change |", "|---|---|---|---|"]
            for name, comp in output["perplexity"].items():
                ref = base["perplexity"][name]
                parts.append(f"| {name} | {ref:.4f} | {comp:.4f} | {100 * (comp / ref - 1):+.2f}% |")
        parts.append("")
    if output.get("tasks"):
        parts += ["## Tasks", ""]
        if base is None:
            parts += ["| task | metric | value | ± s.e. | n |", "|---|---|---|---|---|"]
        else:
            parts += [f"| task | metric | {label} | {MODEL_LABEL} | ± s.e. | change | n |", "|---|---|---|---|---|---|---|"]
        for task, metric, ref, value, change, unit, n, err in task_rows(output["tasks"], base and base["tasks"]):
            if ref is None:
                parts.append(f"| {task} | {metric} | {value:.4f} | {err} | {n} |")
            else:
                parts.append(f"| {task} | {metric} | {ref:.4f} | {value:.4f} | {err} | {change:+.2f}{unit} | {n} |")
        parts.append("")
    if output.get("fidelity"):
        parts += ["## Embedding fidelity", "", fidelity_table(output["fidelity"], label), ""]
    return "\n".join(parts)


def sensitivity_table(result) -> str:
    """Per target: the measured scores at each rank (``rankcut sensitivity``)."""
    score = result.settings["settings"]["score"]
    lines = [f"{'target':<44} {'shape':>10}  {score} at rank"]
    for name, c in result.curves.items():
        cells = "  ".join(f"{r}:{s:.3g}" for r, s in zip(c["ranks"], c["scores"]))
        lines.append(f"{name:<44} {c['shape'][0]:>4}x{c['shape'][1]:<5}  {cells}")
    if result.dense_loss is not None:
        lines.append(f"dense next-token loss on the scoring windows: {result.dense_loss:.4f}")
    return "\n".join(lines)
