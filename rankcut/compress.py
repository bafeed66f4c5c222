"""Orchestration: calibrate -> allocate -> decompose -> swap. The one public entry point is :func:`compress_`."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut import __version__
from rankcut.allocate import allocation_for
from rankcut.calibrate import (
    StatsCollector,
    batches,
    block_output,
    capture_block_inputs,
    model_inputs,
    move_outside,
    with_hidden,
)
from rankcut.config import CompressConfig
from rankcut.data import calibration_windows, source_name
from rankcut.factorize import factorize
from rankcut.layers import LowRankLinear, dense_weight
from rankcut.methods import get_method
from rankcut.summary import CompressionSummary, TargetRow
from rankcut.targets import find_blocks, find_targets, get_submodule_parent

log = logging.getLogger(__name__)

RECORD_ATTR = "rankcut_record"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_seq_len(model: nn.Module) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(2048, limit) if limit else 2048


def resolve_device(device, model: nn.Module) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else next(model.parameters()).device)
    return torch.device(device)


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - start


def check_finite_weights(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter of ``model`` that holds inf/NaN.

    Every parameter is checked up front, not only the targets: a NaN in a norm of a later block would
    otherwise surface mid-calibration, after earlier blocks were already swapped.
    """
    for name, param in model.named_parameters():
        if param.device.type != "meta" and param.is_floating_point() and not torch.isfinite(param).all():
            layer = name.rpartition(".")[0] or name
            raise ValueError(f"non-finite values (inf/NaN) in layer {layer} ({name})")


class _Compressor:
    """State of one compress_ call: the targets, the config, and the rows produced so far."""

    def __init__(self, model: nn.Module, config: CompressConfig, device: torch.device, timer: _Timer) -> None:
        self.model, self.config, self.device, self.timer = model, config, device, timer
        self.spec = get_method(config.method)
        self.svd_dtype = getattr(torch, config.svd_dtype)
        self.rows: dict[str, TargetRow] = {}

    def decompose(self, name: str, module: nn.Module, stat: torch.Tensor | None) -> None:
        """Factorise one target and swap it into the model (or record why it stays dense)."""
        with self.timer("decomposition"):
            W = dense_weight(module).detach().to(self.device)
            m, n = W.shape
            try:
                result = factorize(
                    W,
                    self.config.method,
                    allocation_for(name, self.config),
                    None if stat is None else stat.to(self.device),
                    solver=self.config.solver,
                    oversample=self.config.oversample,
                    power_iters=self.config.power_iters,
                    seed=self.config.seed,
                    svd_dtype=self.svd_dtype,
                    options=self.config.method_options,
                )
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            if result.U is None:
                log.warning("%s stays dense: %s", name, result.reason)
                self.rows[name] = TargetRow(name, (m, n), None, m * n, m * n, None, result.reason)
                return
            weight = dense_weight(module)
            bias = getattr(module, "bias", None)
            new = LowRankLinear.from_factors(
                result.U.to(weight.device), result.V.to(weight.device), None if bias is None else bias.detach(), dtype=weight.dtype
            )
            parent, child = get_submodule_parent(self.model, name)
            setattr(parent, child, new)
            self.rows[name] = TargetRow(name, (m, n), result.rank, m * n, result.rank * (m + n), result.energy)


def compress_(
    model: nn.Module,
    config: CompressConfig | None = None,
    calib=None,
    tokenizer=None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> CompressionSummary:
    """Compress ``model`` in place: its target layers become :class:`~rankcut.layers.LowRankLinear`.

    Args:
        model: a Hugging Face transformer (decoder or encoder).
        config: what to do; default ``CompressConfig()`` (whiten, keep 0.8).
        calib: calibration text for data-aware methods: a file path, a dataset name, a list of strings, a
            1-D token stream or an (N, T) tensor of token windows.
        tokenizer: turns text calibration into tokens (not needed for token tensors).
        device: where each block is processed (default: CUDA when available). The model's weights stay
            where they are between blocks, so a model larger than the GPU can be compressed.
        progress: show progress bars.

    Returns:
        The per-target and overall summary (also logged). The model carries a record of what was done
        (``model.rankcut_record``) for :func:`rankcut.save`.

    Raises:
        ValueError: bad configuration, no targets, non-finite weights (naming the layer), missing or
            too-short calibration data. The model is left unchanged when the error is raised before the
            first swap (every input check happens before).
    """
    config = config or CompressConfig()
    timer = _Timer()
    start = time.perf_counter()
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)
    order = list(targets)
    device = resolve_device(device, model)
    work = _Compressor(model, config, device, timer)
    params_before = count_params(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = None
    if work.spec.stat is not None:
        if calib is None:
            raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
        with timer("calibration text"):
            seq_len = config.seq_len or default_seq_len(model)
            windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if windows is None:
                for name in tqdm(order, desc="decompose", disable=not progress):
                    work.decompose(name, targets.pop(name), None)  # pop: the dense layer can be freed
            elif config.layerwise:
                _run_layerwise(model, targets, windows, work, progress)
            else:
                _run_full(model, targets, windows, work, progress)
    finally:
        model.train(was_training)
    return _finish(model, config, work, order, params_before, start, 0 if windows is None else windows.numel(), calib)


def _finish(model, config, work: _Compressor, order, params_before: int, start: float, calib_tokens: int, calib) -> CompressionSummary:
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
    _attach_record(model, config, summary, calib)
    log.info("\n%s", summary.table())
    from rankcut.bench.cost import speedup_warning  # roofline model of batch-1 decode (BENCHMARKS.md)

    warning = speedup_warning([(r.name, r.shape[0], r.shape[1], r.rank) for r in summary.rows])
    if warning:
        log.warning(warning)
    return summary


class _StatRecorder:
    """Stands in for a :class:`_Compressor` in the runners: records each target's statistic, swaps nothing."""

    def __init__(self, kind: str, config: CompressConfig, device: torch.device) -> None:
        self.spec = type("Spec", (), {"stat": kind})()
        self.config, self.device, self.timer = config, device, _Timer()
        self.stats: dict[str, torch.Tensor] = {}

    def decompose(self, name: str, module: nn.Module, stat: torch.Tensor) -> None:
        self.stats[name] = stat.detach().cpu()


def dense_stats(
    model: nn.Module,
    kind: str,
    windows: torch.Tensor,
    config: CompressConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-target calibration statistic ``kind`` (``gram`` or ``absmean``) of the *dense* model.

    Runs the same block-by-block (or, with ``config.layerwise=False``, whole-model) pass as
    :func:`compress_` (non-sequential), without changing the model, so one set of statistics can serve
    several :func:`compress_with_stats_` calls with the same calibration data.
    """
    config = config or CompressConfig()
    if config.sequential:
        raise ValueError("dense statistics cannot be shared with sequential calibration")
    targets = find_targets(model, config.include, config.exclude)
    device = resolve_device(device, model)
    work = _StatRecorder(kind, config, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (_run_layerwise if config.layerwise else _run_full)(model, dict(targets), windows, work, progress)
    finally:
        model.train(was_training)
    return work.stats


def compress_with_stats_(
    model: nn.Module,
    config: CompressConfig,
    stats: dict[str, torch.Tensor] | None,
    device: str | torch.device | None = None,
    progress: bool = True,
    calib=None,
    calib_tokens: int = 0,
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
    work = _Compressor(model, config, device, _Timer())
    if work.spec.stat is not None:
        missing = [name for name in order if not stats or name not in stats]
        if missing:
            raise ValueError(f"method {config.method!r} needs statistics; none given for {missing[:3]}")
    params_before = count_params(model)
    with torch.no_grad():
        for name in tqdm(order, desc="decompose", disable=not progress):
            stat = None if work.spec.stat is None else stats[name]
            work.decompose(name, targets.pop(name), stat)
    return _finish(model, config, work, order, params_before, start, calib_tokens, calib)


def _attach_record(model: nn.Module, config: CompressConfig, summary: CompressionSummary, calib) -> None:
    previous = getattr(model, RECORD_ATTR, None) or {}
    ranks = dict(previous.get("ranks", {}))
    ranks.update({r.name: r.rank for r in summary.rows if r.rank is not None})
    dense = dict(previous.get("dense", {}))
    dense.update({r.name: r.note for r in summary.rows if r.rank is None})
    record = {
        "rankcut_version": __version__,
        "config": config.to_dict(),
        "ranks": ranks,
        "dense": dense,
        "source_model": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "calibration": None if calib is None else {"source": source_name(calib), "tokens": summary.calib_tokens},
        "keep_targets": summary.keep_targets,
        "keep_model": summary.keep_model,
        "summary": summary.to_dict(),
    }
    if previous:
        record["history"] = [*previous.get("history", []), {k: previous[k] for k in ("config", "calibration")}]
    setattr(model, RECORD_ATTR, record)


def _run_full(model: nn.Module, targets: dict, windows: torch.Tensor, work: _Compressor, progress: bool) -> None:
    """All targets hooked at once over whole-model forward passes (memory: the whole model on ``device``)."""
    first = next(model.parameters()).device
    model.to(work.device)
    with work.timer("statistics"), StatsCollector(targets, work.spec.stat) as stats:
        for ids in tqdm(list(batches(windows, work.config.batch_size)), desc="calibrate", disable=not progress):
            model(**model_inputs(model, ids.to(work.device)))
    for name in tqdm(list(targets), desc="decompose", disable=not progress):
        work.decompose(name, targets.pop(name), stats.stat(name))
    model.to(first)


def _run_layerwise(model: nn.Module, targets: dict, windows: torch.Tensor, work: _Compressor, progress: bool) -> None:
    """One block at a time on ``device``; its inputs are the previous block's outputs (dense or compressed)."""
    found = find_blocks(model)
    if found is None:
        raise ValueError("layerwise processing needs a stack of transformer blocks; use layerwise=False")
    prefix, blocks = found
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    outside = []
    for name in targets:
        head, _, rest = name.partition(prefix + ".")
        index = rest.split(".", 1)[0] if not head and rest else ""
        if index.isdigit():
            per_block[int(index)][name] = targets[name]
        else:
            outside.append(name)
    if outside:
        raise ValueError(f"targets outside the transformer blocks {outside[:3]} need layerwise=False")
    home = model.get_input_embeddings().weight.device
    move_outside(model, prefix, work.device)
    try:
        with work.timer("capture"):
            calls = capture_block_inputs(model, blocks[0], windows, work.config.batch_size, work.device)
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            block_home = next(block.parameters()).device
            block.to(work.device)
            chosen = per_block[index]
            rerun = work.config.sequential and bool(chosen)
            with work.timer("statistics"), StatsCollector(chosen, work.spec.stat) as stats:
                for i, (args, kwargs) in enumerate(calls):
                    out = block_output(block(*args, **kwargs))
                    if not rerun:  # the dense output is the next block's input: replace in place, so
                        calls[i] = with_hidden(args, kwargs, out)  # inputs and outputs never coexist
                del out
            for name in list(chosen):
                work.decompose(name, chosen[name], stats.stat(name))
            del stats
            if rerun:
                with work.timer("propagation"):
                    for i, (args, kwargs) in enumerate(calls):
                        calls[i] = with_hidden(args, kwargs, block_output(block(*args, **kwargs)))
            block.to(block_home)
            # Drop the last references to the swapped-out dense layers so their memory (on the device, where
            # the block was processed) is freed now, not when compress_ returns.
            for name in chosen:
                targets.pop(name, None)
            per_block[index] = chosen = {}
    finally:
        move_outside(model, prefix, home)
