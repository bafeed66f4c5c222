"""Measured sensitivity: the cost of truncating each target alone, on a grid of ranks.

For every target, the method's factors are computed once (at the largest useful rank, from the same
calibration statistics compression uses); then, one target at a time and one rank at a time, the target is
replaced by its truncation and the model is scored on *scoring windows* of the calibration text (never the
evaluation text; by default windows that the statistics did not use):

- ``kl`` (default): the mean over tokens of KL(dense ‖ truncated) of the next-token distributions: it measures
  how far the model moves, on every token and every vocabulary entry, not only on the observed next token;
- ``loss``: the increase of the mean next-token loss;
- ``fisher``: the KL(dense ‖ truncated) *predicted* to second order, for every rank at once, from one forward
  and backward pass per batch (:func:`fisher_curves`): no forward pass per (target, rank), so it scales to
  large models.

Results are cached in a directory, keyed by the model's weights (SHA-256), the calibration and scoring tokens
and every setting; a cache made for anything else is never reused (:func:`load_sensitivity` says what differs),
and a partial run resumes target by target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rankcut.calibrate import batches, model_inputs
from rankcut.config import CompressConfig
from rankcut.data import calibration_windows, source_name, token_stream
from rankcut.methods import Item
from rankcut.modules.dense import dense_weight
from rankcut.pipeline import Visitor, check_finite_weights, run_blocks
from rankcut.targets import find_targets, replace_module, target_infos
from rankcut.utils import Timer, default_seq_len, resolve_device

log = logging.getLogger(__name__)

RESULT = "sensitivity.json"
SCORES = ("fisher", "kl", "loss")
DEFAULT_FRACTIONS = (0.5,)  # one point per target: the sensitivity policy's spectrum prior gives the shape


@dataclass(frozen=True)
class SensitivitySettings:
    """What a measurement depends on besides the model and the text (all of it is in the cache key).

    Attributes:
        fractions: ranks measured, as fractions of each target's largest useful rank (rounded to ``rank_multiple``);
            ``fisher`` scores every multiple of ``rank_multiple`` instead (it costs the same).
        score: ``fisher``, ``kl`` or ``loss``.
        windows, seq_len: scoring windows (``seq_len`` None: the calibration window length).
        seed: draws the scoring windows among the calibration text's windows that calibration did not use.
        rank_multiple: ranks are rounded to multiples of this (as the allocator offers them).
        batch_size: scoring windows per forward pass.
    """

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    score: str = "kl"
    windows: int = 32
    seq_len: int | None = None
    seed: int = 1
    rank_multiple: int = 8
    batch_size: int = 8

    def __post_init__(self) -> None:
        fractions = tuple(sorted({float(f) for f in self.fractions}))
        if not fractions or any(not (0 < f <= 1) for f in fractions):
            raise ValueError(f"fractions must be numbers in (0, 1], got {self.fractions!r}")
        object.__setattr__(self, "fractions", fractions)
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        for name in ("windows", "rank_multiple", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                         or self.seq_len < 2):
            raise ValueError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")


@dataclass
class SensitivityResult:
    """Per target: the ranks measured, their parameters and scores; the dense model's own loss."""

    key: str
    settings: dict
    curves: dict[str, dict] = field(default_factory=dict)
    dense_loss: float | None = None
    times: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SensitivityResult:
        return cls(**data)

    def cost(self, name: str, rank: int) -> float:
        """The score of target ``name`` at ``rank``: measured, or linear between measured ranks (log-linear in
        the score), the lowest measured rank's score below it, and 0 at or above break-even."""
        curve = self.curves[name]
        ranks, scores = curve["ranks"], curve["scores"]
        if rank >= curve["limit"] + 1:
            return 0.0
        if rank <= ranks[0]:
            return scores[0]
        points = list(zip(ranks, scores)) + ([(curve["limit"] + 1, 0.0)] if ranks[-1] < curve["limit"] + 1 else [])
        for (r0, s0), (r1, s1) in zip(points, points[1:]):
            if r0 <= rank <= r1:
                t = (rank - r0) / (r1 - r0)
                if s0 > 0 and s1 > 0:
                    return math.exp((1 - t) * math.log(s0) + t * math.log(s1))
                return (1 - t) * s0 + t * s1
        return 0.0


def model_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's name and bytes, in order."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def scoring_windows(calib, tokenizer, config: CompressConfig, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of the calibration text that calibration does not use (when the text
    holds enough), drawn with ``seed``."""
    if isinstance(calib, torch.Tensor) and calib.ndim == 2:
        return calibration_windows(calib, tokenizer, min(n, calib.shape[0]), seq_len, seed)
    ids = token_stream(calib, tokenizer, split="train")
    available = ids.numel() // seq_len
    chunks = ids[: available * seq_len].view(available, seq_len)
    used = set()
    if seq_len == (config.seq_len or seq_len):
        order = torch.randperm(available, generator=torch.Generator().manual_seed(config.seed))
        used = set((order[: config.calib_samples] if config.sampling == "random" else torch.arange(
            min(config.calib_samples, available))).tolist())
    free = [i for i in range(available) if i not in used]
    if len(free) < n:
        log.warning("scoring windows: only %d windows of the calibration text are unused by calibration; %d asked, "
                    "the rest are drawn from the calibration windows", len(free), n)
        free = list(range(available))
    if len(free) < n:
        raise ValueError(f"calibration text makes {available} window(s) of {seq_len} tokens; {n} scoring windows "
                         "requested")
    pick = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return chunks[[free[i] for i in pick.tolist()]].clone()


class CandidateCollector(Visitor):
    """Decomposes every target at its largest useful rank and keeps the compact candidates (no swap)."""

    def __init__(self, config: CompressConfig, infos: dict, device: torch.device, timer: Timer) -> None:
        self.config, self.infos, self.device, self.timer = config, infos, device, timer
        self.spec = config.method_spec
        self.stat = self.spec.stat
        self.candidates: dict = {}

    def visit(self, block, targets, stats) -> None:
        units = self.spec.units([self.infos[n] for n in targets], self.config.options)
        if any(len(u.names) > 1 for u in units):
            raise ValueError(f"sensitivity measures one target at a time; method {self.spec.name!r} decomposes groups")
        for unit in units:
            (name,) = unit.names
            if unit.limit < 1:
                continue
            with self.timer("decomposition"):
                W = dense_weight(targets[name]).detach().to(self.device)
                stat = None if stats is None or self.stat is None else stats(name).to(self.device)
                try:
                    cand = self.spec.decompose([Item(unit.targets[0], W, stat)], self.config.options, unit.limit,
                                               self.config.seed)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from err
                self.candidates[name] = (unit, cand.compact(dense_weight(targets[name]).dtype))


def _grid(limit: int, fractions, multiple: int) -> list[int]:
    ranks = set()
    for f in fractions:
        r = max(1, round(f * limit / multiple) * multiple if limit >= multiple else round(f * limit))
        ranks.add(min(r, limit))
    return sorted(ranks)


@torch.no_grad()
def _score(model, windows, batch_size, device, dense_logp=None):
    """``(mean next-token loss, mean KL(dense ‖ model) or None, log-probabilities when dense_logp is None)``."""
    total_loss, total_kl, count, keep = 0.0, 0.0, 0, []
    for i, ids in enumerate(batches(windows, batch_size)):
        ids = ids.to(device)
        logits = model(**model_inputs(model, ids)).logits[:, :-1].float()
        logp = F.log_softmax(logits, -1)
        total_loss += float(F.nll_loss(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        if dense_logp is None:
            keep.append(logp.cpu())
        else:
            ref = dense_logp[i].to(device)
            total_kl += float((ref.exp() * (ref - logp)).sum())
        count += ids[:, 1:].numel()
    return total_loss / count, (None if dense_logp is None else total_kl / count), keep


def fisher_curves(model: nn.Module, candidates: dict, windows: torch.Tensor, batch_size: int, device,
                  seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Second-order predicted KL(dense ‖ truncated) of each target alone, at every rank of its candidate.

    Truncating a target to rank r changes its output by ``δy = Σ_{i≥r} u_i (v_i · x)`` (``U``, ``V`` the
    candidate's factors, ordered by singular value). With ``g = ∂ log p(y)/∂ output`` for next tokens ``y``
    *sampled from the dense model*, ``E[g gᵀ]`` is the Fisher matrix of KL(dense ‖ ·) at the dense model, so
    ``KL ≈ ½ E[(gᵀ δy)²]``, estimated per token: ``½ mean_t (Σ_{i≥r} (g_t·u_i)(v_i·x_t))²`` — suffix sums give
    every r in one pass. (Cross-token terms of the per-sequence Fisher are dropped: the per-token form.)

    Returns:
        ``{name: c}`` with ``c[r]`` the prediction at rank r (``c[max_rank]`` the residual beyond the candidate).
    """
    targets = {name: model.get_submodule(name) for name in candidates}
    store: dict = {}
    sums = {name: None for name in targets}
    hooks = []

    def hook(name):
        def forward(module, args, out):
            store[name] = [args[0].detach()]
            out.register_hook(lambda grad: store[name].append(grad.detach()))
        return forward

    for name, module in targets.items():
        hooks.append(module.register_forward_hook(hook(name)))
    embeddings = model.get_input_embeddings()
    hooks.append(embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True)))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = 0
    try:
        for ids in tqdm(list(batches(windows, batch_size)), desc="fisher", disable=not progress):
            ids = ids.to(device)
            store.clear()
            with torch.enable_grad():
                logp = F.log_softmax(model(**model_inputs(model, ids)).logits.float(), -1)
                flat = logp.reshape(-1, logp.shape[-1])
                sampled = torch.multinomial(flat.detach().exp().cpu(), 1, generator=gen).to(device)
                flat.gather(-1, sampled).sum().backward()
            tokens += ids.numel()
            with torch.no_grad():
                for name, cand in candidates.items():
                    x, g = store[name]
                    U, V = cand.U.to(device, torch.float64), cand.V.to(device, torch.float64)
                    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                    g = g.reshape(-1, g.shape[-1]).to(torch.float64)
                    c = (g @ U) * (x @ V.mT)
                    tail = (c.flip(1).cumsum(1).flip(1) ** 2).sum(0).cpu()
                    sums[name] = tail if sums[name] is None else sums[name] + tail
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {name: torch.cat([0.5 * s / tokens, s.new_zeros(1)]) for name, s in sums.items()}


def measure_sensitivity(model: nn.Module, tokenizer, calib, config: CompressConfig, settings: SensitivitySettings
                        | None = None, *, output: str | os.PathLike | None = None, device=None,
                        progress: bool = True) -> SensitivityResult:
    """Measure every target's truncation cost curve (the model is left as it was).

    Args:
        model: the dense model.
        calib: the calibration text (statistics and scoring windows come from it).
        config: the compression settings the curves are for (method, its options, calibration windows,
            targets); the allocation in it is ignored.
        settings: what to measure (grid, score, scoring windows).
        output: directory for the cached result; a finished result with the same key is returned as is, a
            partial one resumes, one with another key is an error (nothing is overwritten).
        device: where the model runs (default: CUDA when available).

    Raises:
        ValueError: a stale cache in ``output``, calibration text too short, a group method.
    """
    settings = settings or SensitivitySettings()
    timer = Timer()
    began = time.perf_counter()
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)
    device = resolve_device(device, model)
    seq_len = config.seq_len or default_seq_len(model)
    windows = None
    if config.method_spec.stat is not None:
        if calib is None:
            raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
        windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
    if calib is None:
        raise ValueError("sensitivity scores on calibration text: give calib=...")
    score_windows = scoring_windows(calib, tokenizer, config, settings.seq_len or seq_len, settings.windows,
                                    settings.seed)
    key_data = {
        "model": model_digest(model),
        "calibration": None if windows is None else hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "scoring": hashlib.sha256(score_windows.numpy().tobytes()).hexdigest(),
        "config": {k: v for k, v in config.to_dict().items()
                   if k not in ("allocation", "keep", "energy", "rank", "speedup", "policy_options", "overrides")},
        "settings": dataclasses.asdict(settings),
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()
    info = {**key_data, "calib_source": source_name(calib), "scoring_windows": list(score_windows.shape)}
    result = SensitivityResult(key, info)
    if output is not None:
        previous = _read(Path(output))
        if previous is not None:
            if previous.key != key:
                raise ValueError(stale_message(Path(output), previous, info))
            if previous.times.get("complete"):
                log.warning("using the cached sensitivity in %s (same model weights, data and settings)", output)
                return previous
            result = previous
            log.warning("resuming the sensitivity measurement in %s (%d targets done)", output, len(result.curves))
    collector = CandidateCollector(config, {i.name: i for i in target_infos(model, targets)}, device, timer)
    run_blocks(model, dict(targets), windows, collector, device=device, batch_size=config.batch_size,
               layerwise=config.layerwise, progress=progress, timer=timer)
    home = next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        with timer("scoring"):
            dense_loss, _, dense_logp = _score(model, score_windows, settings.batch_size, device)
            result.dense_loss = dense_loss
            todo = [(name, unit, cand) for name, (unit, cand) in collector.candidates.items() if name not in result.curves]
            if settings.score == "fisher" and todo:
                predicted = fisher_curves(model, {n: c for n, (_, c) in collector.candidates.items()}, score_windows,
                                          settings.batch_size, device, settings.seed, progress)
                for name, unit, cand in todo:
                    m, n = unit.targets[0].shape
                    full = predicted[name]
                    ranks = list(range(settings.rank_multiple, unit.limit + 1, settings.rank_multiple)) or \
                        list(range(1, unit.limit + 1))
                    result.curves[name] = {"ranks": ranks, "params": [r * (m + n) for r in ranks],
                                           "scores": [float(full[r]) for r in ranks], "loss_increase": None,
                                           "limit": unit.limit, "shape": [m, n], "block": unit.targets[0].block,
                                           "kind": unit.targets[0].kind}
                todo = []
            bar = tqdm(total=sum(len(_grid(u.limit, settings.fractions, settings.rank_multiple)) for _, u, _ in todo),
                       desc="sensitivity", disable=not progress)
            for name, unit, cand in todo:
                dense = model.get_submodule(name)
                ranks = _grid(unit.limit, settings.fractions, settings.rank_multiple)
                scores, losses = [], []
                try:
                    for rank in ranks:
                        replace_module(model, name, cand.build(rank, {name: dense})[name].to(device))
                        loss, kl, _ = _score(model, score_windows, settings.batch_size, device, dense_logp)
                        losses.append(loss - dense_loss)
                        scores.append(kl if settings.score == "kl" else loss - dense_loss)
                        bar.update()
                finally:
                    replace_module(model, name, dense)
                m, n = unit.targets[0].shape
                result.curves[name] = {"ranks": ranks, "params": [r * (m + n) for r in ranks], "scores": scores,
                                       "loss_increase": losses, "limit": unit.limit, "shape": [m, n],
                                       "block": unit.targets[0].block, "kind": unit.targets[0].kind}
                if output is not None:
                    _write(Path(output), result)
            bar.close()
    finally:
        model.train(was_training)
        model.to(home)
    result.times = {**{k: round(v, 3) for k, v in timer.times.items()}, "total": time.perf_counter() - began,
                    "complete": True}
    if output is not None:
        _write(Path(output), result)
    return result


def _read(path: Path) -> SensitivityResult | None:
    file = path / RESULT
    if not file.is_file():
        return None
    try:
        return SensitivityResult.from_json(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not a rankcut sensitivity result: {err}") from None


def _write(path: Path, result: SensitivityResult) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(result.to_json(), indent=1))
    tmp.replace(path / RESULT)


def stale_message(path: Path, previous: SensitivityResult, info: dict) -> str:
    """Which of model, data and settings differ between a cached result and this request."""
    differ = []
    for key in ("model", "calibration", "scoring"):
        if previous.settings.get(key) != info.get(key):
            differ.append({"model": "the model's weights", "calibration": "the calibration windows",
                           "scoring": "the scoring windows"}[key])
    for group in ("config", "settings"):
        old, new = previous.settings.get(group, {}), json.loads(json.dumps(info.get(group, {}), default=str))
        differ += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return (f"{path} holds a sensitivity measurement of something else ({'; '.join(differ) or 'another key'}); "
            "it is never reused for this one: choose another directory or delete it")


def load_sensitivity(path: str | os.PathLike) -> SensitivityResult:
    """A finished result from ``path``.

    Raises:
        ValueError: nothing there, or an unfinished measurement.
    """
    result = _read(Path(path))
    if result is None:
        raise ValueError(f"{path} holds no sensitivity measurement ({RESULT}); run rankcut sensitivity first")
    if not result.times.get("complete"):
        raise ValueError(f"{path} holds an unfinished sensitivity measurement; re-run the same command to finish it")
    return result


def check_matches(result: SensitivityResult, model: nn.Module, config: CompressConfig) -> None:
    """Raise ValueError unless ``result`` was measured on ``model``'s weights with ``config``'s method and
    calibration settings (a plan for another model or method would be silently wrong)."""
    if result.settings.get("model") != model_digest(model):
        raise ValueError("the sensitivity measurement is of another model (its weights differ): measure this one")
    ours = {k: v for k, v in config.to_dict().items()
            if k not in ("allocation", "keep", "energy", "rank", "speedup", "policy_options", "overrides")}
    theirs = result.settings.get("config", {})
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        raise ValueError("the sensitivity measurement was made with other settings: " +
                         "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ))


# ------------------------------------------------------------------------------------------------ figures


def write_figures(result: SensitivityResult, directory: str | os.PathLike) -> list[Path]:
    """``sensitivity_heatmap.png`` (layer × tensor type: the score at the middle measured rank, log colour) and
    ``sensitivity_curves.png`` (score against the kept fraction of each target's parameters, per tensor type)."""
    from rankcut.plots import _pyplot

    plt = _pyplot()
    from matplotlib.colors import LogNorm

    directory = Path(directory)
    curves = result.curves
    kinds = list(dict.fromkeys(c["kind"] for c in curves.values()))  # in model order
    blocks = sorted({c["block"] for c in curves.values() if c["block"] is not None})
    fraction = result.settings["settings"]["fractions"][len(result.settings["settings"]["fractions"]) // 2]
    grid = torch.full((len(blocks), len(kinds)), float("nan"))
    for c in curves.values():
        if c["block"] is None:
            continue
        target = max(1, round(fraction * c["limit"]))
        grid[blocks.index(c["block"]), kinds.index(c["kind"])] = max(
            1e-12, next((s for r, s in zip(c["ranks"], c["scores"]) if r >= target), c["scores"][-1]))
    score = {"kl": "KL(dense ‖ truncated)", "loss": "loss increase", "fisher": "predicted KL"}[
        result.settings["settings"]["score"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2.5, 0.42 * len(blocks) + 2.0))
    finite = grid[torch.isfinite(grid)]
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.numel() else None
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8)
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=f"{score}\nat rank ≈ {fraction:g} × largest useful")
    ax.set_title("cost of truncating one target alone", fontsize=10)
    fig.tight_layout()
    heat = directory / "sensitivity_heatmap.png"
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, 3.0 * rows + 0.8), squeeze=False)
    flat = [a for row in axes for a in row]
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(flat, kinds):
        members = [c for c in curves.values() if c["kind"] == kind]
        for i, c in enumerate(members):
            m, n = c["shape"]
            keep = [p / (m * n) for p in c["params"]]
            ax.semilogy(keep, [max(s, 1e-9) for s in c["scores"]], "-o", ms=2, lw=1,
                        color=cmap(i / max(1, len(members) - 1)), label=f"layer {c['block']}")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("kept fraction of the target's parameters", fontsize=8)
        ax.set_ylabel(score, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in flat[len(kinds):]:
        ax.set_visible(False)
    if flat:
        flat[0].legend(fontsize=6)
    fig.suptitle(f"measured sensitivity ({score} on {result.settings['scoring_windows'][0]} scoring windows)", fontsize=10)
    fig.tight_layout()
    path = directory / "sensitivity_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [heat, path]
