"""When and how a low-rank product runs through the Triton kernel; the eager path everywhere else.

The rules (:func:`eligible`, then :func:`~rankcut.kernels.plan.kernel_pays` for speed): a CUDA input, float16 or bfloat16 everywhere, at most
:data:`~rankcut.kernels.plan.MAX_M` rows, no gradient needed (autograd and training stay on the eager
path), not inside ``torch.compile`` tracing, Triton importable, and kernels not switched off
(``RANKCUT_KERNELS=0`` or :func:`set_enabled`). CPU inputs never reach any of this: ``LowRankLinear``'s
CPU result is the eager one, bit for bit. Larger M (prefill) runs as two cuBLAS products.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import torch

from rankcut.kernels.plan import DENSE_MIN_ROWS, MAX_M, DensePlan, LowRankPlan, kernel_pays, plan_dense, plan_lowrank

log = logging.getLogger(__name__)

_STATE = {"enabled": os.environ.get("RANKCUT_KERNELS", "1") != "0", "triton": None,
          "dense": os.environ.get("RANKCUT_DENSE_GEMV", "1") != "0", "glu": os.environ.get("RANKCUT_GLU", "1") != "0"}
_OVERRIDES: dict = {}
_PLANS: dict[tuple, LowRankPlan] = {}
_SMS: dict[int, tuple[int, bool]] = {}
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def set_enabled(flag: bool) -> None:
    """Switch the Triton kernels on or off for this process (the eager path is always available)."""
    _STATE["enabled"] = bool(flag)


def enabled() -> bool:
    return _STATE["enabled"]


def triton_available() -> bool:
    """Whether Triton can be imported (checked once, without importing it)."""
    if _STATE["triton"] is None:
        _STATE["triton"] = importlib.util.find_spec("triton") is not None
    return _STATE["triton"]


@contextlib.contextmanager
def plan_overrides(**kw):
    """Force plan fields (``mode``, ``max_elems``, ``block_r``, ``block_n``, ``prefetch``) inside the block."""
    old = dict(_OVERRIDES)
    _OVERRIDES.clear()
    _OVERRIDES.update(kw)
    _PLANS.clear()
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)
        _PLANS.clear()


def eligible(x: torch.Tensor, tensors: list[torch.Tensor | None], rows: int) -> bool:
    """Whether the kernel may compute a product of input ``x`` (``rows`` rows) with these weights."""
    if not x.is_cuda or not _STATE["enabled"] or not 1 <= rows <= MAX_M:
        return False
    if x.dtype not in KERNEL_DTYPES or any(t is not None and (t.dtype != x.dtype or not t.is_cuda) for t in tensors):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return False
    if torch.compiler.is_compiling():
        return False
    return triton_available()


def _device_info(device: torch.device) -> tuple[int, bool]:
    """(multiprocessors, whether programmatic dependent launch is used) of a CUDA device (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        props = torch.cuda.get_device_properties(index)
        pdl = (props.major, props.minor) >= (9, 0) and os.environ.get("RANKCUT_PDL", "1") != "0"
        _SMS[index] = (props.multi_processor_count, pdl)
    return _SMS[index]


def pdl_enabled(device: torch.device) -> bool:
    """Whether rankcut's kernels launch with programmatic dependent launch on ``device`` (compute capability
    ≥ 9.0, unless ``RANKCUT_PDL=0``)."""
    return device.type == "cuda" and _device_info(device)[1]


def get_plan(m: int, k: int, ranks: list[int], ns: list[int], device: torch.device) -> LowRankPlan:
    """The (cached) plan for this problem on ``device``."""
    sms, hopper = _device_info(device)
    key = (m, k, tuple(ranks), tuple(ns), sms)
    plan = _PLANS.get(key)
    if plan is None:  # programmatic dependent launch needs compute capability 9.0
        plan = _PLANS[key] = plan_lowrank(m, k, ranks, ns, sms, **{"pdl": hopper, **_OVERRIDES})
    return plan


def run_kernel(x: torch.Tensor, V: torch.Tensor, U_flat: torch.Tensor, bias: torch.Tensor | None, ranks: list[int],
               ns: list[int], owner, attr: str = "_rankcut_scratch") -> torch.Tensor:
    """``(x Vᵀ) Uᵀ + b`` for stacked segments through the Triton kernel; scratch lives on ``owner``."""
    from rankcut.kernels.lowrank import launch

    x2d, y, scratch = _call_buffers(x, int(V.shape[0]), ranks, ns, owner, attr)
    launch(x2d, V, U_flat, bias, y, scratch, get_plan(x2d.shape[0], x2d.shape[1], ranks, ns, x.device))
    return y.reshape(*x.shape[:-1], sum(ns))


def _call_buffers(x: torch.Tensor, R: int, ranks: list[int], ns: list[int], owner, attr: str):
    """``(x2d, y, scratch)`` of one kernel call: the input as a unit-stride, 16-byte-aligned (M, K) matrix, an
    empty (M, ΣN) output, and the call site's scratch (kept on ``owner``, rebuilt when the segments change)."""
    from rankcut.kernels.lowrank import Scratch

    k = x.shape[-1]
    rows = x.numel() // k
    x2d = x.reshape(rows, k)
    if x2d.stride(1) != 1 or x2d.data_ptr() % 16:
        x2d = x2d.contiguous()
    scratch = owner.__dict__.get(attr)
    if scratch is None or scratch.device != x.device or scratch.ranks != list(ranks) or scratch.ns != list(ns):
        scratch = Scratch(x.device, R, ranks, ns)
        owner.__dict__[attr] = scratch
    return x2d, torch.empty(rows, sum(ns), dtype=x.dtype, device=x.device), scratch


def kernel_factors(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(V, U, bias)`` weights of ``LowRankLinear`` ``layer`` as the kernel takes them, or None when its factors
    are not plain contiguous ``nn.Linear`` (e.g. wrapped by PEFT)."""
    V, U = layer.V, layer.U
    if type(V) is not torch.nn.Linear or type(U) is not torch.nn.Linear:
        return None
    if not (V.weight.is_contiguous() and U.weight.is_contiguous()):
        return None
    return V.weight, U.weight, U.bias


def lowrank_forward(layer, x: torch.Tensor, force: bool = False) -> torch.Tensor | None:
    """The kernel's result for ``LowRankLinear`` ``layer`` on ``x``, or None when the eager path runs: not
    eligible, or (unless ``force``) cuBLAS is the faster path for this shape (:func:`~rankcut.kernels.plan.
    kernel_pays`)."""
    factors = kernel_factors(layer)
    if factors is None:
        return None
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // k if k else 0
    if not eligible(x, list(factors), rows) or not (force or kernel_pays(rows, [layer.rank])):
        return None
    return run_kernel(x, *factors, [layer.rank], [layer.out_features], layer)


# ------------------------------------------------------------------------------------ dense projections


def set_dense_enabled(flag: bool) -> None:
    """Switch the dense GEMV (:mod:`rankcut.kernels.gemv`) on or off; off, one-token dense projections run through
    cuBLAS (also ``RANKCUT_DENSE_GEMV=0``). The low-rank kernels are not affected."""
    _STATE["dense"] = bool(flag)


def dense_enabled() -> bool:
    return _STATE["dense"] and _STATE["enabled"]


@contextlib.contextmanager
def _switched(key: str, flag: bool):
    """``_STATE[key]`` set to ``flag`` inside the block, restored after."""
    old = _STATE[key]
    _STATE[key] = bool(flag)
    try:
        yield
    finally:
        _STATE[key] = old


def dense_kernel(flag: bool):
    """The dense GEMV on (True) or off (False) inside the block (a context manager)."""
    return _switched("dense", flag)


def dense_plan(n: int, k: int, device: torch.device) -> DensePlan:
    key = ("dense", n, k)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = plan_dense(n, k, pdl=_device_info(device)[1])
    return plan


def _dense_row(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as the (1, K) unit-stride, 16-byte-aligned row the dense GEMV kernels read, or None where they do not
    apply (see :func:`dense_forward`)."""
    if not _STATE["dense"] or weight.dim() != 2 or x.dim() == 0:
        return None
    n, k = weight.shape
    if x.shape[-1] != k or x.numel() != k or n < DENSE_MIN_ROWS or not weight.is_contiguous():
        return None
    if not eligible(x, [weight, bias], 1) or (bias is not None and not bias.is_contiguous()):
        return None
    x2d = x.reshape(1, k)
    if x2d.stride(1) != 1 or x2d.data_ptr() % 16:
        x2d = x2d.contiguous()
    return x2d


def dense_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``x Wᵀ + b`` through the dense GEMV for one token (``x.numel() == K``) on CUDA, or None where cuBLAS runs:
    more rows, fewer than :data:`~rankcut.kernels.plan.DENSE_MIN_ROWS` outputs, a weight that is not contiguous
    (N, K), a gradient needed, or the GEMV switched off (:func:`set_dense_enabled`)."""
    x2d = _dense_row(weight, bias, x)
    if x2d is None:
        return None
    from rankcut.kernels.gemv import dense_gemv

    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    dense_gemv(x2d, weight, bias, y, dense_plan(n, k, x.device))
    return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------ SiLU-gated groups


def glu_kernel(flag: bool):
    """The SiLU·up epilogue (:func:`glu_forward`) on (True) or off (False) inside the block (a context manager);
    off (also ``RANKCUT_GLU=0``), the dense gate/up GEMV writes [gate | up] and the separate SiLU·up kernel runs."""
    return _switched("glu", flag)


def glu_forward(group, x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) · up`` of a fused dense [gate; up] group (:class:`~rankcut.modules.grouped.DenseGroup`, by its
    ``W_cat``) on one CUDA token, SiLU·up computed in the GEMV's epilogue (:mod:`rankcut.kernels.glu`), or None
    where the group's own forward and the SiLU·up kernel run: more rows, a group that is not two layers of equal
    width, a low-rank or quantised group (its phase 2 measured slower with the epilogue), not eligible, the epilogue
    switched off (:func:`glu_kernel`, ``RANKCUT_GLU=0``), or where :func:`dense_forward` would not take the
    concatenated weight (the dense GEMV off, fewer than 1024 rows, not contiguous)."""
    ns = list(getattr(group, "ns", ()))
    W = getattr(group, "W_cat", None)
    if not _STATE["glu"] or W is None or len(ns) != 2 or ns[0] != ns[1]:
        return None
    bias = getattr(group, "bias_cat", None)
    x2d = _dense_row(W, bias, x)
    if x2d is None:
        return None
    from rankcut.kernels.glu import glu_gemv

    y = torch.empty(1, ns[0], dtype=x.dtype, device=x.device)
    glu_gemv(x2d, W, bias, y, dense_plan(int(W.shape[0]), x2d.shape[1], x.device))
    return y.reshape(*x.shape[:-1], ns[0])


# ------------------------------------------------------------------------------------ quantised factors

#: Weight elements per program loop iteration for quantised factors: the bf16 default. Measured on the H200
#: (benchmarks/results/quant/quant_layer_sweep.json): 4096 with 4 warps had the least summed M = 1 time of the
#: int8 and fp8 projections over four Llama shapes, ahead of 8192 and 16384 with 4 or 8 warps.
QUANT_ELEMS = 4096
QUANT_WARPS: int | None = None  # None: the plan's own (4)
INT4_BLOCK_R = 16


def kernel_group(group: int) -> bool:
    """Whether the int4 kernels take this group size: a power of two of at least 32 (16 bytes of codes per row
    and chunk, what ``tl.dot`` needs); other groups run eagerly."""
    return group >= 32 and group & (group - 1) == 0


def _check_triton_for_quant() -> None:
    if not triton_available():
        raise RuntimeError("quantised factors on CUDA run through rankcut's Triton kernels, and Triton is not "
                           "importable: install triton, move the model to the CPU, or switch the kernels off "
                           "(RANKCUT_KERNELS=0) to dequantise eagerly on the GPU")


def quant_plan(m: int, k: int, ranks: list[int], ns: list[int], group: int, device: torch.device) -> LowRankPlan:
    """The (cached) plan of the quantised kernels: the bf16 plan with :data:`QUANT_ELEMS`; int4 tiles one scale
    group wide (:data:`INT4_BLOCK_R` rows at M = 1)."""
    sms, hopper = _device_info(device)
    key = ("quant", m, k, tuple(ranks), tuple(ns), group, sms, QUANT_ELEMS, QUANT_WARPS)
    plan = _PLANS.get(key)
    if plan is None:
        if len(ranks) > 4:
            raise ValueError(f"the quantised kernels address at most four segments, got {len(ranks)}")
        opts = {"pdl": hopper, "max_elems": QUANT_ELEMS, "num_warps": QUANT_WARPS, **_OVERRIDES,
                "mode": "two"}  # no fused variant
        if group:  # int4: a phase-1 tile and a phase-2 chunk are one scale group
            opts.update(block_k=group, block_rk=group)
            if m == 1:
                opts.setdefault("block_r", INT4_BLOCK_R)
        plan = _PLANS[key] = plan_lowrank(m, k, ranks, ns, sms, **opts)
    return plan


def quant_eligible(x: torch.Tensor, tensors: list[torch.Tensor | None], rows: int) -> bool:
    """Like :func:`eligible` for quantised factors: codes and scales have their own dtypes; the bias (if any)
    must have the input's dtype. Raises RuntimeError when the kernels are on and Triton is missing."""
    if not x.is_cuda or not _STATE["enabled"] or not 1 <= rows <= MAX_M or x.dtype not in KERNEL_DTYPES:
        return False
    if any(t is not None and not t.is_cuda for t in tensors):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    if torch.compiler.is_compiling():
        return False
    _check_triton_for_quant()
    return True


def run_quant_kernel(x: torch.Tensor, Vc: torch.Tensor, sv: torch.Tensor, Uc: torch.Tensor, su: torch.Tensor,
                     bias: torch.Tensor | None, ranks: list[int], ns: list[int], group: int, owner,
                     scale_offsets: tuple[int, int, int] = (0, 0, 0), attr: str = "_rankcut_scratch") -> torch.Tensor:
    """``(x Vᵀ) Uᵀ + b`` for stacked quantised segments (at most four) through the Triton kernels."""
    from rankcut.kernels.lowrank_quant import launch_quant

    x2d, y, scratch = _call_buffers(x, int(Vc.shape[0]), ranks, ns, owner, attr)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    plan = quant_plan(x2d.shape[0], x2d.shape[1], ranks, ns, group, x.device)
    launch_quant(x2d, Vc, sv, Uc, su, bias, y, scratch, plan, group, scale_offsets)
    return y.reshape(*x.shape[:-1], sum(ns))


def quant_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The kernel's result for a :class:`~rankcut.modules.QuantLowRankLinear` on ``x``, or None when the eager
    (dequantising) path runs: not eligible (more than :data:`MAX_M` rows among others). Unlike float factors,
    every eligible batch takes the kernel: the eager path would first dequantise both factors in memory.

    Raises:
        RuntimeError: a CUDA input, kernels on, and Triton not importable.
    """
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // k if k else 0
    V, U = layer.V, layer.U
    if (layer.group and not kernel_group(layer.group)) or not quant_eligible(x, [V.codes, U.codes, layer.bias], rows):
        return None
    return run_quant_kernel(x, V.codes, V.scale, U.codes, U.scale, layer.bias, [layer.rank], [layer.out_features],
                            layer.group, layer)
