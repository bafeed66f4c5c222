"""``rankcut recover``: win back quality lost to compression with a short adapter fine-tune, merged back.

:class:`RecoverConfig` says what to do; :func:`recover_` runs it on a compressed model in place: attach the
adapters (:mod:`rankcut.adapters`), initialise them, train (:mod:`rankcut.train`), merge, and record in the
model's rankcut record which data tuned it and how many tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from rankcut.adapters import ResidualAdapter, apply_state, attach, initial_state, merge, residual_factors
from rankcut.compress import dense_stats
from rankcut.config import CompressConfig, RecoverConfig
from rankcut.data import calibration_windows, check_source, source_name, token_stream
from rankcut.evaluate.perplexity import perplexity
from rankcut.io import sha256_file
from rankcut.modules import dense_weight, rankcut_modules
from rankcut.record import get_record, set_record
from rankcut.train import WorkDir, fit, resolve_precision, tuning_windows
from rankcut.utils import count_params, default_seq_len, resolve_device

log = logging.getLogger(__name__)

__all__ = ["RecoverConfig", "RecoveryResult", "check_held_out", "check_recover", "recover_", "residual_init"]


def check_held_out(data: list, eval_text) -> None:
    """Raise ValueError when the evaluation text is one of the tuning files (same file or same bytes).

    A dataset name may appear in both: tuning reads its train split, evaluation its test split.
    """
    if eval_text is None or not isinstance(eval_text, (str, os.PathLike)) or not os.path.isfile(eval_text):
        return
    for source in data:
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
            if os.path.samefile(source, eval_text) or sha256_file(source) == sha256_file(eval_text):
                raise ValueError(f"evaluation text {eval_text} is also tuning data ({source}): recovery must be "
                                 "measured on held-out text the model was not tuned on")


def check_recover(config: RecoverConfig, data: list, eval_text=None, dense_given: bool = False, calib=None) -> None:
    """Every check of a recovery's inputs that needs no model: run before loading anything (the CLI does) and
    again by :func:`recover_`.

    Raises:
        ValueError: a missing text source, evaluation on tuning data, PEFT missing for mode ``factors``, or a
            dense model needed (grow + residual, distillation) but not given.
    """
    import importlib.util

    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    if not sources:
        raise ValueError("recovery needs tuning data")
    for what, source in [("tuning data", d) for d in sources] + [("evaluation text", eval_text), ("calibration text", calib)]:
        if isinstance(source, (str, os.PathLike)):
            check_source(source, what)
    check_held_out(sources, eval_text)
    if config.mode == "factors" and importlib.util.find_spec("peft") is None:
        raise ValueError("mode factors needs PEFT: pip install 'rankcut[recover]' (or use mode grow)")
    if config.distill > 0 and not dense_given:
        raise ValueError("distillation (distill > 0) needs the dense model as teacher (dense=...): the dense model "
                         "is the teacher")
    if config.mode == "grow" and config.init == "residual" and not dense_given:
        raise ValueError("residual init of mode grow needs the dense model (dense=...): the next singular directions "
                         "of the residual W - UV need the dense W, which the checkpoint no longer holds")


def model_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: identifies the model a work folder belongs to."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def residual_init(model: nn.Module, names: list[str], dense: nn.Module, tokenizer, calib, lora_rank: int,
                  device: torch.device, progress: bool = True) -> tuple[dict, dict]:
    """``{name: (B, A)}``: each layer's next ``lora_rank`` residual directions in its method's space.

    The statistic is recomputed on ``dense`` from ``calib`` with the calibration settings recorded in the
    model's rankcut record (same windows as at compression when ``calib`` is the same text).
    """
    record = get_record(model)
    config = CompressConfig.from_dict(record.config)
    spec = config.method_spec
    info: dict = {"dense_model": getattr(dense, "name_or_path", None) or "given", "method": config.method}
    stats: dict = {}
    if spec.stat is not None:
        if calib is None:
            raise ValueError(f"residual init for {config.method} needs calibration text to recompute its statistics")
        if config.sequential:
            info["note"] = "compressed with sequential calibration; statistics recomputed on dense activations"
            config = dataclasses.replace(config, sequential=False)
        seq_len = config.seq_len or default_seq_len(dense)
        windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
        stats = dense_stats(dense, spec.stat, windows, config, device, progress)
        compressed_on = (record.calibration or {}).get("source")
        info["statistics"] = {"source": source_name(calib), "windows": int(windows.shape[0]), "seq_len": seq_len,
                              "seed": config.seed, "sampling": config.sampling,
                              "same_source_as_compression": compressed_on == source_name(calib)}
    dense_layers = dict(dense.named_modules())
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        layer = layer.base if isinstance(layer, ResidualAdapter) else layer
        if name not in dense_layers:
            raise ValueError(f"the dense model has no layer {name}: is it the model this checkpoint came from?")
        W = dense_weight(dense_layers[name]).detach().to(device)
        if tuple(W.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"{name}: dense weight {tuple(W.shape)} does not match the compressed layer")
        B, A, _ = residual_factors(W, layer.U.weight.to(device), layer.V.weight.to(device), lora_rank, config.method,
                                   stats.get(name), config.options)
        out[name] = (B.float(), A.float())
    return out, info


@dataclass
class RecoveryResult:
    """What :func:`recover_` did: ``record`` is the block stored under ``"recovery"`` in the rankcut record."""

    record: dict

    def report(self) -> str:
        """Human-readable lines: mode, which data tuned the model and how much, held-out perplexity, size."""
        r = self.record
        what = {"factors": f"LoRA rank {r['lora_rank']} on every factor U and V, merged back (ranks unchanged)",
                "grow": f"residual adapter of rank {r['lora_rank']} on every layer, merged by concatenation "
                        f"(ranks +{r['lora_rank']})"}[r["mode"]]
        loss = r.get("loss", {}).get("distill_from_dense", 0)
        lines = [f"recovery: {what}; init {r['init']}" + (f"; loss {1 - loss:g} next-token + {loss:g} distillation "
                                                          "from the dense model" if loss else "")]
        data = ", ".join(f"{d['source']} ({d['tokens']:,} tokens)" for d in r["data"])
        lines.append(f"tuned on: {data}; {r['tokens_tuned']:,} tokens seen ({r['steps']} steps x "
                     f"{r['windows_per_step']} windows x {r['seq_len']}), {r['epochs']:.2f} epochs")
        ev = r.get("eval")
        if ev:
            change = 100 * (ev["after"] / ev["compressed"] - 1)
            lines.append(f"held-out perplexity on {ev['source']} (first {ev['windows']} windows of {ev['seq_len']} "
                         f"tokens, never tuned on): compressed {ev['compressed']:.4f} -> recovered {ev['after']:.4f} "
                         f"({change:+.2f}%)")
        else:
            lines.append("held-out perplexity: not measured (give an evaluation text the model was not tuned on)")
        lines.append(f"parameters: {r['params_before']:,} -> {r['params_after']:,}; keep (targets) "
                     f"{r['keep_targets_before']:.4f} -> {r['keep_targets_after']:.4f}; "
                     f"trainable during recovery {r['trainable_params']:,}")
        lines.append(f"wall time {r['wall_s']:.1f} s" + (f" (resumed at step {r['resumed_from']})" if r.get("resumed_from") else ""))
        return "\n".join(lines)


def recover_(
    model: nn.Module,
    tokenizer,
    data,
    config: RecoverConfig | None = None,
    *,
    eval_text=None,
    dense: nn.Module | None = None,
    calib=None,
    work_dir: str | os.PathLike | None = None,
    restart: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_step=None,
) -> RecoveryResult:
    """Recover quality of a compressed ``model`` in place: adapters, training, merge, record.

    Args:
        model: a causal LM holding :class:`LowRankLinear` layers and a rankcut record (from
            :func:`rankcut.compress_` or :func:`rankcut.load`); its weights are trained in their dtype.
        tokenizer: tokenizes the texts.
        data: tuning text(s): a file path, a dataset name (its train split) or a list of them.
        config: what to do (default :class:`RecoverConfig`).
        eval_text: held-out text for perplexity before, during and after (a file or dataset name, test split);
            it may not be one of the tuning files.
        dense: the dense model the checkpoint was compressed from; needed for ``grow`` with ``residual`` init
            and as the teacher when ``config.distill`` > 0.
        calib: calibration text to recompute the method's statistics for that init (default: the first
            ``data`` source).
        work_dir: folder for the resumable state; a run with the same settings continues from its last save.
        restart: discard the work folder's state instead of resuming.
        device: where to train (default CUDA when available).

    Raises:
        ValueError: bad inputs (see messages), all raised before anything is written.
    """
    config = config or RecoverConfig()
    record = get_record(model)
    if record is None or not rankcut_modules(model):
        raise ValueError("model holds no rankcut low-rank layers: compress it (or load a rankcut checkpoint) first")
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise ValueError(f"recovery trains with the next-token loss: {type(model).__name__} is not a causal LM")
    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    check_recover(config, sources, eval_text, dense is not None, calib)
    device = resolve_device(device, model)
    resolve_precision(config.precision, device)
    residual_grow = config.mode == "grow" and config.init == "residual"
    windows, data_info = tuning_windows(sources, tokenizer, config.seq_len)
    if windows.shape[0] < config.batch_size:
        raise ValueError(f"tuning text makes {windows.shape[0]} window(s) of {config.seq_len} tokens, fewer than "
                         f"one batch of {config.batch_size}")
    eval_ids = None if eval_text is None else token_stream(eval_text, tokenizer, split="test")
    if eval_ids is not None and eval_ids.numel() < config.seq_len:
        raise ValueError(f"evaluation text has {eval_ids.numel()} tokens, fewer than one window of {config.seq_len}")
    calib = sources[0] if residual_grow and calib is None else calib
    settings = {"config": {k: v for k, v in config.to_dict().items() if k not in ("eval_every", "eval_windows", "save_every")},
                "model": model_digest(model), "data": data_info,
                "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
                "residual": {"dense": model_digest(dense), "calib": source_name(calib)} if residual_grow else None,
                "teacher": model_digest(dense) if config.distill > 0 else None}
    work = None if work_dir is None else WorkDir(work_dir, settings, restart)
    if work is not None:
        work.check()
    began = time.perf_counter()
    model.to(device)

    def evaluate(m: nn.Module = model) -> float:
        return perplexity(m, tokenizer, eval_ids, config.seq_len, config.eval_windows, config.batch_size, device, False)

    saved = work.load_state() if work is not None else None
    init, residual_info = (work.load_init() if work is not None else None) or (None, None)
    compressed_ppl = (saved or {}).get("compressed_ppl")
    if eval_ids is not None and compressed_ppl is None:
        compressed_ppl = evaluate()
    params_before = count_params(model)
    if config.gradient_checkpointing:  # renamed in later transformers 5 releases; the old name warns there
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, handles, skipped = attach(model, config)
    if init is None:
        residual = None
        if residual_grow:
            residual, residual_info = residual_init(model, list(handles), dense.to(device), tokenizer, calib,
                                                    config.lora_rank, device, progress)
        init = initial_state(handles, config, residual)
    if work is not None:
        work.start()
        work.save_init(init, residual_info)
    apply_state(handles, init)
    n_trainable = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    extra = {"compressed_ppl": compressed_ppl}
    teacher = None
    if config.distill > 0:
        teacher = dense.to(device).eval()
        teacher.requires_grad_(False)
    log_ = fit(trainable, windows, config, device, evaluate if eval_ids is not None else None, work, saved,
               progress, on_step, extra, teacher)
    merged = merge(trainable, model, config)
    assert merged is model
    if config.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    after = None if eval_ids is None else evaluate()
    block = _record(model, record, config, data_info, windows.shape[0], log_, skipped, params_before, n_trainable)
    block.update(wall_s=time.perf_counter() - began, residual_init=residual_info)
    if eval_ids is not None:
        block["eval"] = {"source": source_name(eval_text), "windows": min(config.eval_windows, eval_ids.numel() // config.seq_len),
                         "seq_len": config.seq_len, "compressed": compressed_ppl, "after": after, "history": log_.evals}
    from rankcut.modules import record_entry

    if record.recovery:
        record.recovery_history = [*record.recovery_history, record.recovery]
    record.recovery = block
    record.keep_targets, record.keep_model = block["keep_targets_after"], block["keep_model_after"]
    record.targets = {name: record_entry(module) for name, module in rankcut_modules(model).items()}
    set_record(model, record)
    return RecoveryResult(block)


INIT_DETAIL = {
    ("factors", "zero"): "LoRA default on each factor: A random (Kaiming uniform), B zero",
    ("factors", "residual"): "PiSSA on each factor: the adapter holds the factor's top singular directions, the "
                             "frozen factor the rest (function unchanged at the start)",
    ("grow", "zero"): "LoRA default: A random (Kaiming uniform), B zero",
    ("grow", "residual"): "next singular directions of the residual W - UV in the method's space (LoftQ-style)",
}


def _record(model, record, config, data_info, n_windows, log_, skipped, params_before, n_trainable) -> dict:
    """The ``recovery`` block of the rankcut record."""
    summary = record.summary or {}
    params_after = count_params(model)
    targets = summary.get("target_params_before") or 1
    keep_before = record.keep_targets if record.keep_targets is not None else float("nan")
    per_step = config.batch_size * config.grad_accum
    tail = log_.losses[-10:]
    return {
        "mode": config.mode, "init": config.init, "init_detail": INIT_DETAIL[(config.mode, config.init)],
        "lora_rank": config.lora_rank, "lora_alpha": config.lora_rank * config.scaling, "config": config.to_dict(),
        "data": data_info, "steps": config.steps, "seq_len": config.seq_len, "windows_per_step": per_step,
        "tokens_tuned": config.steps * per_step * config.seq_len, "epochs": config.steps * per_step / n_windows,
        "loss_first": log_.losses[0] if log_.losses else None, "loss_last10": sum(tail) / len(tail) if tail else None,
        "losses": [round(x, 5) for x in log_.losses],
        "params_before": params_before, "params_after": params_after, "trainable_params": n_trainable,
        "keep_targets_before": keep_before, "keep_targets_after": keep_before + (params_after - params_before) / targets,
        "keep_model_after": params_after / (summary.get("model_params_before") or params_after),
        "loss": {"next_token": 1 - config.distill, "distill_from_dense": config.distill},
        "skipped": skipped, "resumed_from": log_.resumed_from, "train_wall_s": log_.wall_s,
    }
