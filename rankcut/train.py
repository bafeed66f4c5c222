"""The recovery training loop: deterministic for a seed, resumable after an interruption, CPU or GPU.

Windows of ``seq_len`` tokens are cut from the tuning text and visited in a seeded random order, a fresh
permutation per epoch; which window a step reads is a function of (seed, step) alone, so a resumed run reads
exactly what an uninterrupted one would. The optimizer, scheduler, gradient scaler, RNG states and trainable
weights are written to a work folder every ``save_every`` steps (atomically), and a re-run continues from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rankcut.data import source_name, token_stream

log = logging.getLogger(__name__)


def tuning_windows(sources: list, tokenizer, seq_len: int) -> tuple[torch.Tensor, list[dict]]:
    """Non-overlapping windows of ``seq_len`` tokens over the concatenated tuning sources (train splits of
    datasets; files as is), and per source its name, path and token count."""
    streams, info = [], []
    for source in sources:
        ids = token_stream(source, tokenizer, split="train")
        path = str(source) if isinstance(source, (str, os.PathLike)) else None
        info.append({"source": source_name(source), "path": os.path.abspath(path) if path and os.path.exists(path) else path,
                     "tokens": int(ids.numel())})
        streams.append(ids)
    ids = torch.cat(streams)
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len), info


@lru_cache(maxsize=4)
def _order(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_rows(step: int, micro: int, batch: int, accum: int, count: int, seed: int) -> list[int]:
    """Window indices of micro-batch ``micro`` of optimizer step ``step`` (sample g of the run is window
    ``perm_epoch(g mod count)`` with ``epoch = g // count``)."""
    first = (step * accum + micro) * batch
    return [int(_order(count, seed, g // count)[g % count]) for g in range(first, first + batch)]


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, else fp32. fp16 needs CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


class WorkDir:
    """The resumable state of one recovery run: ``settings.json``, ``init.safetensors``, ``state.pt``.

    Args:
        path: the folder (created on first write).
        settings: everything that determines the result; a folder holding other settings is refused.
        restart: discard a folder holding other settings instead of refusing.
    """

    def __init__(self, path: str | os.PathLike, settings: dict, restart: bool = False) -> None:
        self.path, self.settings, self.restart = Path(path), json.loads(json.dumps(settings, default=str)), restart

    def check(self) -> None:
        """Raise ValueError when the folder is not a work folder, or holds a run with other settings and
        ``restart`` is off. Writes nothing."""
        if not self.path.exists():
            return
        stored = self._stored()
        if stored is None and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ValueError(f"{self.path} exists and is not a rankcut recover work folder")
        if stored is not None and stored != self.settings and not self.restart:
            differ = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            raise ValueError(f"work folder {self.path} holds an unfinished run with other settings "
                             f"(differing: {', '.join(differ)}); pass restart (--restart) to discard it")

    def _stored(self) -> dict | None:
        try:
            return json.loads((self.path / "settings.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @property
    def resumable(self) -> bool:
        """The folder holds a run of the same settings, and ``restart`` was not asked for."""
        return not self.restart and self._stored() == self.settings

    def start(self) -> None:
        """Create the folder (discarding what it held unless :attr:`resumable`) and write the settings."""
        self.check()
        if self.path.exists() and not self.resumable:
            shutil.rmtree(self.path)
        self.restart = False
        self.path.mkdir(parents=True, exist_ok=True)
        self._write("settings.json", lambda tmp: tmp.write_text(json.dumps(self.settings, indent=1)))

    def _write(self, name: str, writer) -> None:
        tmp = self.path / f".{name}.tmp"
        writer(tmp)
        os.replace(tmp, self.path / name)

    def load_init(self) -> tuple[dict, dict | None] | None:
        """The adapters' starting values and the caller's note saved with them, or None."""
        path = self.path / "init.safetensors"
        if not (self.resumable and path.is_file()):
            return None
        with safe_open(str(path), "pt") as handle:
            note = json.loads((handle.metadata() or {}).get("note", "null"))
        return load_file(str(path)), note

    def save_init(self, state: dict, note: dict | None = None) -> None:
        self._write("init.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"note": json.dumps(note)}))

    def load_state(self) -> dict | None:
        path = self.path / "state.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if self.resumable and path.is_file() else None

    def save_state(self, state: dict) -> None:
        self._write("state.pt", lambda tmp: torch.save(state, tmp))


def step_loss(model: nn.Module, ids: torch.Tensor, distill: float = 0.0, teacher: nn.Module | None = None) -> torch.Tensor:
    """``(1 − distill)·`` next-token cross-entropy ``+ distill·`` token-mean KL(teacher ‖ model)."""
    out = model(input_ids=ids, labels=ids if distill < 1 else None, use_cache=False)
    loss = 0.0
    if distill < 1:
        if out.loss is None:
            raise ValueError("the model returned no loss: recovery needs a causal LM")
        loss = (1 - distill) * out.loss
    if distill > 0:
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        student = F.log_softmax(out.logits.float(), dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1).mean()
        loss = loss + distill * kl
    return loss


@dataclass
class TrainLog:
    """What the loop did: per-step mean loss, held-out perplexities ``[step, ppl]``, where it resumed."""

    losses: list[float] = field(default_factory=list)
    evals: list[list[float]] = field(default_factory=list)
    resumed_from: int | None = None
    wall_s: float = 0.0


def fit(
    model: nn.Module,
    windows: torch.Tensor,
    config,
    device: torch.device,
    evaluate=None,
    work: WorkDir | None = None,
    saved: dict | None = None,
    progress: bool = True,
    on_step=None,
    extra: dict | None = None,
    teacher: nn.Module | None = None,
) -> TrainLog:
    """Train the parameters of ``model`` that require gradients on ``windows`` (causal LM loss).

    Args:
        config: a :class:`~rankcut.recover.RecoverConfig`.
        evaluate: ``evaluate() -> float``, held-out perplexity, run at step 0 and every ``config.eval_interval``.
        work, saved: the work folder to save into, and the state read from it to resume from (or None).
        on_step: called as ``on_step(step)`` after each completed step (and after any save at that step).
        extra: more entries for each saved state (the caller's own, read back from ``saved``).
        teacher: the dense model, for ``config.distill`` > 0.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.warmup, config.steps))
    precision = resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    record, start = TrainLog(), 0
    if saved is not None:
        with torch.no_grad():
            for name, param in named:
                param.copy_(saved["trainable"][name])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        start = int(saved["step"])
        record = TrainLog(list(saved["losses"]), [list(e) for e in saved["evals"]], start, float(saved["wall_s"]))
        log.info("resuming from step %d of %d (%s)", start, config.steps, work.path if work else "memory")
    else:
        torch.manual_seed(config.seed + 1)
        if evaluate is not None:
            record.evals.append([0, evaluate()])
    began = time.perf_counter() - record.wall_s
    bar = tqdm(total=config.steps, initial=start, desc="recover", unit="step", disable=not progress)
    postfix = {} if not record.evals else {"held-out ppl": f"{record.evals[-1][1]:.3f}"}
    model.train()
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accum):
            rows = batch_rows(step, micro, config.batch_size, config.grad_accum, windows.shape[0], config.seed)
            ids = windows[rows].to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = step_loss(model, ids, config.distill, teacher)
            scaler.scale(loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {step + 1}; lower lr or use fp32/bf16")
        if config.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        record.losses.append(total)
        done = step + 1
        if evaluate is not None and (done % config.eval_interval == 0 or done == config.steps):
            record.evals.append([done, evaluate()])
            model.train()
            postfix["held-out ppl"] = f"{record.evals[-1][1]:.3f}"
            log.info("step %d: held-out perplexity %.4f", done, record.evals[-1][1])
        bar.set_postfix(loss=f"{total:.4f}", **postfix)
        bar.update(1)
        if work is not None and done % config.save_every == 0 and done < config.steps:
            record.wall_s = time.perf_counter() - began
            work.save_state({
                "step": done, "trainable": {n: p.detach().cpu().clone() for n, p in named},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {}),
                "losses": record.losses, "evals": record.evals, "wall_s": record.wall_s, **(extra or {}),
            })
        if on_step is not None:
            on_step(done)
    bar.close()
    model.eval()
    record.wall_s = time.perf_counter() - began
    return record
