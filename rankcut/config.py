"""Versioned configuration objects.

Every option that changes the numbers in a compressed checkpoint lives in :class:`CompressConfig`; it is
validated when built, serialised into the checkpoint's ``rankcut.json`` and read back from it, so a
checkpoint always says how it was made. Runtime choices that do not change the result's meaning
(device, progress bars) are arguments of :func:`rankcut.compress_` instead.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 2

SAMPLINGS = ("random", "first")
_ALLOCATION_KEYS = ("keep", "energy", "rank")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_allocation(where: str, spec: dict) -> None:
    """Validate a mapping holding at most one of ``keep``/``energy``/``rank`` (or ``dense: True``).

    Raises:
        ValueError: naming ``where`` and the offending key or value.
    """
    unknown = set(spec) - {*_ALLOCATION_KEYS, "dense"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use keep, energy, rank or dense")
    given = [k for k in _ALLOCATION_KEYS if spec.get(k) is not None]
    if spec.get("dense"):
        given.append("dense")
    if len(given) > 1:
        raise ValueError(f"{where}: give only one of keep, energy, rank, dense (got {', '.join(given)})")
    if spec.get("keep") is not None:
        _check_fraction(f"{where}: keep", spec["keep"])
    if spec.get("energy") is not None:
        _check_fraction(f"{where}: energy", spec["energy"])
    if spec.get("rank") is not None:
        _check_rank(f"{where}: rank", spec["rank"])


def check_pattern(pattern: str) -> None:
    """A module-name pattern is an exact name, or ``re:`` followed by a regular expression."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"module-name pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(f"invalid regular expression in pattern {pattern!r}: {err}") from None


def pattern_matches(pattern: str, name: str) -> bool:
    """True when ``name`` matches ``pattern`` (exact name, or ``re:REGEX`` searched anywhere in the name)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern == name


@dataclass
class CompressConfig:
    """How to compress a model.

    Allocation: ``allocation`` names the policy that chooses each target's rank (``rankcut.policies``):
    ``uniform`` (``keep``: each target keeps that fraction of its parameters), ``energy`` (``energy``: per
    target, the smallest rank whose singular values hold this fraction of the squared spectrum of the matrix
    the method factorises) or ``rank`` (``rank``: the same rank everywhere). Left None, it follows from the
    parameter given (``energy`` -> energy, ``rank`` -> rank, else uniform with ``keep=0.8``). A target whose
    rank would reach its break-even rank ``mn/(m+n)`` stays dense.

    Attributes:
        method: registered method name (``svd``, ``asvd``, ``whiten``; see ``rankcut.methods``).
        options: the method's own settings: a dict, or the method's config dataclass (``WhitenConfig(...)``);
            validated into that dataclass, an option the method does not have is an error.
        allocation: registered allocation policy name (None: inferred, see above).
        keep: kept fraction of the targets' parameters, in (0, 1].
        energy: spectral energy threshold in (0, 1].
        rank: fixed rank >= 1.
        speedup: for a budgeted global policy (``spectrum``, ``sensitivity``): the budget as a predicted batch-1
            decode speedup (> 1) of the whole model from the roofline cost model (:mod:`rankcut.cost`),
            instead of ``keep``.
        policy_options: the policy's own settings (validated by the policy's config dataclass, if it has one).
        overrides: ordered mapping from a module-name pattern (exact name or ``re:REGEX``) to an allocation
            rule, e.g. ``{"re:mlp\\.down_proj": {"keep": 0.9}, "model.layers.0.self_attn.q_proj":
            {"dense": True}}``. The first matching pattern wins; the policy allocates the other targets.
        include: module-name patterns selecting targets among all linear layers (default: every linear
            layer inside the transformer blocks).
        exclude: module-name patterns removed from the targets.
        calib_samples, seq_len, seed, sampling: calibration windows (``seq_len`` None = min(2048, model max);
            ``sampling`` ``random`` draws distinct non-overlapping windows with ``seed``, ``first`` takes the
            first ones in order). ``seed`` also seeds randomized solvers.
        batch_size: calibration windows per forward pass.
        layerwise: process one transformer block at a time (memory bounded by one block plus its
            calibration activations); False runs the whole model with hooks.
        sequential: with ``layerwise``, calibrate each block on the outputs of the already-compressed blocks
            before it instead of on the dense model's activations.
        factor_dtype: store the low-rank factors quantised (``int8``, ``fp8`` e4m3, ``int4``; None: in the
            model's float dtype), by :func:`rankcut.quantize.quantize_factors_` after the decomposition.
        factor_group: int4 scales: one per this many input columns of each factor (must divide every target's
            input dimension).
        compensate: quantise V first, refit U to it by least squares in the layer's input norm (a second
            calibration pass), then quantise U; False quantises both factors as they are.
    """

    method: str = "whiten"
    options: Any = None
    allocation: str | None = None
    keep: float | None = None
    energy: float | None = None
    rank: int | None = None
    speedup: float | None = None
    policy_options: dict = field(default_factory=dict)
    overrides: dict[str, dict] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    calib_samples: int = 128
    seq_len: int | None = None
    seed: int = 0
    sampling: str = "random"
    batch_size: int = 8
    layerwise: bool = True
    sequential: bool = False
    factor_dtype: str | None = None
    factor_group: int = 128
    compensate: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        from rankcut.methods import get_method  # late imports: methods and policies import config
        from rankcut.policies import get_policy

        spec = get_method(self.method)
        self.options = spec.make_config(self.options)
        check_allocation("config", {"keep": self.keep, "energy": self.energy, "rank": self.rank})
        if self.speedup is not None:
            ok = isinstance(self.speedup, (int, float)) and not isinstance(self.speedup, bool)
            if not (ok and math.isfinite(self.speedup) and self.speedup > 1):
                raise ValueError(f"speedup must be a number > 1, got {self.speedup!r}")
            given = [k for k in _ALLOCATION_KEYS if getattr(self, k) is not None]
            if given:
                raise ValueError(f"config: give only one budget: speedup or {given[0]}")
        if self.allocation is None:
            self.allocation = "energy" if self.energy is not None else "rank" if self.rank is not None else "uniform"
        policy = get_policy(self.allocation)
        policy.check_config(self)  # may fill in its default parameter (uniform: keep 0.8)
        self.policy_options = policy.make_options(self.policy_options)
        self.overrides = dict(self.overrides)
        for pattern, spec_ in self.overrides.items():
            check_pattern(pattern)
            if not isinstance(spec_, dict) or not spec_:
                raise ValueError(f"override {pattern!r} must map to a non-empty dict, got {spec_!r}")
            check_allocation(f"override {pattern!r}", spec_)
        self.include, self.exclude = list(self.include), list(self.exclude)
        for pattern in [*self.include, *self.exclude]:
            check_pattern(pattern)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        for name in ("calib_samples", "batch_size"):
            _check_rank(name, getattr(self, name))
        if self.seq_len is not None:
            _check_rank("seq_len", self.seq_len)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.sequential and not self.layerwise:
            raise ValueError("sequential calibration needs layerwise processing")
        if self.factor_dtype is not None:
            from rankcut.quant import FORMATS, check_group

            if self.factor_dtype not in FORMATS:
                raise ValueError(f"unknown factor_dtype {self.factor_dtype!r}; choose one of {', '.join(FORMATS)}")
            if self.factor_dtype == "int4":
                check_group(self.factor_group, self.factor_group)  # even and >= 2 (a dimension of one group)
        if not isinstance(self.compensate, bool):
            raise ValueError(f"compensate must be True or False, got {self.compensate!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"config version {self.version} is newer than this rankcut understands ({CONFIG_VERSION}); "
                "upgrade rankcut"
            )
        self.version = CONFIG_VERSION

    @property
    def rule(self) -> dict:
        """The global allocation parameter as a one-key mapping, e.g. ``{"keep": 0.8}`` (empty for a policy that
        takes none)."""
        for key in (*_ALLOCATION_KEYS, "speedup"):
            if getattr(self, key) is not None:
                return {key: getattr(self, key)}
        return {}

    @property
    def method_spec(self):
        from rankcut.methods import get_method

        return get_method(self.method)

    def to_dict(self) -> dict:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["options"] = self.options.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CompressConfig:
        """Rebuild a config saved by :meth:`to_dict` (version 1 records are migrated); unknown keys are an
        error, missing ones take defaults."""
        data = dict(data)
        if data.get("version", 1) < 2:
            data = _migrate_v1(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown CompressConfig field(s): {sorted(unknown)}")
        return cls(**data)


#: Version-1 fields that became method options in version 2 (each kept only by methods that have it).
_V1_OPTIONS = ("solver", "oversample", "power_iters", "svd_dtype", "alpha", "damping")


def _migrate_v1(data: dict) -> dict:
    """A version-1 config dict (every method option at the top level) in version-2 form."""
    from rankcut.methods import get_method

    method = data.get("method", "whiten")
    accepted = get_method(method).option_names()
    options = {k: data.pop(k) for k in _V1_OPTIONS if k in data}
    data["options"] = {k: v for k, v in options.items() if k in accepted}
    data["version"] = CONFIG_VERSION
    return data


# ---------------------------------------------------------------------------------------------- recovery

RECOVER_VERSION = 1
MODES = ("factors", "grow")
INITS = ("zero", "residual")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(name: str, value, low: float, low_open: bool = True, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value >= high:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and < {high}")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class RecoverConfig:
    """How to recover quality. Validated when built; serialised into the checkpoint's record.

    Attributes:
        mode: ``factors`` (LoRA on U and V, merged back, rank unchanged) or ``grow`` (residual adapter on the
            layer, merged by concatenation, rank + ``lora_rank``).
        init: ``zero`` or ``residual`` (what ``residual`` means per mode: :mod:`rankcut.adapters`).
        lora_rank, lora_alpha, lora_dropout: adapter rank, scale numerator (None: ``lora_rank``, i.e. scale 1)
            and dropout on the adapter input.
        steps: optimizer steps; each sees ``batch_size · grad_accum`` windows of ``seq_len`` tokens.
        lr, warmup_steps, weight_decay, max_grad_norm: AdamW with linear warm-up (None: 5 % of the steps)
            then cosine decay to 10 % of ``lr``; gradient-norm clipping (None: off).
        seed: adapter initialisation, window order and dropout.
        distill: weight in [0, 1] of knowledge distillation from the dense model, the token-mean of
            KL(dense ‖ recovered) over the vocabulary; the next-token loss gets ``1 − distill``. Needs the
            dense model.
        precision: ``auto`` (bf16 autocast on a CUDA device that supports it, else fp32), ``fp32``,
            ``bf16`` or ``fp16`` (autocast with a gradient scaler; CUDA only).
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        train_shared: mode ``factors``: also train factors shared across layers (``tucker`` with ``group="layers"``)
            directly; by default only each layer's own factors get adapters.
        eval_every, eval_windows: held-out perplexity every N steps (None: 10 times per run) on the first
            ``eval_windows`` windows of the evaluation text.
        save_every: write the resumable training state every N steps (needs a work folder).
    """

    mode: str = "factors"
    init: str = "zero"
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    distill: float = 0.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    train_shared: bool = False
    eval_every: int | None = None
    eval_windows: int = 16
    save_every: int = 100
    version: int = RECOVER_VERSION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown recovery mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("lora_rank", "steps", "batch_size", "grad_accum", "eval_windows", "save_every"):
            _positive_int(name, getattr(self, name))
        _positive_int("seq_len", self.seq_len, 2)
        _positive_int("seed", self.seed, 0)
        if self.warmup_steps is not None:
            _positive_int("warmup_steps", self.warmup_steps, 0)
        if self.eval_every is not None:
            _positive_int("eval_every", self.eval_every)
        if self.lora_alpha is not None:
            _finite("lora_alpha", self.lora_alpha, 0)
        _finite("lora_dropout", self.lora_dropout, 0, low_open=False, high=1)
        _finite("distill", self.distill, 0, low_open=False)
        if self.distill > 1:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        _finite("lr", self.lr, 0)
        _finite("weight_decay", self.weight_decay, 0, low_open=False)
        if self.max_grad_norm is not None:
            _finite("max_grad_norm", self.max_grad_norm, 0)
        if self.version > RECOVER_VERSION:
            raise ValueError(f"recover config version {self.version} is newer than this rankcut ({RECOVER_VERSION})")

    @property
    def scaling(self) -> float:
        """The adapter's output scale ``lora_alpha / lora_rank``."""
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
