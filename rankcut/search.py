"""``rankcut search``: the design space of Moar et al. (seed 004) searched for the lowest latency × energy under
a quality tolerance, every reported point verified.

A configuration γ gives each target a rank or keeps it dense. Two families are searched:

- **allocated** plans: the configured allocation policy (``spectrum``, or ``sensitivity`` with a measurement) at a
  ladder of parameter budgets;
- the seed's **structured** space: one pruned rank (rank 1, or a fraction of each target's largest useful rank)
  for a set of tensors (all, attention, MLP) of a set of layers, layers evenly spread from ``first_layer`` on.
  The seed's own recipe — rank 1, all tensors of a layer, early layers avoided, layers far apart — is the
  ``seed-recipe`` subset of it, reported as a baseline.

Each configuration is scored on the **dev** text (perplexity increase over the dense model) with factors
truncated from one decomposition of every target; the objective comes from the roofline cost model
(:mod:`rankcut.cost`; an H200 in bf16): latency = predicted seconds per decode token, energy = latency × the
average power of the dense Llama-2-7B decode measured on that GPU (a documented model: with constant power,
EDP = P·latency² ranks configurations as latency does), or parameters. The configurations within the
tolerance τ with the lowest objectives, and the Pareto front, are then **verified**: compressed again exactly
as ``rankcut compress --plan`` does (the ``plan`` policy, the same statistics), stored in the checkpoint's dtype,
and evaluated; only verified figures are reported.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut import cost as cost_model
from rankcut.compress import compress_with_stats_, dense_stats
from rankcut.config import CompressConfig
from rankcut.data import calibration_windows, source_name
from rankcut.evaluate.perplexity import perplexity
from rankcut.pipeline import run_blocks
from rankcut.policies import make_policy
from rankcut.sensitivity import CandidateCollector, model_digest
from rankcut.targets import find_blocks, find_targets, replace_module, target_infos
from rankcut.utils import Timer, default_seq_len, resolve_device

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "energy", "edp", "params")
#: Average GPU power of dense Llama-2-7B batch-1 decode on the H200 (BENCHMARKS.md, decode benchmark:
#: 2.098 J/token at 228.8 tokens/s), the constant of the documented energy model.
H200_DECODE_WATTS = 2.098 * 228.8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.c_proj", "query_key_value", "attention.dense",
             "out_proj", "self.query", "self.key", "self.value", "attention.output.dense")


@dataclass(frozen=True)
class SearchSettings:
    """What the search explores and how it judges.

    Attributes:
        tau: tolerated relative perplexity increase over the dense model on the dev text (0.05 = 5 %).
        objective: ``latency``, ``energy``, ``edp`` (latency × energy) or ``params``.
        dev_windows, dev_seq_len: the dev text's first windows that are scored (seq_len None: the calibration
            window length).
        keeps: parameter budgets of the allocated plans.
        ranks: pruned ranks of the structured space: integers are ranks, fractions < 1 are fractions of each
            target's largest useful rank.
        tensor_sets: ``all``, ``attention``, ``mlp``.
        first_layer: the structured space's first decomposable layer (None: a quarter of the depth, at least 1;
            the seed avoids early layers).
        verify: how many feasible configurations (lowest objective first) are verified, besides the front.
        batch_size: windows per forward pass in evaluation.
    """

    tau: float = 0.05
    objective: str = "edp"
    dev_windows: int = 24
    dev_seq_len: int | None = None
    keeps: tuple[float, ...] = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)
    ranks: tuple[float, ...] = (1, 0.05, 0.1, 0.25, 0.5)
    tensor_sets: tuple[str, ...] = ("all", "attention", "mlp")
    first_layer: int | None = None
    verify: int = 4
    batch_size: int = 8

    def __post_init__(self) -> None:
        ok = isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and math.isfinite(self.tau)
        if not ok or self.tau <= 0:
            raise ValueError(f"tau must be a number > 0 (a tolerated relative perplexity increase), got {self.tau!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if any(not 0 < k <= 1 for k in self.keeps):
            raise ValueError(f"keeps must lie in (0, 1], got {self.keeps!r}")
        if any(r <= 0 or (r >= 1 and not float(r).is_integer()) for r in self.ranks):
            raise ValueError(f"ranks must be integers >= 1 or fractions in (0, 1), got {self.ranks!r}")
        unknown = [t for t in self.tensor_sets if t not in ("all", "attention", "mlp")]
        if unknown:
            raise ValueError(f"unknown tensor set(s) {unknown}; choose all, attention, mlp")
        for name in ("dev_windows", "verify", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def is_attention(kind: str) -> bool:
    return any(kind.endswith(a) for a in ATTENTION)


def spread_layers(first: int, last: int, count: int) -> list[int]:
    """``count`` layers of ``first..last`` as far apart as possible (the seed's rule), including both ends."""
    if count == 1:
        return [last]
    step = (last - first) / (count - 1)
    return sorted({first + round(i * step) for i in range(count)})


def structured_configs(infos, limits: dict[str, int], settings: SearchSettings, blocks: int) -> list[dict]:
    """The seed's space: (pruned rank, tensor set, spread layer set) -> ranks per target."""
    first = settings.first_layer if settings.first_layer is not None else max(1, blocks // 4)
    if not 0 <= first < blocks:
        raise ValueError(f"first_layer {first} is outside the model's {blocks} layers")
    out = []
    for pr in settings.ranks:
        for tensors in settings.tensor_sets:
            for count in range(1, blocks - first + 1):
                layers = spread_layers(first, blocks - 1, count)
                ranks = {}
                for t in infos:
                    chosen = t.block in layers and (tensors == "all" or (tensors == "attention") == is_attention(t.kind))
                    if not chosen or limits[t.name] < 1:
                        ranks[t.name] = None
                        continue
                    r = int(pr) if pr >= 1 else max(1, round(pr * limits[t.name]))
                    ranks[t.name] = min(r, limits[t.name])
                recipe = pr == 1 and tensors == "all"
                out.append({"family": "seed-recipe" if recipe else "structured", "pruned_rank": pr, "tensors": tensors,
                            "layers": layers, "ranks": ranks})
    return out


def objective_of(rows: list[tuple[str, int, int, int | None]], head, blocks: int) -> dict:
    """Predicted decode latency (s/token), energy (J/token, documented constant-power model), EDP, parameters."""
    latency = cost_model.targets_time(rows) + cost_model.fixed_decode_seconds(head, blocks)
    energy = latency * H200_DECODE_WATTS
    params = sum(m * n if r is None else r * (m + n) for _, m, n, r in rows)
    return {"latency": latency, "energy": energy, "edp": latency * energy, "params": params}


def pareto(points: list[dict], objective: str) -> list[dict]:
    """The points not dominated in (objective, perplexity increase), objective ascending."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["predicted"][objective], p["increase"])):
        if p["increase"] < best - 1e-12:
            front.append(p)
            best = p["increase"]
    return front


def search(model: nn.Module, tokenizer, calib, dev, config: CompressConfig, settings: SearchSettings | None = None,
           *, context: dict | None = None, store_dtype: torch.dtype | None = None, device=None,
           progress: bool = True) -> dict:
    """Search the design space; returns the results (see the module docstring); the model is left unchanged.

    Args:
        calib: calibration text (the method's statistics, and the spectrum/sensitivity of allocated plans).
        dev: the dev text the tolerance is judged on (never the calibration or the final evaluation text).
        config: method, its options and the calibration windows; its ``allocation`` (``spectrum`` by default
            when it is ``uniform``) makes the allocated plans.
        context: the allocation policy's inputs (``{"sensitivity": result}`` for ``sensitivity``).
        store_dtype: the checkpoint's dtype: verified configurations are evaluated with their weights rounded
            to it, as a saved checkpoint would hold them (None: as computed).

    Raises:
        ValueError: bad settings, or no configuration within the tolerance.
    """
    settings = settings or SearchSettings()
    began = time.perf_counter()
    timer = Timer()
    targets = find_targets(model, config.include, config.exclude)
    infos = target_infos(model, targets)
    found = find_blocks(model)
    blocks = len(found[1]) if found else 0
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = None if head_module is None else tuple(head_module.weight.shape)
    device = resolve_device(device, model)
    seq_len = config.seq_len or default_seq_len(model)
    dev_len = settings.dev_seq_len or seq_len
    spec = config.method_spec
    windows = None
    if spec.stat is not None:
        if calib is None:
            raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
        windows = calibration_windows(calib, tokenizer, config.calib_samples, seq_len, config.seed, config.sampling)
    stats = None
    with timer("statistics"):
        if spec.stat is not None:
            stats = dense_stats(model, spec.stat, windows, config, device, progress)
    collector = CandidateCollector(config, {i.name: i for i in infos}, device, timer)
    from rankcut.pipeline import GivenStats

    with torch.no_grad():
        GivenStats(collector, stats).run(dict(targets))
    limits = {i.name: collector.candidates[i.name][0].limit if i.name in collector.candidates else 0 for i in infos}

    def evaluate(m) -> float:
        return perplexity(m, tokenizer, dev, dev_len, settings.dev_windows, settings.batch_size, device, False)

    with timer("evaluation"):
        dense_ppl = evaluate(model)
    configs = [{"family": "dense", "ranks": {i.name: None for i in infos}}]  # the baseline every plan must beat
    configs += structured_configs(infos, limits, settings, blocks)
    allocation = config.allocation if config.allocation not in ("uniform", None) else "spectrum"
    for keep in settings.keeps:
        cfg = dataclasses.replace(config, allocation=allocation, keep=keep, energy=None, rank=None, speedup=None)
        policy = make_policy(cfg, dict(context or {}))
        policy.check_targets([i.name for i in infos])
        cands = {u: c for u, c in (collector.candidates[n] for n in collector.candidates)}
        try:
            plan = policy.plan(cands, {})
        except ValueError as err:
            log.info("allocated plan at keep %g skipped: %s", keep, err)
            continue
        ranks = {i.name: None for i in infos}
        ranks.update({u.names[0]: d.rank for u, d in plan.items()})
        configs.append({"family": f"allocated ({allocation})", "keep": keep, "ranks": ranks})
    unique: dict = {}
    for c in configs:  # the same ranks reached twice (rank 1 = a small fraction on small layers): keep the first
        unique.setdefault(tuple(sorted(c["ranks"].items())), c)
    configs = list(unique.values())
    shapes = {i.name: i.shape for i in infos}
    for c in configs:
        rows = [(n, *shapes[n], r) for n, r in c["ranks"].items()]
        c["predicted"] = objective_of(rows, head, blocks)
    dense_objective = objective_of([(n, *shapes[n], None) for n in shapes], head, blocks)
    home = next(model.parameters()).device
    model.to(device)
    with timer("evaluation"), torch.no_grad():
        for c in tqdm(configs, desc="search", disable=not progress):
            swapped = {}
            try:
                for name, rank in c["ranks"].items():
                    if rank is not None:
                        unit, cand = collector.candidates[name]
                        dense = model.get_submodule(name)
                        replace_module(model, name, cand.build(rank, {name: dense})[name].to(device))
                        swapped[name] = dense
                c["dev_ppl"] = evaluate(model)
            finally:
                for name, dense in swapped.items():
                    replace_module(model, name, dense)
            c["increase"] = c["dev_ppl"] / dense_ppl - 1
            c["feasible"] = c["increase"] <= settings.tau
    model.to(home)
    feasible = sorted((c for c in configs if c["feasible"]), key=lambda c: c["predicted"][settings.objective])
    if not feasible:
        best = min(configs, key=lambda c: c["increase"])
        raise ValueError(f"no configuration keeps the dev perplexity within tau {settings.tau:g}: the least increase "
                         f"found is {best['increase']:.2%} ({best['family']}); raise tau or widen the space")
    front = pareto(configs, settings.objective)
    chosen = {id(c): c for c in [*feasible[: settings.verify], *front]}
    with timer("verification"):
        for c in tqdm(list(chosen.values()), desc="verify", disable=not progress):
            c["verified"] = verify_plan(model, tokenizer, dev, config, c["ranks"], stats, windows, dev_len, settings,
                                        store_dtype, device, calib)
            c["verified"]["increase"] = c["verified"]["dev_ppl"] / dense_ppl - 1
            c["verified"]["feasible"] = c["verified"]["increase"] <= settings.tau
    verified = [c for c in chosen.values() if c["verified"]["feasible"]]
    if not verified:
        raise ValueError("no configuration stayed within tau once verified; raise tau or widen the space")
    best = min(verified, key=lambda c: c["predicted"][settings.objective])
    return {
        "settings": {**dataclasses.asdict(settings), "method": config.method, "options": config.options.to_dict(),
                     "allocation": allocation, "calibration": None if windows is None else
                     {"source": source_name(calib), "windows": list(windows.shape)},
                     "dev": {"source": source_name(dev), "windows": settings.dev_windows, "seq_len": dev_len},
                     "store_dtype": None if store_dtype is None else str(store_dtype).removeprefix("torch.")},
        "model": model_digest(model), "dense": {"dev_ppl": dense_ppl, "predicted": dense_objective},
        "configurations": configs, "front": [configs.index(c) for c in front],
        "best": configs.index(best), "times": {**timer.times, "total": time.perf_counter() - began},
    }


def verify_plan(model, tokenizer, dev, config: CompressConfig, ranks: dict, stats, windows, dev_len: int,
                settings: SearchSettings, store_dtype, device, calib) -> dict:
    """Compress a copy with the ``plan`` policy, as ``rankcut compress --plan`` does, and evaluate it (weights
    rounded to ``store_dtype`` first, as the saved checkpoint holds them)."""
    work = copy.deepcopy(model)
    cfg = dataclasses.replace(config, allocation="plan", keep=None, energy=None, rank=None, speedup=None,
                              policy_options={"ranks": ranks})
    summary = compress_with_stats_(work, cfg, stats, device, False, calib, 0 if windows is None else windows.numel())
    if store_dtype is not None:  # the parameters as the checkpoint stores them (buffers such as rotary
        with torch.no_grad():     # frequencies are not stored: they stay as computed)
            for param in work.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(store_dtype).to(param.dtype)
    ppl = perplexity(work, tokenizer, dev, dev_len, settings.dev_windows, settings.batch_size, device, False)
    return {"dev_ppl": ppl, "keep_targets": summary.keep_targets, "keep_model": summary.keep_model}


def write_search(result: dict, output: str | os.PathLike) -> list[Path]:
    """``search.json``, ``search.md`` (the front and the verified points), ``plan.json`` (the best verified
    configuration, for ``rankcut compress --plan``) and ``search_front.png``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "search.json").write_text(json.dumps(result, indent=1, default=str))
    best = result["configurations"][result["best"]]
    plan = {"format": "rankcut-plan", "version": 1, "model": result["model"], "method": result["settings"]["method"],
            "options": result["settings"]["options"], "calibration": result["settings"]["calibration"],
            "ranks": best["ranks"], "dev": {**result["settings"]["dev"], **best["verified"]},
            "objective": {k: best["predicted"][k] for k in OBJECTIVES}, "family": best["family"]}
    (output / "plan.json").write_text(json.dumps(plan, indent=1))
    (output / "search.md").write_text(render_search(result))
    return [output / "search.json", output / "plan.json", output / "search.md", plot_search(result, output / "search_front.png")]


def _describe(c: dict) -> str:
    if c["family"] == "dense":
        return "dense (nothing decomposed)"
    if "keep" in c:
        return f"{c['family']}, keep {c['keep']:g}"
    return f"{c['family']}: rank {c['pruned_rank']:g}, {c['tensors']}, layers {c['layers']}"


def render_search(result: dict) -> str:
    s, dense = result["settings"], result["dense"]
    obj = s["objective"]
    lines = ["# rankcut search", "", f"Objective: {obj}; tolerance τ = {s['tau']:g} (relative dev perplexity increase); "
             f"dev text {s['dev']['source']} (first {s['dev']['windows']} windows of {s['dev']['seq_len']} tokens); "
             f"dense dev perplexity {dense['dev_ppl']:.4f}; {len(result['configurations'])} configurations in "
             f"{result['times']['total']:.0f} s.", "",
             "Latency: the roofline cost model's batch-1 decode time (an H200 in bf16); energy: that time × "
             f"{H200_DECODE_WATTS:.0f} W (the dense Llama-2-7B decode's measured average power), so EDP ranks as latency.",
             "", "| configuration | params | latency (µs/token) | EDP (rel. dense) | dev ppl (screened) | verified dev ppl | increase | within τ |",
             "|---|---|---|---|---|---|---|---|"]
    marked = set(result["front"]) | {i for i, c in enumerate(result["configurations"]) if "verified" in c}
    for i in sorted(marked, key=lambda i: result["configurations"][i]["predicted"][obj]):
        c = result["configurations"][i]
        v = c.get("verified")
        verified = "" if v is None else f"{v['dev_ppl']:.4f}"
        star = " **(best)**" if i == result["best"] else (" (front)" if i in result["front"] else "")
        lines.append(
            f"| {_describe(c)}{star} | {c['predicted']['params'] / dense['predicted']['params']:.3f} | "
            f"{c['predicted']['latency'] * 1e6:.1f} | {c['predicted']['edp'] / dense['predicted']['edp']:.3f} | "
            f"{c['dev_ppl']:.4f} | {verified} | "
            f"{(v or c)['increase']:+.2%} | {'yes' if (v or c)['increase'] <= s['tau'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot_search(result: dict, path: Path) -> Path:
    """Objective (relative to dense) against dev perplexity increase; the front joined, the seed recipe marked."""
    from rankcut.plots import _pyplot

    plt = _pyplot()
    obj = result["settings"]["objective"]
    dense = result["dense"]["predicted"][obj]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"structured": ("o", "tab:gray"), "seed-recipe": ("s", "tab:red"), "dense": ("D", "k")}
    for family in sorted({c["family"] for c in result["configurations"]}):
        pts = [c for c in result["configurations"] if c["family"] == family]
        marker, colour = styles.get(family, ("^", "tab:blue"))
        ax.scatter([100 * c["increase"] for c in pts], [c["predicted"][obj] / dense for c in pts], marker=marker,
                   color=colour, s=18, alpha=0.7, label=family)
    front = [result["configurations"][i] for i in result["front"]]
    ax.plot([100 * c["increase"] for c in front], [c["predicted"][obj] / dense for c in front], "k-", lw=1, label="Pareto front")
    best = result["configurations"][result["best"]]
    ax.scatter([100 * best["verified"]["increase"]], [best["predicted"][obj] / dense], marker="*", s=160, color="gold",
               edgecolor="k", zorder=5, label="best (verified)")
    ax.axvline(100 * result["settings"]["tau"], color="tab:green", ls="--", lw=1, label="τ")
    ax.set_xscale("symlog", linthresh=1)
    lowest = min(100 * c["increase"] for c in result["configurations"])
    ax.set_xlim(left=min(-1.0, 1.2 * lowest))
    ax.set_xlabel("dev perplexity increase over dense (%)")
    ax.set_ylabel(f"{obj} relative to dense (cost model)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
