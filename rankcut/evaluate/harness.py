"""Zero-shot tasks through lm-evaluation-harness, on the model in memory.

Two sources of data:

- the Hugging Face Hub (``data_dir=None``): any task lm-eval knows, by its name (``arc_easy``, ``piqa``,
  ``winogrande``, ``hellaswag``, ``lambada_openai``, ``mmlu``…); ``lambada`` is taken as ``lambada_openai``;
- a local data directory (``data_dir=DIR``, laid out like ``../shared/data``): the six offline tasks are read
  by :mod:`rankcut.evaluate.taskdata` into the Hub's records, written as JSON lines into a temporary folder,
  and evaluated by lm-eval's own task configuration with only the dataset source replaced (a YAML file that
  ``include:`` s the registered task). :func:`rankcut.evaluate.tasks.evaluate_tasks` is this path with
  rankcut's report shape; rankcut has no scorer of its own.

The model is wrapped in lm-eval's ``HFLM`` as it is (a compressed model is evaluated without reloading, on the
device it is on); its train/eval mode is restored afterwards.

Quiet runs (``progress=False``): lm-eval has no switch for its progress output, so the run turns off what can
be turned off from outside: the log-likelihood bars (``disable_tqdm`` of ``HFLM.loglikelihood*`` and
``generate_until``), the ``datasets`` bars (loading the records), the per-task "building requests" bar
(``lm_eval.api.task.tqdm``, replaced for the duration of the call) and lm-eval's ``print`` s to stdout. What
remains is the one-line bar of a bootstrapped standard error (LAMBADA's perplexity), which lm-eval draws with
a ``tqdm`` it imports inside the function.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import tempfile
from pathlib import Path
from unittest import mock

from torch import nn

from rankcut.evaluate.taskdata import HARNESS_NAMES, READERS, read_docs

log = logging.getLogger(__name__)

# lm-eval reports "metric,filter"; the metrics rankcut keeps, in its own names
_KEEP = ("acc", "acc_norm", "perplexity", "word_perplexity", "exact_match")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError("lm-evaluation-harness is not installed: pip install lm-eval "
                         "(or evaluate the offline tasks with --data-dir DIR)") from e
    return lm_eval, HFLM, TaskManager


@functools.cache
def _task_manager():
    """lm-eval's task index (it scans some 15,000 configs: seconds, so built once)."""
    return _lm_eval()[2]()


# the folders of lm-eval's task configs that hold the offline tasks' configs
_OFFLINE_FOLDERS = ("piqa", "arc", "hellaswag", "winogrande", "lambada")


@functools.cache
def _offline_task_manager():
    """An index of only the offline tasks' folders of lm-eval's configs (milliseconds instead of the whole
    index's seconds); the whole index stands in where lm-eval keeps them elsewhere."""
    lm_eval, _, TaskManager = _lm_eval()
    root = Path(lm_eval.__file__).parent / "tasks"
    folders = [str(root / name) for name in _OFFLINE_FOLDERS if (root / name).is_dir()]
    manager = TaskManager(include_defaults=False, include_path=folders) if folders else None
    if manager is None or any(harness_name(task) not in manager.task_index for task in READERS):
        return _task_manager()
    return manager


def harness_name(task: str) -> str:
    """lm-eval's name for a rankcut task name (``lambada`` → ``lambada_openai``)."""
    return HARNESS_NAMES.get(task, task)


def _local_task_files(tasks: list[str], data_dir, limit: int | None, folder: Path) -> dict[str, str]:
    """Write each task's records and a YAML that reuses lm-eval's config with the local records as data."""
    unknown = [task for task in tasks if task not in READERS]
    if unknown:
        raise ValueError(f"unknown offline task(s) {', '.join(unknown)}; available: {', '.join(READERS)}")
    all_docs = {task: read_docs(task, data_dir, limit) for task in tasks}  # bad files fail before lm-eval work
    specs = {}
    for task, docs in all_docs.items():
        entry = _offline_task_manager().task_index.get(harness_name(task))
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"lm-eval {_lm_eval()[0].__version__} has no task config for {harness_name(task)}")
        records = folder / f"{task}.jsonl"
        records.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
        name = f"rankcut_local_{task}"
        lines = [
            f"include: {json.dumps(str(entry.yaml_path))}",
            f"task: {name}",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(records))}",
            "training_split: null",
            "validation_split: null",
            "test_split: test",
            "fewshot_split: null",
        ]
        yaml = folder / f"{name}.yaml"
        yaml.write_text("\n".join(lines) + "\n", encoding="utf-8")
        specs[task] = str(yaml)
    return specs


@contextlib.contextmanager
def _quiet(lm):
    """Silence the progress output of lm-eval (and of ``datasets``) around one evaluation of ``lm``."""
    import datasets
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        # an instance attribute shadows the method of this HFLM only (evaluate_harness built it)
        setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    with contextlib.ExitStack() as stack:
        if getattr(task_module, "tqdm", None) is tqdm:  # the "building requests" bar, one per task
            stack.enter_context(mock.patch.object(task_module, "tqdm", functools.partial(tqdm, disable=True)))
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            stack.callback(datasets.enable_progress_bars)
        printed = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        yield
    if printed.getvalue().strip():
        log.debug("lm-eval printed: %s", printed.getvalue().strip())


def _metrics(block: dict, n: int | None) -> dict:
    out = {}
    for key, value in block.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and (metric in _KEEP or metric.endswith("_stderr")) and isinstance(value, (int, float)):
            out[metric] = float(value)
    if n is not None:
        out["n"] = int(n)
    return out


def evaluate_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir=None,
    limit: int | None = None,
    batch_size: int = 16,
    *,
    progress: bool = True,
    bootstrap_iters: int = 100_000,
) -> dict:
    """Run lm-evaluation-harness on ``model`` (in memory): ``{task: {"acc", "acc_norm", …, "n"}}``.

    Args:
        model: a causal LM (dense or compressed), on the device it should run on.
        tokenizer: its tokenizer.
        tasks: task names; with ``data_dir`` the offline six, else any lm-eval task.
        data_dir: local task files (``../shared/data`` layout), or None for the Hub.
        limit: the first ``limit`` items of each task.
        batch_size: sequences per forward pass.
        progress: False silences lm-eval's progress output as far as it can be (see the module docstring).
        bootstrap_iters: lm-eval's resamples for the standard errors that have no closed form (LAMBADA's
            perplexity); ``acc``'s closed-form standard error only needs it > 0. lm-eval's default.

    Raises:
        ValueError: lm-eval missing, an unknown task, missing files, or the Hub unreachable.
    """
    lm_eval, HFLM, _ = _lm_eval()
    if tokenizer is None:
        raise ValueError("zero-shot tasks need a tokenizer")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    with tempfile.TemporaryDirectory(prefix="rankcut-tasks-") as tmp:
        if data_dir is not None:
            specs = _local_task_files(tasks, data_dir, limit, Path(tmp))
            manager = _offline_task_manager()
        else:
            specs = {task: harness_name(task) for task in tasks}
            manager = _task_manager()
            unknown = [name for name in specs.values() if name not in manager.task_index]
            if unknown:
                raise ValueError(f"lm-eval {lm_eval.__version__} knows no task {', '.join(unknown)}")
        was_training = model.training  # HFLM switches the model to eval mode; restored below
        try:
            hf_log = logging.getLogger("lm_eval.models.huggingface")
            level = hf_log.level
            hf_log.setLevel(logging.ERROR)  # it warns that it was handed a model object: that is the point here
            try:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            finally:
                hf_log.setLevel(level)
            with contextlib.nullcontext() if progress else _quiet(lm):
                result = lm_eval.simple_evaluate(model=lm, tasks=list(specs.values()), limit=limit,
                                                 task_manager=manager, log_samples=False,
                                                 bootstrap_iters=bootstrap_iters)
        except ConnectionError as e:
            raise ValueError(f"could not fetch task data from the Hugging Face Hub ({e}); "
                             "evaluate offline copies with --data-dir DIR") from e
        finally:
            model.train(was_training)
    names = {Path(spec).stem if data_dir is not None else spec: task for task, spec in specs.items()}
    counts = result.get("n-samples", {})
    out = {}
    for key, block in result["results"].items():
        task = names.get(key, key)
        n = counts.get(key, {}).get("effective")
        out[task] = _metrics(block, n)
    return out
