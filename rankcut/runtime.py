"""Runtime activation decomposition as a transform of a loaded model (seed 001, D-com; the math is
:mod:`rankcut.dcom`).

A :class:`RuntimePlan` names the decoder blocks whose inputs are decomposed at run time, the rank, the mode and
the outlier thresholds. :func:`apply_runtime` redirects the ``forward`` of the projections that read each block's
two sub-block inputs (q/k/v, gate/up; GPT-2's ``c_attn`` and ``c_fc``): the first of a group decomposes the input
once per forward pass and every layer of the group consumes the same factors. Weights, module structure and
state-dict keys are untouched, so a saved checkpoint is the model's own and the plan travels in the record
(``record.runtime``); :func:`rankcut.load` and ``from_pretrained`` re-apply it. :func:`calibrate_thresholds`
sets each input's outlier threshold from calibration text so that the given fraction of channels is extracted
on average (the seed's offline per-layer table), and the fraction actually extracted is counted per input.

Modes: ``input`` (the weight stays as it is: dense, or the low-rank layer's product) and ``input+weight`` (the
weight must be a rankcut low-rank layer; its factors join the product, eq. 5). ``preserve`` adds the seed's
decomposed-preserved computation where a block allows it: the attention's value path is linear from the
block input to the output projection, ``Σ_h A_h (X W_v,hᵀ) W_o,hᵀ``, so with ``X ≈ U Vh`` it runs as
``Σ_h (A_h U) (Vh W_v,hᵀ W_o,hᵀ)``: the values are never formed, the attention multiplies S × k instead of
S × head_dim, and the output projection is a k-wide product. Every other projection output meets a
non-linearity (softmax, the gated activation) before the next product, so nowhere else can it be kept factored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rankcut.dcom import apply_linear, decompose
from rankcut.fuse import GROUPS

log = logging.getLogger(__name__)

MODES = ("input", "input+weight")
#: The projections that read a sub-block's input, grouped by that input (fuse.GROUPS plus single readers).
READERS = (*GROUPS, ("c_attn",), ("c_fc",), ("query_key_value",), ("dense_h_to_4h",), ("fc1",), ("w1", "w3"))
_ATTR = "_rankcut_runtime"


@dataclass
class RuntimePlan:
    """What to decompose at run time.

    Attributes:
        layers: decoder block indices (the seed spreads them and avoids the first).
        rank: activation rank k per prompt.
        mode: ``input`` or ``input+weight``.
        outlier_fraction: fraction of channels to keep exact; turned into per-input ``thresholds`` by
            :func:`calibrate_thresholds` (0: none).
        thresholds: input name (the first projection of its group) -> magnitude threshold.
        solver: ``lanczos`` or ``exact``; reorth: Lanczos reorthogonalisation.
        preserve: decomposed-preserved attention (Llama-family blocks): the value path stays factored through the
            attention into the output projection (see :class:`_PreservedAttention`).
    """

    layers: list[int]
    rank: int
    mode: str = "input"
    outlier_fraction: float = 0.0
    thresholds: dict[str, float] = field(default_factory=dict)
    solver: str = "lanczos"
    reorth: str = "full"
    preserve: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (list, tuple)) or not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"layers must be a non-empty list of block indices, got {self.layers!r}")
        self.layers = sorted(set(self.layers))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 <= f < 1) or math.isnan(f):
            raise ValueError(f"outlier_fraction must be in [0, 1), got {f!r}")
        if self.solver not in ("lanczos", "exact"):
            raise ValueError(f"solver must be lanczos or exact, got {self.solver!r}")
        if not isinstance(self.preserve, bool):
            raise ValueError(f"preserve must be true or false, got {self.preserve!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RuntimePlan:
        if not isinstance(data, dict):
            raise ValueError(f"a runtime plan is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown runtime plan field(s) {unknown}")
        return cls(**data)


def reader_groups(model: nn.Module, layers: list[int]) -> list[list[tuple[str, nn.Module]]]:
    """The groups of projections reading one input, in the given blocks.

    Raises:
        ValueError: the model has no block stack, or a block index that does not exist.
    """
    from rankcut.targets import find_blocks

    found = find_blocks(model)
    if found is None:
        raise ValueError("runtime decomposition needs a stack of transformer blocks")
    prefix, blocks = found
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"block(s) {bad} do not exist: the model has blocks 0..{len(blocks) - 1}")
    groups = []
    for i in layers:
        named = dict(blocks[i].named_modules())
        for names in READERS:
            for parent, module in named.items():
                members = [(f"{parent}.{n}" if parent else n) for n in names]
                if all(m in named for m in members):
                    groups.append([(f"{prefix}.{i}.{m}", named[m]) for m in members])
    return groups


def _weights(layer: nn.Module, mode: str):
    """``(weight, V_w, U_w, bias)`` of a dense or low-rank projection for :func:`rankcut.dcom.apply_linear`."""
    from rankcut.modules import LowRankLinear

    if mode == "input+weight":
        if not isinstance(layer, LowRankLinear):
            raise ValueError(f"mode input+weight needs rankcut low-rank layers; {type(layer).__name__} is not one "
                             "(compress the model first, or use mode input)")
        return None, layer.V.weight, layer.U.weight, layer.U.bias
    weight, bias = _dense(layer)
    return weight, None, None, bias


class _DecomposedCall:
    """Replaces ``layer.forward``: the group's first reader decomposes the input, every reader uses it."""

    def __init__(self, layer: nn.Module, name: str, state: dict, plan: RuntimePlan, threshold, last: bool) -> None:
        self.layer, self.name, self.state, self.plan, self.threshold, self.last = layer, name, state, plan, threshold, last
        self.weights = _weights(layer, plan.mode)
        self.calls = 0
        self.extracted = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cached = self.state.get("input")
        if cached is not None and cached[0] is x and cached[1] == x._version:
            factors = self.state["factors"]
        else:
            lead = x.shape[:-1]
            X = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x[None]
            if self.plan.rank > min(X.shape[-2], X.shape[-1]):
                raise ValueError(f"runtime decomposition at rank {self.plan.rank} needs prompts of at least that many "
                                 f"tokens; {self.name} got {X.shape[-2]} tokens of {X.shape[-1]} channels")
            factors = decompose(X, self.plan.rank, self.threshold, self.plan.solver, self.plan.reorth)
            factors["lead"] = lead
            self.state.update(input=(x, x._version), factors=factors)
        self.calls += 1
        self.extracted += factors["fraction"]
        weight, V_w, U_w, bias = self.weights
        y = apply_linear(factors, weight, V_w, U_w, bias)
        if self.last:
            self.state.clear()
        return y.reshape(*factors["lead"], y.shape[-1]).to(x.dtype)


class _PreservedAttention:
    """Replaces a Llama-family attention's ``forward``: q and k from the decomposed input as usual, the value path
    kept factored. With ``X = U Vh + X_out`` (outlier channels apart) and ``C = Vh W_vᵀ`` (k × kv·d):

    ``y = Σ_h (A_h U) (C_g(h) W_o,hᵀ) + Σ_h (A_h X_out W_v,hᵀ) W_o,hᵀ + biases``

    — the attention runs on the k columns of U (shared by all heads) plus, only when a prompt has outlier
    channels, their exact values. With a KV cache (generation), the prefill also stores the dense values for
    the later steps; a step that continues a cache runs the layer's own forward."""

    def __init__(self, attn: nn.Module, mode: str) -> None:
        self.attn, self.mode = attn, mode

    def __call__(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        attn = self.attn
        past = 0 if cache is None else cache.get_seq_length(attn.layer_idx)
        if past:
            return type(attn).forward(attn, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        B, S, _ = hidden_states.shape
        d, groups = attn.head_dim, attn.num_key_value_groups
        q = attn.q_proj(hidden_states).view(B, S, -1, d).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(B, S, -1, d).transpose(1, 2)
        call = getattr(attn.v_proj, _ATTR)
        factors = call.state["factors"]  # left by q_proj for this input (v_proj, the group's last, is not called)
        call.state.clear()
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        heads, kv = q.shape[1], k.shape[1]
        W_v, b_v = _dense(attn.v_proj)
        W_o, b_o = _dense(attn.o_proj)
        dt = q.dtype
        U, Vh = factors["U"].to(dt), factors["Vh"].to(dt)
        r = U.shape[-1]
        C = (Vh @ W_v.to(dt).mT).view(B, r, kv, d)  # per kv head: k × d
        W_oh = W_o.to(dt).view(W_o.shape[0], heads, d)  # H × heads × d
        C_h = C.repeat_interleave(groups, dim=2)  # B × k × heads × d
        M = torch.einsum("bkhd,nhd->bhkn", C_h, W_oh)  # B × heads × k × H
        values = U[:, None].expand(B, heads, S, r)
        outliers = bool(factors["outliers"].any())
        if outliers:
            v_out = (factors["X_out"].to(dt) @ W_v.to(dt).mT).view(B, S, kv, d).transpose(1, 2)
            values = torch.cat([values, v_out.repeat_interleave(groups, dim=1)], -1)
        keys = k.repeat_interleave(groups, dim=1)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[..., :S]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None and S > 1, scale=attn.scaling)
        y = torch.einsum("bhsk,bhkn->bsn", out[..., :r], M)
        if outliers:
            y = y + torch.einsum("bhsd,nhd->bsn", out[..., r:], W_oh)
        if b_v is not None:
            y = y + torch.einsum("hd,nhd->n", b_v.to(dt).view(kv, d).repeat_interleave(groups, 0), W_oh)
        if b_o is not None:
            y = y + b_o.to(dt)
        if cache is not None:  # later decode steps read dense values from the cache
            v = apply_linear(factors, weight=W_v, bias=b_v).view(B, S, kv, d).transpose(1, 2).to(k.dtype)
            cache.update(k, v, attn.layer_idx)
        return y, None


def _dense(layer: nn.Module):
    """A projection's dense weight and bias (a rankcut low-rank layer's product)."""
    from rankcut.modules import LowRankLinear, dense_weight

    if isinstance(layer, LowRankLinear):
        dense = layer.to_dense()
        return dense.weight.detach(), None if dense.bias is None else dense.bias.detach()
    return dense_weight(layer), getattr(layer, "bias", None)


def apply_runtime(model: nn.Module, plan: RuntimePlan, calibration: torch.Tensor | None = None,
                  batch_size: int = 8) -> nn.Module:
    """Decompose the inputs of ``plan.layers`` at run time (in place; :func:`remove_runtime` undoes it) and record
    the plan on the model's rankcut record, when it has one.

    A plan with an outlier fraction but no thresholds gets them first from ``calibration`` (N × T token ids,
    :func:`calibrate_thresholds`).

    Raises:
        ValueError: a block that does not exist, a mode the layers cannot take, thresholds needed and no
            calibration windows; the model is unchanged then.
    """
    groups = reader_groups(model, plan.layers)
    if plan.outlier_fraction > 0 and not plan.thresholds:
        if calibration is None:
            raise ValueError("the plan has an outlier fraction but no thresholds: give calibration windows "
                             "(or run calibrate_thresholds first)")
        calibrate_thresholds(model, plan, calibration, batch_size)
    calls = []
    for group in groups:
        state: dict = {}
        threshold = plan.thresholds.get(group[0][0]) if plan.outlier_fraction > 0 else None
        if plan.outlier_fraction > 0 and threshold is None:
            raise ValueError(f"the plan has no outlier threshold for {group[0][0]}: run calibrate_thresholds first")
        for i, (name, layer) in enumerate(group):
            calls.append((layer, _DecomposedCall(layer, name, state, plan, threshold, i == len(group) - 1)))
    preserved = []
    if plan.preserve:
        from rankcut.targets import find_blocks

        _, blocks = find_blocks(model)
        for i in plan.layers:
            attn = getattr(blocks[i], "self_attn", None)
            if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                                                                   "num_key_value_groups", "scaling")):
                raise ValueError(f"preserve needs Llama-family attention (q/k/v/o projections); block {i} has "
                                 f"{type(attn).__name__ if attn is not None else 'none'}")
            preserved.append((attn, _PreservedAttention(attn, plan.mode)))
    remove_runtime(model)  # every call was built: now change the model
    for layer, call in calls:
        layer.forward = call
        setattr(layer, _ATTR, call)
    for attn, call in preserved:
        attn.forward = call
        setattr(attn, _ATTR, call)
    from rankcut.record import get_record

    record = get_record(model)
    if record is not None:
        record.runtime = {**(record.runtime or {}), "activation_decomposition": plan.to_json()}
    model._rankcut_runtime_plan = plan
    return model


def remove_runtime(model: nn.Module) -> None:
    """Undo :func:`apply_runtime` (the record keeps no runtime entry)."""
    for module in model.modules():
        if getattr(module, _ATTR, None) is not None:
            del module.forward
            delattr(module, _ATTR)
    from rankcut.record import get_record

    record = get_record(model)
    if record is not None and record.runtime:
        record.runtime.pop("activation_decomposition", None)
        record.runtime = record.runtime or None
    if hasattr(model, "_rankcut_runtime_plan"):
        del model._rankcut_runtime_plan


def extracted_fractions(model: nn.Module) -> dict[str, float]:
    """The mean fraction of channels extracted as outliers, per decomposed input, since the transform."""
    out = {}
    for module in model.modules():
        call = getattr(module, _ATTR, None)
        if call is not None and call.calls:
            out[call.name] = call.extracted / call.calls
    return out


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, plan: RuntimePlan, windows: torch.Tensor, batch_size: int = 8) -> RuntimePlan:
    """Set ``plan.thresholds``: per decomposed input, the magnitude above which ``plan.outlier_fraction`` of the
    channels lie on average over the calibration ``windows`` (N × T token ids), computed from each window's
    per-channel maximum magnitude (the channels the runtime rule would extract). Returns the plan."""
    if plan.outlier_fraction <= 0:
        plan.thresholds = {}
        return plan
    groups = reader_groups(model, plan.layers)
    maxima: dict[str, list[torch.Tensor]] = {g[0][0]: [] for g in groups}
    hooks = []
    for group in groups:
        name, layer = group[0]

        def hook(module, args, name=name):
            x = args[0]
            X = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x[None]
            maxima[name].append(X.abs().amax(dim=-2).float().cpu())

        hooks.append(layer.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    thresholds = {}
    for name, chunks in maxima.items():
        per_channel = torch.cat(chunks).flatten()
        thresholds[name] = float(torch.quantile(per_channel.double(), 1 - plan.outlier_fraction))
    plan.thresholds = thresholds
    return plan
