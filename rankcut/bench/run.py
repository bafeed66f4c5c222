"""``rankcut bench``: decode speed of a model (and optionally a dense baseline) through one identical loop.

Reports tokens/s, ms/token, achieved GB/s of weight traffic, peak memory, energy per token (NVML), the
theoretical bound (dense bytes / compressed bytes) and the fraction of it achieved, and the cost model's
prediction (:mod:`rankcut.cost`).
"""

from __future__ import annotations

import gc
import logging
import os

import torch

from rankcut import cost
from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import time_decode
from rankcut.bench.models import RANDOM_PREFIX, PRESETS, preset_config, random_lowrank_, random_model, weight_bytes
from rankcut.modules import LowRankLinear, QuantLowRankLinear, SharedBasisLinear, dense_shape, rankcut_modules
from rankcut.targets import find_targets

log = logging.getLogger(__name__)

DATASHEET_BW = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, vendor datasheets (SXM)


def check_spec(spec: str) -> None:
    """Raise ValueError when ``spec`` is neither ``random:<shape>`` nor an existing path / Hub-style id."""
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name not in PRESETS and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            raise ValueError(f"{spec}: unknown shape; use one of {', '.join(RANDOM_PREFIX + p for p in PRESETS)} "
                             f"or random:DIR with a config.json")
        return
    path = os.path.expanduser(spec)
    if (os.path.exists(path) or spec.startswith((".", "/", "~")) or spec.count("/") > 1) and not os.path.isdir(path):
        raise ValueError(f"model path {spec} does not exist")


def check_args(batch: int, prompt_len: int, new_tokens: int, repeats: int, keep: float | None) -> None:
    for flag, value in (("--batch", batch), ("--prompt-len", prompt_len), ("--new-tokens", new_tokens),
                        ("--repeats", repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"--random-lowrank must be in (0, 1], got {keep}")


def load_for_bench(spec: str, dtype: torch.dtype, device: str, layers: int | None = None):
    """A model for ``spec``: ``random:<shape>`` (random weights, built on ``device``), a rankcut checkpoint,
    or a Hugging Face directory / Hub id."""
    check_spec(spec)
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name in PRESETS:
            config = preset_config(name, layers)
        else:
            import transformers

            config = transformers.AutoConfig.from_pretrained(os.path.expanduser(name))
        return random_model(config, dtype, device)
    from rankcut.hf import load_any

    model, _ = load_any(spec, dtype, device)
    return model.to(device).eval()


def target_rows(model) -> list[tuple[str, int, int, int | None]]:
    """``(name, m, n, rank or None)`` of every low-rank layer (shared-basis ones too: a shared factor counts at
    every layer that reads it) and every remaining dense target."""
    rows = [(n, m.out_features, m.in_features, m.rank) for n, m in rankcut_modules(model).items()
            if isinstance(m, (LowRankLinear, SharedBasisLinear, QuantLowRankLinear))]
    try:
        for name, module in find_targets(model).items():
            rows.append((name, *dense_shape(module), None))
    except ValueError:
        pass
    return rows


def count_kernels(fn) -> tuple[int | None, dict[str, int]]:
    """CUDA kernels launched by ``fn()`` and a histogram of their names (torch profiler); (None, {}) when the
    profiler is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names: dict[str, int] = {}
        for e in prof.events():
            if e.device_type.name == "CUDA" and "Memcpy" not in e.name and "Memset" not in e.name:
                key = e.name[:60]
                names[key] = names.get(key, 0) + 1
        return sum(names.values()), dict(sorted(names.items(), key=lambda kv: -kv[1]))
    except Exception as err:  # noqa: BLE001
        log.info("kernel count unavailable: %s", err)
        return None, {}


def matmul_params(model) -> int:
    """Weights one token multiplies by: every parameter (a quantised factor by its elements) except the embedding
    tables a step only indexes (a table tied to the LM head counts)."""
    from rankcut.utils import count_params

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ptr = head.weight.data_ptr() if head is not None else None
    tables = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() != head_ptr)
    return count_params(model) - tables


@torch.no_grad()
def bench_model(model, batch: int = 1, prompt_len: int = 128, new_tokens: int = 256, repeats: int = 3,
                fuse: bool = True, use_graph: bool | None = None, seed: int = 0, progress: bool = False,
                profile: cost.DeviceProfile = cost.H200_BF16, attention: str = "auto", fold: bool = False,
                dense_gemv: bool = True) -> dict:
    """Decode speed of ``model`` (see :func:`rankcut.bench.loop.time_decode`) plus bytes and prediction."""
    decoder = make_decoder(model, batch, prompt_len + new_tokens, fuse=fuse, attention=attention, fold=fold,
                           dense_gemv=dense_gemv)
    device = decoder.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    result = time_decode(decoder, prompt, new_tokens, repeats, use_graph, progress)
    wb, kvb, kv_read = weight_bytes(model), decoder.kv_bytes(), decoder.kv_read_bytes(prompt_len, new_tokens)
    steps = result["tokens_per_s"] / batch
    rows = target_rows(model)
    kernels, names = None, {}
    if device.type == "cuda":
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        kernels, names = count_kernels(lambda: decoder.forward(ids, pos).argmax(-1))
    units = cost.launch_units(rows)
    launches = sum(1 if all(r is None for *_, r in u) else 2 for u in units)
    gemv = ("nvjet", "splitKreduce", "gemv", "_dense_glu", "_p1_", "_p2_", "_p1q_", "_p2q_")  # projection kernels
    # (cuBLAS, rankcut), LM head; "gemv" also matches rankcut's dense GEMV (_dense_gemv)
    glue = sum(c for name, c in names.items() if not any(g in name for g in gemv)) if names else None
    if glue is None:  # no profiler: the decode step's own count (Llama: 5 per block; 18 per step)
        glue = 5 * len(getattr(decoder, "layers", getattr(decoder, "blocks", []))) + 18
    head = model.get_output_embeddings().weight.shape
    quantised = [m for m in rankcut_modules(model).values() if isinstance(m, QuantLowRankLinear)]
    fmt, group = (quantised[0].format, quantised[0].group or 128) if quantised else (None, 128)
    attn = None
    if decoder.decode_attn is not None:  # one split-KV kernel per layer, predicted by its own term
        layers = len(decoder.k_cache)
        attn = (layers, decoder.decode_attn.group)
        glue = max(0, glue - layers)
    pred = cost.decode_time(rows, (int(head[0]), int(head[1])), glue, kv_read, batch, profile, fmt, group, attn)
    matmul = matmul_params(model)
    result.update({
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": matmul, "flop_bound_tokens_per_s": profile.flops / (2 * matmul),
        "weight_bytes": wb, "kv_cache_bytes": kvb, "kv_read_bytes_per_step": kv_read,
        "attention": "split-kv" if decoder.decode_attn is not None else "sdpa",
        "weight_gbps": wb * steps / 1e9, "traffic_gbps": (wb + kv_read) * steps / 1e9,
        "kernels_per_step": kernels, "kernel_names": names, "target_launches_per_step": launches,
        "glue_kernels_per_step": glue,
        "predicted_ms_per_token": pred["total_s"] * 1e3, "predicted": pred, "predicted_for": profile.name,
        "low_rank_targets": sum(r is not None for *_, r in rows), "targets": len(rows),
        "fused_projections": fuse, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    })
    decoder.groups = []
    return result


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench(spec: str, compare: str | None = None, random_lowrank: float | None = None, batch: int | list[int] = 1,
          prompt_len: int = 128, new_tokens: int = 256, repeats: int = 3, dtype: torch.dtype = torch.bfloat16,
          device: str = "cuda", fuse: bool = True, use_graph: bool | None = None, layers: int | None = None,
          bandwidth: float | None = None, progress: bool = False, factor_dtype: str | None = None,
          factor_group: int = 128, attention: str = "auto", fold: bool = False, dense_gemv: bool = True) -> dict:
    """Benchmark ``spec`` (and the dense ``compare`` model first, if given) with the identical decode loop.

    Args:
        spec: ``random:<shape>``, a rankcut checkpoint, or a Hugging Face directory / Hub id.
        compare: the dense baseline, same forms.
        random_lowrank: replace ``spec``'s targets by random factors at this uniform keep (speed only).
        factor_dtype: with ``random_lowrank``, store those factors quantised (``int8``, ``fp8``, ``int4`` with
            groups of ``factor_group``), :func:`rankcut.quantize.quantize_factors_` without compensation.
        batch: sequences decoded at once; a list runs every batch size on the same loaded models.
        attention: ``auto`` (the split-KV decode kernel on CUDA) or ``sdpa`` (:func:`rankcut.bench.make_decoder`).
        fold: add + RMSNorm and SiLU·up inside the next low-rank projection's phase 1 (batch 1; the Llama family).
        dense_gemv: one-token dense projections through rankcut's GEMV (False: cuBLAS), in both models.
        bandwidth: memory bandwidth (bytes/s) for the "fraction of the bandwidth limit" figures; default:
            measured here (device-to-device copy) on CUDA.

    Returns:
        ``{"model": {...}, "baseline": {...} | None, "comparison": {...} | None, "settings": {...}}``; for a list
        of batches, ``{"settings": {...}, "batches": [that dict without settings, one per batch]}``.
    """
    batches = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    if not batches:
        raise ValueError("--batch needs at least one batch size")
    for b in batches:
        check_args(b, prompt_len, new_tokens, repeats, random_lowrank)
    if factor_dtype is not None and random_lowrank is None:
        raise ValueError("--factor-dtype quantises the random factors of --random-lowrank (a quantised checkpoint "
                         "is benchmarked as it is)")
    check_spec(spec)
    if compare is not None:
        check_spec(compare)
    from rankcut.kernels.ops import check_attention_mode

    check_attention_mode(attention)  # before any model is loaded
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("rankcut bench needs a CUDA GPU (or --device cpu for a functional run)")
    settings = {"spec": spec, "compare": compare, "random_lowrank": random_lowrank,
                "batch": batch if not isinstance(batch, (list, tuple)) else batches, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "dtype": str(dtype).replace("torch.", ""),
                "device": device, "fuse": fuse, "layers": layers, "factor_dtype": factor_dtype,
                "factor_group": factor_group, "attention": attention, "fold": fold,
                "dense_gemv": dense_gemv}
    if device.startswith("cuda") and bandwidth is None:
        from rankcut.bench.timing import copy_bandwidth

        bandwidth = copy_bandwidth(device)
    settings["bandwidth_bytes_per_s"] = bandwidth
    per_batch = [{} for _ in batches]
    runs = [("baseline", compare, None)] if compare else []
    runs.append(("model", spec, random_lowrank))
    for role, s, keep in runs:
        model = load_for_bench(s, dtype, device, layers)
        if keep is not None:
            random_lowrank_(model, keep)
            if factor_dtype is not None:
                from rankcut.quantize import quantize_factors_

                quantize_factors_(model, factor_dtype, factor_group, compensate=False, progress=False)
        for out, b in zip(per_batch, batches):
            res = bench_model(model, b, prompt_len, new_tokens, repeats, fuse, use_graph, progress=progress,
                              attention=attention, fold=fold, dense_gemv=dense_gemv)
            res["spec"] = s + (f" (random low-rank, keep {keep}" + (f", {factor_dtype}" if factor_dtype else "") + ")"
                               if keep is not None else "")
            res["batch"] = b
            if bandwidth:
                res["bandwidth_limit_tokens_per_s"] = b * bandwidth / (res["weight_bytes"] + res["kv_read_bytes_per_step"])
                res["fraction_of_bandwidth_limit"] = res["tokens_per_s"] / res["bandwidth_limit_tokens_per_s"]
            out[role] = res
            _release()
        del model
        _release()
    for out in per_batch:
        out.setdefault("baseline", None)
        out["comparison"] = _comparison(out["baseline"], out["model"]) if compare else None
    if isinstance(batch, (list, tuple)):
        return {"settings": settings, "batches": per_batch}
    return {"settings": settings, **per_batch[0]}


def _comparison(base: dict, mod: dict) -> dict:
    speedup = mod["tokens_per_s"] / base["tokens_per_s"]
    bound = base["weight_bytes"] / mod["weight_bytes"]
    bound_kv = ((base["weight_bytes"] + base["kv_read_bytes_per_step"])
                / (mod["weight_bytes"] + mod["kv_read_bytes_per_step"]))
    flop_bound = base["matmul_params"] / mod["matmul_params"]
    return {"speedup": speedup, "bound": bound, "fraction_of_bound": speedup / bound,
            "bound_with_kv_cache": bound_kv, "fraction_of_bound_with_kv_cache": speedup / bound_kv,
            "flop_bound": flop_bound, "predicted_speedup": base["predicted_ms_per_token"] / mod["predicted_ms_per_token"]}


def format_batch_table(result: dict) -> str:
    """The table ``rankcut bench --batch 1,8,...`` prints: tokens/s per batch, with the byte bound (bandwidth ×
    batch / bytes per step) and the FLOP bound (the profile's matrix rate / 2 FLOPs per weight per token, attention
    not counted) of each model beside it."""
    s = result["settings"]
    lines = [f"{'batch':>5} {'model':<44} {'tok/s':>9} {'byte bound':>10} {'FLOP bound':>10} {'speedup':>8} "
             f"{'bytes x':>7} {'FLOPs x':>7}"]
    for entry in result["batches"]:
        for role in ("baseline", "model"):
            r = entry.get(role)
            if not r:
                continue
            byte = f"{r['bandwidth_limit_tokens_per_s']:>10.0f}" if r.get("bandwidth_limit_tokens_per_s") else f"{'-':>10}"
            c = entry["comparison"] if role == "model" else None
            extra = (f" {c['speedup']:>7.3f}x {c['bound']:>6.3f}x {c['flop_bound']:>6.3f}x" if c else "")
            lines.append(f"{r['batch']:>5} {r['spec'][:44]:<44} {r['tokens_per_s']:>9.1f} {byte} "
                         f"{r['flop_bound_tokens_per_s']:>10.0f}{extra}")
    lines.append(f"prompt {s['prompt_len']}, new tokens {s['new_tokens']}, {s['dtype']}, median of {s['repeats']} "
                 f"repeats; byte bound = batch x measured copy bandwidth / (weights + KV-cache bytes read per step); FLOP "
                 f"bound = {cost.H200_BF16.flops / 1e12:.0f} TFLOP/s (the cost model's rate) / (2 x matmul weights) "
                 "per token")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The human-readable summary ``rankcut bench`` prints. The cost model predicts a GPU (its profile's): off a
    CUDA device the "pred ms" column shows "-" and a note says so, rather than mixing a GPU prediction with a
    CPU measurement."""
    s = result["settings"]
    on_gpu = str(s.get("device", "cuda")).startswith("cuda")
    lines = [f"{'model':<48} {'tok/s':>8} {'ms/tok':>7} {'pred ms':>7} {'GB/tok':>7} {'GB/s':>7} {'peak GiB':>8} "
             f"{'J/tok':>6} {'of BW limit':>11}"]
    profile = None
    for role in ("baseline", "model"):
        r = result.get(role)
        if not r:
            continue
        profile = r.get("predicted_for", cost.H200_BF16.name)
        energy = f"{r['energy_j_per_token']:.3f}" if r.get("energy_j_per_token") is not None else "-"
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
        frac = f"{r['fraction_of_bandwidth_limit']:.1%}" if r.get("fraction_of_bandwidth_limit") else "-"
        pred = f"{r['predicted_ms_per_token']:>7.3f}" if on_gpu else f"{'-':>7}"
        lines.append(f"{r['spec'][:48]:<48} {r['tokens_per_s']:>8.1f} {r['ms_per_token']:>7.3f} "
                     f"{pred} {r['weight_bytes'] / 1e9:>7.3f} {r['weight_gbps']:>7.0f} "
                     f"{peak:>8} {energy:>6} {frac:>11}")
    c = result.get("comparison")
    if c:
        line = (f"speedup {c['speedup']:.3f}x; bound (dense bytes / compressed bytes) {c['bound']:.3f}x; "
                f"fraction of bound {c['fraction_of_bound']:.1%}")
        lines.append(line + (f"; predicted speedup {c['predicted_speedup']:.3f}x" if on_gpu else ""))
    lines.append(f"batch {s['batch']}, prompt {s['prompt_len']}, new tokens {s['new_tokens']}, {s['dtype']}, "
                 f"median of {s['repeats']} repeats")
    if not on_gpu:
        lines.append(f"pred ms: not shown on {s.get('device')}: the cost model predicts an "
                     f"{profile or cost.H200_BF16.name} GPU, not this machine")
    return "\n".join(lines)
