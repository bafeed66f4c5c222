"""Small decode-step kernels folded into the next low-rank projection's phase 1 (one token, CUDA, opt-in).

- :func:`norm_project`: residual add + RMSNorm, then a low-rank layer or group (q/k/v, gate/up): phase 1
  reads ``h`` and the residual, writes their sum (the new residual) and multiplies ``V`` by ``RMSNorm(sum)``,
  instead of a separate add + RMSNorm kernel. Needs the whole input row in one phase-1 tile (hidden size up to
  the plan's tile width, 4096 on the default plan).
- :func:`gated_project`: ``silu(gate) · up``, then the down projection: phase 1 reads the [gate | up] row and
  forms the product as it loads, instead of a separate SiLU·up kernel.

Each returns None where it does not apply (another module type, more than one row, a plan without the
two-launch GEMV path, no kernel, …); the caller then runs the separate kernels. The numerics are those of
the separate kernels (the same roundings; the RMSNorm statistic is summed in another order, so outputs can
differ from the unfolded step by rounding).
"""

from __future__ import annotations

import torch

from rankcut.kernels import dispatch


def _factors(module):
    """(V, U_flat, bias, ranks, ns) of a ``LowRankLinear`` (plain, contiguous factors) or a ``LowRankGroup``, else
    None. Recognised by type name and record type: the kernels stage sits below the module types."""
    if type(module).__name__ == "LowRankGroup":
        return module.V_cat, module.U_flat, module.bias_cat, module.ranks, module.ns
    if type(module).__name__ == "LowRankLinear" and getattr(module, "record_type", None) == "lowrank":
        factors = dispatch.kernel_factors(module)
        return None if factors is None else (*factors, [module.rank], [module.out_features])
    return None


def _plan(module, x: torch.Tensor, k: int):
    """(factors, plan) when ``module`` would run the two-launch GEMV kernel on one row of width ``k``."""
    f = _factors(module)
    if f is None or x.numel() != x.shape[-1] or not x.is_contiguous():
        return None
    V, U, bias, ranks, ns = f
    if V.shape[1] != k or not dispatch.eligible(x, [V, U, bias], 1):
        return None
    plan = dispatch.get_plan(1, k, ranks, ns, x.device)
    if plan.mode != "two" or plan.use_dot:
        return None
    return f, plan


def _run(module, x2d: torch.Tensor, f, plan, prologue: dict) -> torch.Tensor:
    from rankcut.kernels.lowrank import launch

    V, U, bias, ranks, ns = f
    _, y, scratch = dispatch._call_buffers(x2d[:, : V.shape[1]], int(V.shape[0]), ranks, ns, module,
                                           "_rankcut_scratch")
    launch(x2d, V, U, bias, y, scratch, plan, prologue=prologue)
    return y


def norm_project(module, h: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """``(module(RMSNorm(s)), s)`` with ``s = res + h`` (``h`` when ``res`` is None), in one pair of launches, or
    None where the fold does not apply."""
    k = h.shape[-1]
    got = _plan(module, h, k)
    if got is None or (res is not None and (res.shape != h.shape or not res.is_contiguous() or res.dtype != h.dtype)):
        return None
    f, plan = got
    if plan.k_iters != 1 or plan.split_k != 1 or weight.dtype != h.dtype or not weight.is_contiguous():
        return None
    s = torch.empty_like(h)
    y = _run(module, h.reshape(1, k), f, plan,
             {"kind": "add_rmsnorm", "res": None if res is None else res.reshape(1, k), "weight": weight,
              "eps": float(eps), "out": s.reshape(1, k)})
    return y.reshape(*h.shape[:-1], y.shape[-1]), s


def gated_project(module, gu: torch.Tensor) -> torch.Tensor | None:
    """``module(silu(gate) · up)`` for ``gu`` = [gate | up] (one row), in one pair of launches, or None."""
    if gu.shape[-1] % 2:
        return None
    k = gu.shape[-1] // 2
    got = _plan(module, gu, k)
    if got is None:
        return None
    f, plan = got
    y = _run(module, gu.reshape(1, 2 * k), f, plan, {"kind": "silu"})
    return y.reshape(*gu.shape[:-1], y.shape[-1])
