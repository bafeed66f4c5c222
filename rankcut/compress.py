"""The one entry point of compression, :func:`compress_`, and the dense statistics it can share.

``compress_`` wires the phases of :mod:`rankcut.pipeline` together: targets, calibration windows, the
statistics phase, and the :class:`~rankcut.pipeline.Compression` visitor (plan -> decompose -> swap), then
the summary and the record the model carries to :func:`rankcut.save`.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from rankcut.config import CompressConfig
from rankcut.cost import fixed_decode_seconds, speedup_warning_once
from rankcut.data import calibration_windows, source_name
from rankcut.pipeline import Compression, GivenStats, StatRecorder, check_finite_weights, run_blocks
from rankcut.parallel import compression_visitor
from rankcut.policies import make_policy
from rankcut.record import Record, get_record, set_record
from rankcut.summary import CompressionSummary
from rankcut.targets import find_blocks, find_targets
from rankcut.utils import Timer, count_params, default_seq_len, resolve_device

log = logging.getLogger(__name__)


def check_inputs(config: CompressConfig, calib=None) -> None:
    """The checks of a compression's inputs that need no model (the CLI runs them before loading one).

    Raises:
        ValueError: a data-aware method without calibration data, or a calibration source that is neither an
            existing file nor a known dataset.
    """
    from rankcut.data import check_source

    if config.method_spec.stat is not None and calib is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
    check_source(calib, "calibration text")


def compress_(
    model: nn.Module,
    config: CompressConfig | None = None,
    calib=None,
    tokenizer=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    context: dict | None = None,
    runtime=None,
) -> CompressionSummary:
    """Compress ``model`` in place: its target layers become decomposed modules (``LowRankLinear``…).

    Args:
        model: a Hugging Face transformer (decoder or encoder).
        config: what to do; default ``CompressConfig()`` (whiten, keep 0.8).
        calib: calibration text for data-aware methods: a file path, a dataset name, a list of strings, a
            1-D token stream or an (N, T) tensor of token windows.
        tokenizer: turns text calibration into tokens (not needed for token tensors).
        device: where each block is processed (default: CUDA when available). The model's weights stay
            where they are between blocks, so a model larger than the GPU can be compressed.
        progress: show progress bars.
        context: inputs a policy needs beyond the config (e.g. measured sensitivities).
        runtime: a :class:`~rankcut.runtime.RuntimePlan` of runtime activation decomposition to apply after the
            compression (its outlier thresholds calibrated on ``calib`` when it has none); it is recorded and
            saved with the checkpoint.

    Returns:
        The per-target and overall summary (also logged). The model carries a
        :class:`~rankcut.record.Record` of what was done (``model.rankcut_record``) for :func:`rankcut.save`.

    Raises:
        ValueError: bad configuration, no targets, non-finite weights (naming the layer), missing or
            too-short calibration data. The model is left unchanged when the error is raised before the
            first swap (every input check happens before).
    """
    config = config or CompressConfig()
    timer = Timer()
    start = time.perf_counter()
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)
    order = list(targets)
    device = resolve_device(device, model)
    policy = make_policy(config, policy_context(model, config, context))
    if policy.is_global and config.sequential:
        raise ValueError(f"allocation {config.allocation!r} plans all targets at once; sequential calibration "
                         "needs each block swapped before the next is calibrated")
    work = compression_visitor(model, config, policy, targets, device, timer, progress)  # data-parallel in a world
    params_before = count_params(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = None
    check_inputs(config, calib)
    if config.factor_dtype is not None:
        _check_factor_dtype(model, config, device, runtime)
    if work.stat is not None:
        with timer("calibration text"):
            seq_len = config.seq_len or default_seq_len(model)
            windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
    if runtime is not None:
        from rankcut.runtime import reader_groups

        reader_groups(model, runtime.layers)  # a block that does not exist: refused before any swap
        if runtime.outlier_fraction > 0 and not runtime.thresholds and calib is None:
            raise ValueError("the runtime plan's outlier thresholds are calibrated on text: give calib=...")
    run_blocks(model, targets, windows, work, device=device, batch_size=config.batch_size, layerwise=config.layerwise,
               sequential=config.sequential, progress=progress, timer=timer)
    if config.factor_dtype is not None:
        from rankcut.quantize import quantize_factors_

        with timer("quantization"):
            quantize_factors_(model, config.factor_dtype, config.factor_group, windows, config.compensate, device,
                              config.batch_size, progress)
    summary = _finish(model, config, work, order, params_before, start, 0 if windows is None else windows.numel(), calib)
    if runtime is not None:
        from rankcut.runtime import apply_runtime

        if runtime.outlier_fraction > 0 and not runtime.thresholds and windows is None:  # a data-free method
            seq_len = config.seq_len or default_seq_len(model)
            windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
        apply_runtime(model, runtime, windows, config.batch_size)
    return summary


def _check_factor_dtype(model: nn.Module, config: CompressConfig, device: torch.device, runtime) -> None:
    """Refuse, before any swap, quantised factors that cannot run or be built here."""
    from rankcut.kernels.dispatch import triton_available
    from rankcut.quant import check_group
    from rankcut.targets import find_targets

    if device.type == "cuda" and not triton_available():
        raise ValueError(f"factor_dtype {config.factor_dtype!r} on CUDA needs Triton for its dequantising kernels, "
                         "and Triton is not importable: install triton, or compress on the CPU (device='cpu')")
    if runtime is not None:
        raise ValueError("runtime activation decomposition reads float factors: it does not combine with factor_dtype")
    if config.method_spec.name == "tucker":
        raise ValueError("factor_dtype quantises low-rank factors; method 'tucker' stores shared bases and cores")
    if config.factor_dtype == "int4":
        from rankcut.modules.dense import dense_shape

        for name, module in find_targets(model, config.include, config.exclude).items():
            try:
                check_group(dense_shape(module)[1], config.factor_group)
            except ValueError as err:
                raise ValueError(f"{name}: {err} (choose factor_group dividing it)") from None


def policy_context(model: nn.Module, config: CompressConfig, context: dict | None) -> dict:
    """What a policy may read beyond its config: the caller's ``context`` (measurements) and, for a speedup
    budget, the predicted fixed seconds per token of the decode step (:func:`rankcut.cost.fixed_decode_seconds`)."""
    out = dict(context or {})
    if config.speedup is not None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = find_blocks(model)
        out.setdefault("fixed_decode_seconds", fixed_decode_seconds(
            None if head is None else tuple(head.weight.shape), len(found[1]) if found else 0))
    return out


def _finish(model, config, work: Compression, order, params_before: int, start: float, calib_tokens: int,
            calib) -> CompressionSummary:
    """Build the summary, attach the record and log the table (shared by compress_ and compress_with_stats_)."""
    work.timer.times["total"] = time.perf_counter() - start
    device = work.device
    summary = CompressionSummary(
        method=config.method,
        rows=[work.rows[name] for name in order],
        model_params_before=params_before,
        model_params_after=count_params(model),
        times=work.timer.times,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        calib_tokens=calib_tokens,
    )
    attach_record(model, config, summary, calib)
    log.info("\n%s", summary.table())
    speedup_warning_once([(r.name, r.shape[0], r.shape[1], r.rank) for r in summary.rows], device)
    return summary


def attach_record(model: nn.Module, config: CompressConfig, summary: CompressionSummary, calib) -> Record:
    """The model's :class:`Record` after this compression (an earlier one is extended, not replaced)."""
    from rankcut.modules import rankcut_modules, record_entry

    previous = get_record(model)
    dense = dict(previous.dense) if previous else {}
    dense.update({r.name: r.note for r in summary.rows if r.rank is None})
    for name in rankcut_modules(model):
        dense.pop(name, None)
    record = Record(
        config=config.to_dict(),
        targets={name: record_entry(module) for name, module in rankcut_modules(model).items()},
        dense=dense,
        source_model=getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        calibration=None if calib is None else {"source": source_name(calib), "tokens": summary.calib_tokens},
        keep_targets=summary.keep_targets,
        keep_model=summary.keep_model,
        summary=summary.to_dict(),
    )
    if previous:
        record.history = [*previous.history, {"config": previous.config, "calibration": previous.calibration}]
        record.recovery_history = [*previous.recovery_history, *([previous.recovery] if previous.recovery else [])]
        record.source_model = previous.source_model or record.source_model
    set_record(model, record)
    return record


def dense_stats(
    model: nn.Module,
    kind: str,
    windows: torch.Tensor,
    config: CompressConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-target calibration statistic ``kind`` (``gram`` or ``absmean``) of the *dense* model.

    Runs the same block-by-block (or, with ``config.layerwise=False``, whole-model) statistics phase as
    :func:`compress_` (non-sequential), without changing the model, so one set of statistics can serve
    several :func:`compress_with_stats_` calls with the same calibration data.
    """
    config = config or CompressConfig()
    if config.sequential:
        raise ValueError("dense statistics cannot be shared with sequential calibration")
    targets = find_targets(model, config.include, config.exclude)
    recorder = StatRecorder(kind)
    run_blocks(model, dict(targets), windows, recorder, device=resolve_device(device, model),
               batch_size=config.batch_size, layerwise=config.layerwise, progress=progress)
    return recorder.stats


def compress_with_stats_(
    model: nn.Module,
    config: CompressConfig,
    stats: dict[str, torch.Tensor] | None,
    device: str | torch.device | None = None,
    progress: bool = True,
    calib=None,
    calib_tokens: int = 0,
    context: dict | None = None,
) -> CompressionSummary:
    """Like :func:`compress_`, but with precomputed per-target statistics (see :func:`dense_stats`).

    Equals ``compress_`` with non-sequential calibration on the same data. ``stats`` may be None for
    methods that need no statistic.
    """
    start = time.perf_counter()
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)
    order = list(targets)
    device = resolve_device(device, model)
    work = Compression(model, config, make_policy(config, policy_context(model, config, context)), targets, device,
                       Timer(), progress)
    if work.stat is not None:
        missing = [name for name in order if not stats or name not in stats]
        if missing:
            raise ValueError(f"method {config.method!r} needs statistics; none given for {missing[:3]}")
    params_before = count_params(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            GivenStats(work, stats).run(targets)
    finally:
        model.train(was_training)
    return _finish(model, config, work, order, params_before, start, calib_tokens, calib)
