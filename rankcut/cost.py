"""A roofline cost model of batch-1 decode: bytes, FLOPs and measured fixed costs per kernel.

Every kernel of a decode step reads its weights once, so its time is a fixed cost plus its bytes over a
streaming bandwidth (or its FLOPs over the matrix rate, whichever is larger):

- a dense projection (one call of rankcut's dense GEMV at batch 1, :mod:`rankcut.kernels.gemv`): interpolated
  between measured (bytes, time) points of that GEMV, beyond the largest at ``dense_bw``;
- a low-rank projection or a fused group of them (rankcut's two launches): phase 1 streams ``V``
  (``p1_floor + R·K·2 / p1_bw``), phase 2 streams ``U`` (``p2_floor + Σ Nᵢrᵢ·2 / p2_bw``);
- rankcut's split-KV decode attention (one kernel per layer, :mod:`rankcut.kernels.attention`):
  ``attn_floor + attn_per_group · G + KV bytes read / attn_bw`` per layer, G the query heads per KV head;
- every other kernel of the step (norms, rotary + KV-cache write, SDPA attention, activation, embedding,
  sampling): ``glue`` each, plus (without the split-KV kernel) the KV cache over ``dense_bw``.

:data:`H200_BF16` holds constants fitted to this project's H200 measurements (BENCHMARKS.md, "Cost model":
least-squares lines through the layer benchmark's M = 1 points, the launch floor and the small kernels timed
alone). :func:`speedup_warning` is what ``compress_`` logs when the requested ranks cannot make decoding
faster on such a GPU.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceProfile:
    """Measured constants of one GPU and dtype (seconds, bytes/s, FLOP/s)."""

    name: str
    dense_points: tuple[tuple[float, float], ...]  # (bytes, seconds) of dense GEMVs, ascending, from (0, floor)
    dense_bw: float
    p1_floor: float
    p1_bw: float
    p2_floor: float
    p2_bw: float
    glue: float
    flops: float = 7.9e14
    bytes_per_elem: int = 2
    attn_floor: float = 3.95e-6
    attn_per_group: float = 1.84e-6
    attn_bw: float = 2.97e12

    def to_dict(self) -> dict:
        return asdict(self)


#: Fitted on the H200 runs recorded in BENCHMARKS.md (bf16, batch 1, CUDA-graph replay); the attention terms
#: are a least-squares fit to the 8 points of ``benchmarks/attention_bench.py`` (Llama-2 and Llama-3 shapes,
#: 384 and 4096 slots; errors within ±17 %). The dense points are rankcut's dense GEMV in the layer benchmark
#: (1024, 4096, 11008 and 14336 × 4096, ``benchmarks/results/decode15/r2/layer_bench_m1.json``); the floor at
#: 0 bytes is the line through the two smallest points extended (an estimate: no tiny matrix was timed).
H200_BF16 = DeviceProfile(
    "NVIDIA H200, bf16",
    dense_points=((0.0, 1.64e-6), (8.39e6, 3.49e-6), (33.55e6, 9.03e-6), (90.18e6, 21.73e-6), (117.4e6, 27.66e-6)),
    dense_bw=4.59e12, p1_floor=1.34e-6, p1_bw=3.34e12, p2_floor=1.35e-6, p2_bw=2.88e12, glue=1.1e-6,
)


def dense_bytes_time(nbytes: float, profile: DeviceProfile = H200_BF16) -> float:
    """Seconds of a cuBLAS GEMV streaming ``nbytes`` (piecewise linear through the measured points)."""
    pts = profile.dense_points
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if nbytes <= b1:
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
    b_last, t_last = pts[-1]
    return t_last + (nbytes - b_last) / profile.dense_bw


def dense_time(m: int, n: int, rows: int = 1, profile: DeviceProfile = H200_BF16) -> float:
    """Predicted seconds of a dense (m × n) projection of ``rows`` tokens."""
    return max(dense_bytes_time(m * n * profile.bytes_per_elem, profile), 2 * rows * m * n / profile.flops)


def factor_bytes(fmt: str | None, group: int = 128, profile: DeviceProfile = H200_BF16) -> float:
    """Bytes per factor element read by the kernels: the profile's dtype (None), 1 for ``int8`` / ``fp8`` (their
    per-channel float32 scales are counted apart, :func:`group_time`), ``0.5 + 4 / group`` for ``int4``."""
    if fmt is None:
        return float(profile.bytes_per_elem)
    if fmt in ("int8", "fp8"):
        return 1.0
    if fmt == "int4":
        return 0.5 + 4.0 / group
    raise ValueError(f"unknown factor format {fmt!r}")


def group_time(shapes: list[tuple[int, int, int | None]], rows: int = 1, profile: DeviceProfile = H200_BF16,
               elem_bytes: float | None = None, channel_scales: bool = False) -> float:
    """Predicted seconds of one launch unit over targets ``(m, n, rank or None)`` that share an input: one dense
    GEMV over the concatenated weights, or rankcut's two low-rank launches over the stacked factors, whose
    elements take ``elem_bytes`` each (default: the profile's dtype; :func:`factor_bytes`) plus, with
    ``channel_scales``, one float32 per output channel of each factor (int8, fp8)."""
    e = profile.bytes_per_elem if elem_bytes is None else elem_bytes
    if all(r is None for _, _, r in shapes):
        return dense_time(sum(m for m, _, _ in shapes), shapes[0][1], rows, profile)
    v = sum(r * n for _, n, r in shapes) * e + (4 * sum(r for _, _, r in shapes) if channel_scales else 0)
    u = sum(m * r for m, _, r in shapes) * e + (4 * sum(m for m, _, _ in shapes) if channel_scales else 0)
    flops = 2 * rows * sum((r * n + m * r) for m, n, r in shapes)
    return max(profile.p1_floor + v / profile.p1_bw + profile.p2_floor + u / profile.p2_bw, flops / profile.flops)


def lowrank_time(m: int, n: int, rank: int, rows: int = 1, profile: DeviceProfile = H200_BF16,
                 fmt: str | None = None, group: int = 128) -> float:
    """Predicted seconds of a rank-``rank`` (m × n) projection through rankcut's kernels, with factors stored
    as ``fmt`` (None: the profile's dtype)."""
    return group_time([(m, n, rank)], rows, profile, factor_bytes(fmt, group, profile), fmt in ("int8", "fp8"))


#: Below this predicted speedup of the targets, ``compress_`` warns that decoding will not get faster.
MIN_SPEEDUP = 1.05

_GROUPS = (re.compile(r"^(.*)\.(q_proj|k_proj|v_proj)$"), re.compile(r"^(.*)\.(gate_proj|up_proj)$"))


def launch_units(rows: list[tuple[str, int, int, int | None]]) -> list[list[tuple[int, int, int | None]]]:
    """Group targets ``(name, m, n, rank)`` the way the decode step launches them (q/k/v and gate/up of one
    block fused when all dense or all low-rank; mixed groups run separately)."""
    units: dict[str, list] = {}
    for name, m, n, r in rows:
        key = name
        for pattern in _GROUPS:
            hit = pattern.match(name)
            if hit:
                key = f"{hit.group(1)}:{pattern.pattern}"
        units.setdefault(key, []).append((m, n, r))
    out = []
    for unit in units.values():
        if len({r is None for _, _, r in unit}) > 1:
            out.extend([[s] for s in unit])
        else:
            out.append(unit)
    return out


def targets_time(rows: list[tuple[str, int, int, int | None]], batch: int = 1,
                 profile: DeviceProfile = H200_BF16, fmt: str | None = None, group: int = 128) -> float:
    """Predicted seconds for all targets of one decode step (low-rank factors stored as ``fmt``)."""
    e = factor_bytes(fmt, group, profile)
    return sum(group_time(unit, batch, profile, e, fmt in ("int8", "fp8")) for unit in launch_units(rows))


def decode_time(rows: list[tuple[str, int, int, int | None]], head: tuple[int, int] | None, glue_kernels: int,
                kv_bytes: int = 0, batch: int = 1, profile: DeviceProfile = H200_BF16, fmt: str | None = None,
                group: int = 128, attention: tuple[int, int] | None = None) -> dict:
    """Predicted seconds of one decode step: the targets (low-rank factors stored as ``fmt``), the LM head (a
    dense (vocab × hidden) GEMV), ``glue_kernels`` small kernels (one ``glue`` each) and the KV cache
    (``kv_bytes`` read per step): with ``attention = (layers, G)``, through the split-KV kernel's term (one
    kernel per layer, not among ``glue_kernels``), else at ``dense_bw``."""
    t_targets = targets_time(rows, batch, profile, fmt, group)
    t_head = dense_time(*head, batch, profile) if head else 0.0
    if attention is not None:
        layers, g = attention
        t_attn = layers * (profile.attn_floor + profile.attn_per_group * g) + kv_bytes / profile.attn_bw
    else:
        t_attn = kv_bytes / profile.dense_bw
    t_glue = glue_kernels * profile.glue
    return {"targets_s": t_targets, "head_s": t_head, "glue_s": t_glue, "attention_s": t_attn,
            "total_s": t_targets + t_head + t_glue + t_attn}


def speedup_warning(rows: list[tuple[str, int, int, int | None]], profile: DeviceProfile = H200_BF16) -> str | None:
    """A warning when the given ranks cannot speed up batch-1 decoding of the targets, else None.

    ``rows`` are ``(name, m, n, rank)`` with rank None for a target left dense.
    """
    low = [row for row in rows if row[3] is not None]
    if not low:
        return None
    dense_rows = [(name, m, n, None) for name, m, n, _ in rows]
    t_dense, t_low = targets_time(dense_rows, 1, profile), targets_time(rows, 1, profile)
    if t_dense / t_low >= MIN_SPEEDUP:
        return None
    faster = sum(lowrank_time(m, n, r, 1, profile) < dense_time(m, n, 1, profile) for _, m, n, r in low)
    return (f"this compression cannot speed up batch-1 decoding by more than {MIN_SPEEDUP - 1:.0%}: the cost model "
            f"({profile.name}) predicts the targets at {t_low * 1e6:.1f} µs per token low-rank vs {t_dense * 1e6:.1f} µs "
            f"dense ({t_dense / t_low:.2f}x); {faster} of {len(low)} factorised targets would be faster alone. Ranks "
            f"near break-even save too few bytes to pay for a second launch; the checkpoint is still smaller.")



warning_log = logging.getLogger("rankcut.cost")
_warned = [False]


def speedup_warning_once(rows: list[tuple[str, int, int, int | None]], device=None,
                         profile: DeviceProfile = H200_BF16) -> str | None:
    """Log :func:`speedup_warning` the first time it applies in this process (a sweep compresses many times),
    saying that it is a prediction for ``profile``'s GPU, not a measurement of this machine. Returns the
    message (or None)."""
    message = speedup_warning(rows, profile)
    if message is None:
        return None
    where = getattr(device, "type", device) or "cpu"
    if where != "cuda":
        message += (f" (A prediction of the cost model for an {profile.name} GPU, not a measurement of this "
                    f"{where.upper() if where == 'cpu' else where} machine.)")
    if not _warned[0]:
        _warned[0] = True
        warning_log.warning(message)
    return message



def fixed_decode_seconds(head: tuple[int, int] | None, blocks: int, profile: DeviceProfile = H200_BF16) -> float:
    """Predicted seconds per decode token of what compression does not change: the LM head (``head`` = its
    (vocab, hidden) shape) and the small kernels of the step (5 per block + 18, as ``rankcut bench`` counts them
    without a profiler)."""
    t_head = dense_time(*head, 1, profile) if head is not None else 0.0
    return t_head + (5 * blocks + 18) * profile.glue
