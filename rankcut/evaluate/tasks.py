"""Zero-shot tasks from local files, scored by lm-evaluation-harness.

The six offline tasks (:data:`TASKS`) are read from a data directory laid out like ``../shared/data`` by
:mod:`rankcut.evaluate.taskdata` into the records of the Hub datasets lm-eval's tasks use, and evaluated by
lm-eval's own registered task configurations (prompts, log-likelihood scoring, ``acc``/``acc_norm``,
``lambada_openai``'s greedy accuracy and perplexity) through :func:`rankcut.evaluate.harness.evaluate_harness`.
rankcut does no scoring of its own: :func:`evaluate_tasks` only picks, per task, the figures rankcut reports.

Reported per task (the keys of ``rankcut eval``'s JSON and table):

- piqa, arc_easy, arc_challenge, hellaswag: ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``, ``n``;
- winogrande: ``acc``, ``acc_stderr``, ``n``;
- lambada (lm-eval's ``lambada_openai``): ``acc``, ``acc_stderr``, ``perplexity``, ``n``.

The standard errors are lm-eval's closed-form ones (sample standard deviation / √n; NaN for a single item).
lm-eval's bootstrapped standard error of LAMBADA's perplexity is not reported, so it is not resampled.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankcut.evaluate.harness import evaluate_harness
from rankcut.evaluate.taskdata import READERS

TASKS = tuple(READERS)
# what rankcut reports of lm-eval's results, in this order; each metric here except perplexity with its stderr
_REPORTED = {"winogrande": ("acc",), "lambada": ("acc", "perplexity")}
_DEFAULT = ("acc", "acc_norm")
_WITH_STDERR = ("acc", "acc_norm")
# lm-eval computes every standard error only when bootstrap_iters > 0; the closed-form ones (acc, acc_norm)
# ignore the count, the one bootstrapped figure (perplexity's) is dropped: the fewest resamples it accepts
_UNREPORTED_BOOTSTRAP = 2


def _check_device(model: nn.Module, device) -> None:
    """lm-eval runs the model where it is: a ``device`` other than the model's is an error, not a move."""
    if device is None:
        return
    want = torch.device(device)
    param = next(iter(model.parameters()), None)
    have = param.device if param is not None else torch.device("cpu")
    if have.type != want.type or (want.index is not None and have.index != want.index):
        raise ValueError(f"the model is on {have}, not on {want}: move it there first")


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir,
    limit: int | None = None,
    batch_size: int = 16,
    device=None,
    progress: bool = True,
) -> dict:
    """Zero-shot scores of ``model`` on offline tasks, by lm-evaluation-harness.

    Args:
        model: a causal LM (dense or compressed, a ``transformers`` model), on the device it should run on.
        tokenizer: its ``transformers`` tokenizer.
        tasks: names from :data:`TASKS`; the result keeps their order (repeats once).
        data_dir: the local task files (``../shared/data`` layout).
        limit: the first ``limit`` items of each task.
        batch_size: sequences per forward pass.
        device: where the model is expected to be (checked; None: wherever it is).
        progress: False quiets lm-eval's progress output (see :mod:`rankcut.evaluate.harness`).

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" | "perplexity", "n"}}`` (see the
        module docstring for which task reports what).

    Raises:
        ValueError: an unknown task, a missing data directory or file, a bad limit, a tokenizer-less model,
            the model not on ``device``, lm-eval not installed or not reporting an expected metric.
    """
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    if data_dir is None:
        raise ValueError("evaluate_tasks reads local task files: give data_dir "
                         "(rankcut.evaluate.harness.evaluate_harness runs lm-eval's tasks on Hub data)")
    if tokenizer is None:
        raise ValueError("zero-shot tasks need a tokenizer")
    _check_device(model, device)
    names = list(dict.fromkeys(tasks))
    found = evaluate_harness(model, tokenizer, names, data_dir, limit, batch_size, progress=progress,
                             bootstrap_iters=_UNREPORTED_BOOTSTRAP)
    results = {}
    for name in names:
        got = found.get(name)
        if got is None:
            raise ValueError(f"lm-eval returned no results for {name} (got {', '.join(found)})")
        row = {}
        for metric in _REPORTED.get(name, _DEFAULT):
            if metric not in got:
                raise ValueError(f"lm-eval reported no {metric} for {name} (got {', '.join(got)})")
            row[metric] = got[metric]
            if metric in _WITH_STDERR:  # lm-eval reports "N/A" (dropped by the harness) for a single item
                row[f"{metric}_stderr"] = got.get(f"{metric}_stderr", math.nan)
        if "n" not in got:
            raise ValueError(f"lm-eval reported no sample count for {name}")
        row["n"] = got["n"]
        results[name] = row
    return results
