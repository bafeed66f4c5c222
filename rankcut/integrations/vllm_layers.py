"""The vLLM side of the plugin (:mod:`rankcut.integrations.vllm_plugin`): the ``rankcut`` quantization config,
the low-rank linear method, and the config parser. Imports vLLM; imported only by
:func:`~rankcut.integrations.vllm_plugin.register`.

A vLLM linear layer is one of rankcut's targets (``o_proj``, GPT-2's fused ``c_attn``) or several
(``qkv_proj`` = q/k/v, ``gate_up_proj`` = gate/up, through the model's ``packed_modules_mapping``); each part is
a *piece*: low-rank with its recorded rank, or dense. The layer holds

- ``U.weight``: every low-rank piece's local ``U`` (rows sharded for column-parallel layers), flattened and
  concatenated (pieces may have different ranks);
- ``V.weight``: the pieces' local ``V`` stacked, (Σ ranks) × local in (columns sharded for row-parallel);
- ``weight``: the dense pieces' local rows, only when a layer mixes dense and low-rank parts;
- ``bias``: vLLM's own, loaded by vLLM's loader (the checkpoint's ``<target>.U.bias`` is renamed ``.bias``).

The names are the checkpoint's (``q_proj.U.weight`` arrives as ``qkv_proj.U.weight`` with shard id ``q``), so
vLLM's own weight iteration, stacking and GPT-2 transposition reach the loaders here, which split the full
tensors with :mod:`rankcut.integrations.sharding`. The forward pass is ``V`` once for all pieces, then each
piece's ``U``, as :class:`rankcut.modules.grouped.LowRankGroup` does.

A *quantised* piece (``quant_lowrank``: :class:`rankcut.modules.QuantLowRankLinear`) is a dequantising
fallback. While loading, the layer also holds ``U.codes``, ``U.scale``, ``V.codes`` and ``V.scale`` (flat, each
quantised piece's share of this rank side by side; names the checkpoint's, ``q_proj.V.codes`` arriving as
``qkv_proj.V.codes`` with shard id ``q``), cut as the float factors are cut (:func:`~rankcut.integrations.
sharding.quant_span`: rows of U for column-parallel layers, columns of V — whole int4 groups — for row-parallel
ones). :meth:`RankcutLinearMethod.process_weights_after_loading` dequantises each share
(:func:`rankcut.quant.dequantize`, in the model's dtype, as rankcut's own CPU fallback does) into the piece's
slots of ``U.weight`` / ``V.weight`` and drops the codes and scales: from then on the layer is exactly a
``lowrank`` one (same forward, same tensor-parallel split). This saves disk and download bytes, not device
memory or bytes read per token; rankcut's dequantising Triton kernels are not used inside vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import Module, Parameter
from torch.nn import functional as F
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs
from vllm.transformers_utils.config import HFConfigParser, get_config_parser, register_config_parser
from vllm.transformers_utils.config_parser_base import ConfigParserBase

from rankcut.integrations.sharding import (
    CODE_DTYPES,
    Part,
    QuantSpan,
    ShardingError,
    column_spans,
    dequantize_shard,
    quant_span,
    shard_codes,
    shard_dense,
    shard_scale,
    shard_span,
    shard_U,
    shard_V,
)
from rankcut.integrations.vllm_plugin import (
    QUANT_METHOD,
    RankcutVllmError,
    checkpoint_dir,
    checkpoint_keys,
    factor_keys,
    hf_config,
    quantization_config,
)

#: vLLM's GPT-2 loader transposes every ``.weight`` of these layers (HF's Conv1D stores (in, out)); rankcut's
#: factors are stored (out, r) and (r, in) like ``nn.Linear``, so the loaders transpose them back.
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc")


@dataclass
class Piece:
    """One checkpoint target inside a vLLM layer: parts ``[first, first + count)`` of its output."""

    name: str
    first: int
    count: int
    rank: int | None  # None: dense
    shape: tuple[int, int] | None = None
    format: str | None = None  # quant_lowrank: int8 / fp8 / int4 codes, dequantised after loading
    group: int = 0  # int4 scales: one per this many columns

    def describe(self) -> str:
        if self.rank is None:
            return "dense"
        return f"rank {self.rank}" + (f" ({self.format} factors, quant_lowrank)" if self.format else "")


@dataclass
class QuantSlot:
    """Where one rank's share of a quantised factor lives while loading: the share (:class:`QuantSpan`), the
    full factor's shape, and its offsets in the layer's flat ``codes`` (bytes) and ``scale`` (elements)."""

    span: QuantSpan
    shape: tuple[int, int]
    code_offset: int
    scale_offset: int


# ----------------------------------------------------------------------------------------------- config


class RankcutConfig(QuantizationConfig):
    """vLLM quantization config ``rankcut``: which layers are factor pairs, of which rank.

    Args:
        targets: ``{target: {"type": "lowrank", "rank": r, "shape": [out, in]}}`` (checkpoint names; a
            ``quant_lowrank`` target adds ``"format"`` and ``"group"``).
        dense: targets the record left dense.
        architecture: the transformers class the checkpoint was saved from.
    """

    def __init__(self, targets: dict[str, dict], dense: list[str] | None = None, architecture: str | None = None):
        super().__init__()
        self.hf_targets = dict(targets)
        self.targets = dict(targets)
        self.dense = list(dense or [])
        self.architecture = architecture
        self.checkpoint: str | None = None
        self.hf_keys: set[str] | None = None
        self.keys: set[str] | None = None
        self._mapper = None

    def __repr__(self) -> str:
        quant = sum(1 for e in self.targets.values() if e.get("type") == "quant_lowrank")
        extra = f" ({quant} with quantised factors)" if quant else ""
        return f"RankcutConfig({len(self.targets)} low-rank targets{extra}, {len(self.dense)} left dense)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RankcutConfig:
        if config.get("quant_method") != QUANT_METHOD:
            raise RankcutVllmError(f"not a rankcut quantization config: quant_method {config.get('quant_method')!r}")
        targets = config.get("targets")
        if not isinstance(targets, dict):
            raise RankcutVllmError("the rankcut quantization config has no targets (write config.json with rankcut.save, "
                                   "and let the plugin's config parser read it)")
        qc = quantization_config({"targets": targets, "dense": dict.fromkeys(config.get("dense") or [])},
                                 "quantization_config")
        return cls(qc["targets"], qc["dense"], config.get("architecture"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Read the names of the checkpoint's tensors (safetensors headers) when it is a local directory, so that
        a layer neither recorded nor dense is an error naming it, not uninitialised weights."""
        self.checkpoint = str(model_name)
        self.hf_keys = checkpoint_keys(model_name)
        if self.hf_keys is not None:  # the record and the weights must agree before any layer is built
            factored = {k.rsplit(".", 2)[0] for k in self.hf_keys if k.endswith((".U.weight", ".U.codes"))}
            lacking = sorted(factored - set(self.hf_targets))
            if lacking:
                raise RankcutVllmError(f"rankcut checkpoint {model_name}: rankcut.json has no entry for "
                                       f"{', '.join(lacking[:5])}{' …' if len(lacking) > 5 else ''}, whose factors "
                                       "the weights hold: the record was edited or written by another tool; re-save "
                                       "the model with rankcut.save")
            for name, entry in self.hf_targets.items():
                for key in factor_keys(name, entry):
                    if key not in self.hf_keys:
                        raise RankcutVllmError(f"rankcut checkpoint {model_name}: rankcut.json records {name} as "
                                               f"{_entry_state(entry)}, but the weights hold no {key}")
        self._remap()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._mapper = hf_to_vllm_mapper
        self._remap()

    def _remap(self) -> None:
        """Target and tensor names as vLLM's model names them (from the checkpoint's, every time: idempotent)."""
        rename = (lambda n: self._mapper.map_name(n) or n) if self._mapper is not None else (lambda n: n)
        self.targets = {rename(name): entry for name, entry in self.hf_targets.items()}
        self.keys = None if self.hf_keys is None else {rename(k) for k in self.hf_keys}

    def get_checkpoint_weight_mapper(self):
        from vllm.model_executor.models.utils import WeightsMapper

        # the bias of a factorised target lives on U in rankcut's modules; vLLM's layer owns it as ``bias``
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_suffix={".U.bias": ".bias"})

    # ---------------------------------------------------------------------------------------- layers

    def get_quant_method(self, layer: Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, the LM head: vLLM's own
        style, parts, _ = layout(layer, prefix)
        pieces = [self._piece(name, first, count, layer, prefix)
                  for name, first, count in self._names(prefix, len(parts))]
        if all(p.rank is None for p in pieces):
            return UnquantizedLinearMethod()
        return RankcutLinearMethod(self, prefix, pieces)

    def _names(self, prefix: str, n_parts: int) -> list[tuple[str, int, int]]:
        base, _, last = prefix.rpartition(".")
        packed = self.packed_modules_mapping.get(last)
        if not packed:
            return [(prefix, 0, n_parts)]
        if len(packed) == 1:  # fused in the checkpoint too (Phi-3's qkv_proj): one target for every part
            return [(f"{base}.{packed[0]}" if base else packed[0], 0, n_parts)]
        if len(packed) != n_parts:
            raise RankcutVllmError(f"{prefix}: vLLM's layer has {n_parts} output parts, but the model maps it to "
                                   f"{len(packed)} checkpoint layers {packed}")
        return [(f"{base}.{p}" if base else p, i, 1) for i, p in enumerate(packed)]

    def _piece(self, name: str, first: int, count: int, layer: LinearBase, prefix: str) -> Piece:
        entry = self.targets.get(name)
        where = f"rankcut checkpoint {self.checkpoint or '?'}"
        has = (lambda key: True) if self.keys is None else (lambda key: key in self.keys)
        if entry is None:
            for held in ("weight", "codes"):
                if self.keys is not None and f"{name}.U.{held}" in self.keys:
                    raise RankcutVllmError(f"{where}: rankcut.json has no entry for {name}, which vLLM's "
                                           f"{type(layer).__name__} {prefix} needs, but the weights hold its factors "
                                           f"{name}.U.{held}/.V.{held}: the record was edited or written by another "
                                           "tool; re-save the model with rankcut.save")
            if not has(f"{name}.weight"):
                raise RankcutVllmError(f"{where}: vLLM's {type(layer).__name__} {prefix} needs layer {name}, which "
                                       f"rankcut.json does not record as a decomposed target and the weights do not hold "
                                       f"dense ({name}.weight)")
            if layer.has_bias and not has(f"{name}.bias"):
                raise RankcutVllmError(f"{where}: vLLM's {prefix} has a bias, but the weights hold no {name}.bias")
            return Piece(name, first, count, None)
        for key in factor_keys(name, entry, layer.has_bias):
            if not has(key):
                raise RankcutVllmError(f"{where}: rankcut.json records {name} as {_entry_state(entry)}, but the weights "
                                       f"hold no {key}")
        fmt = entry.get("format") if entry.get("type") == "quant_lowrank" else None
        return Piece(name, first, count, entry["rank"], tuple(entry["shape"]), fmt, entry.get("group") or 0)


def _entry_state(entry: dict) -> str:
    quant = entry.get("type") == "quant_lowrank"
    return f"rank {entry['rank']}" + (f" ({entry.get('format')} factors, quant_lowrank)" if quant else "")


def layout(layer: LinearBase, prefix: str) -> tuple[str, list[Part], list[Any]]:
    """``(style, parts, shard ids)`` of a vLLM linear layer: how it is split over ranks, its logical output
    parts (unsharded sizes; GQA replication) and the shard id vLLM's loaders give each part."""
    if isinstance(layer, RowParallelLinear):
        return "row", [Part(layer.output_size)], [None]
    if isinstance(layer, QKVParallelLinear):
        if len(getattr(layer, "output_sizes", ())) != 3:
            raise RankcutVllmError(f"{prefix}: {type(layer).__name__} with {len(layer.output_sizes)} parts is not "
                                   "supported by the rankcut plugin")
        replicas = layer.num_kv_head_replicas
        return "column", [Part(layer.total_num_heads * layer.head_size),
                          Part(layer.total_num_kv_heads * layer.head_size, replicas),
                          Part(layer.total_num_kv_heads * layer.v_head_size, replicas)], ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return "column", [Part(s) for s in layer.output_sizes], list(range(len(layer.output_sizes)))
    if isinstance(layer, ColumnParallelLinear):
        return "column", [Part(layer.output_size)], [None]
    if isinstance(layer, ReplicatedLinear):
        sizes = getattr(layer, "output_sizes", None) or [layer.output_size]
        return "replicated", [Part(s) for s in sizes], list(range(len(sizes))) if len(sizes) > 1 else [None]
    raise RankcutVllmError(f"{prefix}: vLLM layer type {type(layer).__name__} is not supported by the rankcut plugin")


# ------------------------------------------------------------------------------------------ the method


class RankcutLinearMethod(LinearMethodBase):
    """One vLLM linear layer made of low-rank (and possibly dense) pieces; see the module docstring."""

    def __init__(self, config: RankcutConfig, prefix: str, pieces: list[Piece]) -> None:
        self.config, self.prefix, self.pieces = config, prefix, pieces
        self.loaded: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------------------------- weights

    def create_weights(self, layer: Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        extra_weight_attrs.pop("weight_loader", None)
        self.style, self.parts, self.shard_ids = layout(layer, self.prefix)
        self.tp_size, self.tp_rank = (layer.tp_size, layer.tp_rank) if self.style != "replicated" else (1, 0)
        self.in_features = input_size
        try:
            if self.style == "row":
                _, in_local = shard_span(input_size, self.tp_size, self.tp_rank, layer=self.prefix, what="input columns")
            else:
                in_local = input_size
            u_size = v_rows = w_rows = 0
            self.slots = []  # per piece: (rows_local, U offset, V offset, W offset)
            self.quant: dict[int, dict[str, QuantSlot]] = {}  # quantised pieces: their shares of codes and scales
            code_bytes, scale_size = {"U": 0, "V": 0}, {"U": 0, "V": 0}
            for index, piece in enumerate(self.pieces):
                parts = self.parts[piece.first:piece.first + piece.count]
                rows = sum(p.size for p in parts)
                if piece.rank is not None and piece.shape != (rows, input_size):
                    raise RankcutVllmError(f"{self.prefix}: rankcut.json records {piece.name} with shape "
                                           f"{list(piece.shape)}, but vLLM's layer expects [{rows}, {input_size}]")
                local = (sum(n for _, n in column_spans(parts, self.tp_size, self.tp_rank, self.prefix))
                         if self.style == "column" else rows)
                self.slots.append((local, u_size, v_rows, w_rows))
                if piece.rank is None:
                    w_rows += local
                else:
                    u_size += local * piece.rank
                    v_rows += piece.rank
                if piece.format is not None:
                    self.quant[index] = {}
                    for child, shape, want in (("U", (rows, piece.rank), (local, piece.rank)),
                                               ("V", (piece.rank, input_size), (piece.rank, in_local))):
                        span = quant_span(child, piece.format, piece.group, shape, self.style, self.tp_size,
                                          self.tp_rank, parts if child == "U" else None, f"{self.prefix} ({piece.name})")
                        if (span.n_rows, span.keep_count) != want:  # the float factor's share, by construction
                            raise RankcutVllmError(f"{self.prefix}: {piece.name}.{child}'s quantised share "
                                                   f"({span.n_rows} x {span.keep_count}) is not its float share {want}")
                        self.quant[index][child] = QuantSlot(span, shape, code_bytes[child], scale_size[child])
                        n_codes, n_scale_bytes = span.nbytes()
                        code_bytes[child] += n_codes
                        scale_size[child] += n_scale_bytes // 4
        except ShardingError as err:
            raise RankcutVllmError(str(err)) from None
        if in_local != input_size_per_partition or sum(l[0] for l in self.slots) != sum(output_partition_sizes):
            raise RankcutVllmError(f"{self.prefix}: rankcut's split ({sum(l[0] for l in self.slots)} x {in_local} per "
                                   f"rank) disagrees with vLLM's ({sum(output_partition_sizes)} x "
                                   f"{input_size_per_partition})")
        architecture = self.config.architecture or ""
        self.transposed = architecture.startswith("GPT2") and any(n in self.prefix for n in _CONV1D_NAMES)
        formats = {self.pieces[i].format for i in self.quant}
        code_dtype = CODE_DTYPES[formats.pop()] if len(formats) == 1 else torch.uint8  # mixed formats: raw bytes
        for child, size in (("U", (u_size,)), ("V", (v_rows, in_local))):
            module = Module()
            param = Parameter(torch.empty(*size, dtype=params_dtype), requires_grad=False)
            module.register_parameter("weight", param)
            set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": self._loader(child)})
            if self.quant:  # the checkpoint's <target>.{U,V}.{codes,scale}, until process_weights_after_loading
                for field, n, dtype in (("codes", code_bytes[child], code_dtype),
                                        ("scale", scale_size[child], torch.float32)):
                    param = Parameter(torch.empty(n, dtype=dtype), requires_grad=False)
                    module.register_parameter(field, param)
                    set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": self._quant_loader(child, field)})
            layer.add_module(child, module)
        if w_rows:
            param = Parameter(torch.empty(w_rows, in_local, dtype=params_dtype), requires_grad=False)
            layer.register_parameter("weight", param)
            set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": self._loader("W")})

    def _loader(self, which: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            self._load(which, param, loaded, shard_id)

        return load

    def _quant_loader(self, child: str, field: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            self._load_quant(child, field, param, loaded, shard_id)

        return load

    def _piece_for(self, shard_id, which: str) -> int:
        if shard_id is None:
            wanted = (0, len(self.parts))
        elif isinstance(shard_id, tuple):
            ids = [self.shard_ids.index(s) for s in shard_id]
            wanted = (ids[0], len(ids))
        else:
            if shard_id not in self.shard_ids:
                raise RankcutVllmError(f"{self.prefix}: unknown shard id {shard_id!r} for {which}")
            wanted = (self.shard_ids.index(shard_id), 1)
        for index, piece in enumerate(self.pieces):
            if (piece.first, piece.count) == wanted:
                return index
        raise RankcutVllmError(f"{self.prefix}: the checkpoint gives {which} for parts {wanted} (shard {shard_id!r}), "
                               f"which is not one of its targets {[p.name for p in self.pieces]}")

    def _load(self, which: str, param: Parameter, loaded: torch.Tensor, shard_id) -> None:
        index = self._piece_for(shard_id, which)
        piece = self.pieces[index]
        local, u_off, v_off, w_off = self.slots[index]
        parts = self.parts[piece.first:piece.first + piece.count]
        rows = sum(p.size for p in parts)
        name = f"{piece.name}.{ {'U': 'U.weight', 'V': 'V.weight', 'W': 'weight'}[which] }"
        if (which == "W") != (piece.rank is None) or piece.format is not None:
            raise RankcutVllmError(f"{self.prefix}: the checkpoint holds {name}, but rankcut.json records {piece.name} "
                                   f"as {piece.describe()}")
        expected = {"U": (rows, piece.rank), "V": (piece.rank, self.in_features), "W": (rows, self.in_features)}[which]
        loaded = self._orient(loaded, expected, name)
        try:
            if which == "U":
                part = shard_U(loaded, self.style, self.tp_size, self.tp_rank, parts, self.prefix)
                dst = param.data.narrow(0, u_off, local * piece.rank).view(local, piece.rank)
            elif which == "V":
                part = shard_V(loaded, self.style, self.tp_size, self.tp_rank, self.prefix)
                dst = param.data.narrow(0, v_off, piece.rank)
            else:
                part = shard_dense(loaded, self.style, self.tp_size, self.tp_rank, parts, self.prefix)
                dst = param.data.narrow(0, w_off, local)
        except ShardingError as err:
            raise RankcutVllmError(str(err)) from None
        dst.copy_(part)
        self.loaded.add((which, index))

    def _load_quant(self, child: str, field: str, param: Parameter, loaded: torch.Tensor, shard_id) -> None:
        """This rank's share of a quantised piece's codes or scales, copied into the flat ``codes`` / ``scale``."""
        index = self._piece_for(shard_id, f"{child}.{field}")
        piece = self.pieces[index]
        name = f"{piece.name}.{child}.{field}"
        if piece.format is None:
            raise RankcutVllmError(f"{self.prefix}: the checkpoint holds {name} (quantised factors), but rankcut.json "
                                   f"records {piece.name} as {piece.describe()}")
        slot = self.quant[index][child]
        try:
            if field == "codes":
                part = shard_codes(loaded, slot.span, slot.shape, f"{self.prefix} ({name})")
                src = part.contiguous().view(torch.uint8).reshape(-1)
                param.data.view(torch.uint8).narrow(0, slot.code_offset, src.numel()).copy_(src)
            else:
                part = shard_scale(loaded, slot.span, slot.shape, f"{self.prefix} ({name})")
                param.data.narrow(0, slot.scale_offset, part.numel()).copy_(part.reshape(-1))
        except ShardingError as err:
            raise RankcutVllmError(str(err)) from None
        self.loaded.add((f"{child}.{field}", index))

    def _dequantize(self, layer: Module) -> None:
        """Each quantised piece's share of codes and scales, dequantised in the model's dtype into its slots of
        ``U.weight`` / ``V.weight``; then the codes and scales are dropped (the layer is a ``lowrank`` one)."""
        if not self.quant or not hasattr(layer.U, "codes"):
            return
        dtype = layer.U.weight.dtype
        with torch.no_grad():
            for index, slots in self.quant.items():
                piece = self.pieces[index]
                local, u_off, v_off, _ = self.slots[index]
                for child, slot in slots.items():
                    holder = getattr(layer, child)
                    codes_shape, scale_shape = slot.span.shapes()
                    codes = (holder.codes.data.view(torch.uint8).narrow(0, slot.code_offset, _numel(codes_shape))
                             .view(CODE_DTYPES[piece.format]).view(codes_shape))
                    scale = holder.scale.data.narrow(0, slot.scale_offset, _numel(scale_shape)).view(scale_shape)
                    W = dequantize_shard(codes, scale, slot.span, dtype)
                    if child == "U":
                        layer.U.weight.data.narrow(0, u_off, local * piece.rank).view(local, piece.rank).copy_(W)
                    else:
                        layer.V.weight.data.narrow(0, v_off, piece.rank).copy_(W)
        for child in ("U", "V"):
            holder = getattr(layer, child)
            del holder.codes, holder.scale

    def _orient(self, loaded: torch.Tensor, expected: tuple[int, int], name: str) -> torch.Tensor:
        shape = tuple(loaded.shape)
        if shape == expected:  # a square factor cannot tell: it was transposed when vLLM's loader transposes its layer
            return loaded.t() if expected[0] == expected[1] and self.transposed else loaded
        if shape == expected[::-1]:
            return loaded.t()  # vLLM's GPT-2 loader transposed it as if it were a Conv1D weight
        raise RankcutVllmError(f"{self.prefix}: {name} has shape {list(shape)}, expected {list(expected)}")

    def process_weights_after_loading(self, layer: Module) -> None:
        missing = []
        for index, piece in enumerate(self.pieces):
            if piece.format is not None:
                needed = [(f"{c}.{f}", f"{c}.{f}") for c in ("V", "U") for f in ("codes", "scale")]
            elif piece.rank is not None:
                needed = [("U", "U.weight"), ("V", "V.weight")]
            else:
                needed = [("W", "weight")]
            for which, suffix in needed:
                if (which, index) not in self.loaded:
                    missing.append(f"{piece.name}.{suffix}")
        if missing:
            raise RankcutVllmError(f"rankcut checkpoint {self.config.checkpoint or '?'}: vLLM's {self.prefix} was not "
                                   f"given {', '.join(missing)} by the checkpoint")
        self._dequantize(layer)

    # ------------------------------------------------------------------------------------- forward

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        U, V = layer.U.weight, layer.V.weight
        if len(self.pieces) == 1:  # the common case: one target, one product pair (bias fused in the second)
            local, _, _, _ = self.slots[0]
            return F.linear(F.linear(x, V), U.view(local, self.pieces[0].rank), bias)
        t = F.linear(x, V) if V.shape[0] else None
        outs = []
        for piece, (local, u_off, v_off, w_off) in zip(self.pieces, self.slots):
            if piece.rank is None:
                outs.append(F.linear(x, layer.weight.narrow(0, w_off, local)))
            else:
                u = U.narrow(0, u_off, local * piece.rank).view(local, piece.rank)
                outs.append(F.linear(t.narrow(-1, v_off, piece.rank), u))
        y = torch.cat(outs, dim=-1)
        return y if bias is None else y + bias


def _numel(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel()


def served_layers(model: Module) -> dict[str, dict]:
    """What each layer served by the rankcut method holds, for inspection inside a vLLM worker
    (``vllm.LLM(...).apply_model(served_layers)``): ``{layer: {"params": names of its parameters, "U": U.weight,
    "V": V.weight[, "W": weight]}}``, tensors copied to the CPU. After loading, a quantised checkpoint's layers
    hold no codes or scales, only the dequantised factors."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "quant_method", None), RankcutLinearMethod):
            continue
        entry: dict[str, Any] = {"params": sorted(n for n, _ in module.named_parameters())}
        for key, tensor in (("U", module.U.weight), ("V", module.V.weight), ("W", getattr(module, "weight", None))):
            if tensor is not None:
                entry[key] = tensor.detach().cpu().clone()
        out[name] = entry
    return out


# ------------------------------------------------------------------------------------- config parser


class RankcutConfigParser(ConfigParserBase):
    """vLLM's config parser for format ``hf`` (and ``rankcut``): a local rankcut checkpoint gives the original
    model config with the record as its ``quantization_config``; anything else goes to the parser that had the
    format before (vLLM's Hugging Face parser)."""

    fallback: type[ConfigParserBase] = HFConfigParser

    def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
        path = checkpoint_dir(model)
        if path is None:
            return self.fallback().parse(model, trust_remote_code, revision=revision, code_revision=code_revision,
                                         **kwargs)
        return hf_config(path)


def register_all() -> None:
    """Register the quantization method and the config parser with vLLM (idempotent)."""
    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(RankcutConfig)
    current = type(get_config_parser("hf"))
    if not issubclass(current, RankcutConfigParser):  # vLLM logs that format "hf" is taken over: this is it
        RankcutConfigParser.fallback = current
        register_config_parser("hf")(RankcutConfigParser)
        register_config_parser(QUANT_METHOD)(RankcutConfigParser)
