"""Tensor-parallel sharding of low-rank factors as vLLM lays out its linear layers (pure torch; no vLLM).

A rank-r layer computes ``y = U (V x) + b`` with ``U`` (out × r) and ``V`` (r × in). Over ``t`` ranks:

- **column-parallel** (vLLM's ``ColumnParallelLinear``, ``MergedColumnParallelLinear``, ``QKVParallelLinear``:
  q/k/v, gate/up, GPT-2's ``c_attn``/``c_fc``): each rank computes a slice of the output rows, so ``U``'s rows
  are sharded — per logical *part* (q, k, v; gate, up), as vLLM shards a fused weight — and ``V`` is
  replicated; the outputs stay sharded for the next row-parallel layer, as a dense layer's do.
- **row-parallel** (``RowParallelLinear``: o_proj, down_proj, GPT-2's ``c_proj``): each rank holds a slice of
  the input columns, so ``V``'s columns are sharded and ``U`` is replicated. ``U (V_k x_k)`` is rank k's
  partial output, and since ``U`` is linear the all-reduce that sums a dense layer's partial products sums
  these to ``U (V x)``; the bias is added once.
- **replicated** (``ReplicatedLinear``): every rank holds everything.

The rank is never sharded, so the dimensions tensor parallelism must divide are a dense layer's (out for
column-parallel parts, in for row-parallel layers); :class:`ShardingError` names the layer when one does not.
A part whose heads are fewer than the ranks (GQA keys and values with ``t`` > key/value heads) is replicated
over ``replicas`` ranks, as vLLM's ``QKVParallelLinear`` does.

Bytes read per rank (:func:`bytes_per_rank`): a column-parallel layer reads ``r (out/t + in)`` elements, a
row-parallel one ``r (out + in/t)``, against ``out·in/t`` dense. The replicated factor does not shrink with
``t``, so the per-rank break-even rank of a column-parallel layer is ``out·in / (out + t·in)``, below the
unsharded ``out·in / (out + in)``.

**Quantised factors** (``quant_lowrank``, :mod:`rankcut.quant`) are sharded as codes and scales, along the same
dimensions as the float factors, and each rank dequantises its share (:func:`quant_span`, :func:`shard_quant`,
:func:`dequantize_shard`): rows (column-parallel ``U``) carry their codes and scales with them in every format;
columns (row-parallel ``V``) split int8/fp8 codes freely (one scale per row, replicated), while int4 packs two
columns per byte and shares a scale over ``group`` columns — a rank whose columns start or end inside a group
holds the whole groups that cover them (at most one extra group at each end, never a split byte or group) and
drops the extra columns after dequantising. Dequantising a rank's share and cutting it equals cutting the
dequantised factor, to the bit: the float factors a rank ends with are exactly :func:`shard_U` / :func:`shard_V`
of the unsharded dequantised ones, for any tensor-parallel size a dense layer allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankcut.modules.quantized import CODE_DTYPES  # the codes' dtype per format (int4: two codes per byte)
from rankcut.quant import FORMATS, Quantized, check_group, dequantize

STYLES = ("column", "row", "replicated")

__all__ = ["CODE_DTYPES", "Part", "QuantSpan", "STYLES", "ShardingError", "break_even_rank", "bytes_per_rank",
           "column_spans", "dequantize_shard", "local_shapes", "quant_shapes", "quant_span", "shard_bias",
           "shard_codes", "shard_dense", "shard_factors", "shard_quant", "shard_scale", "shard_span", "shard_U",
           "shard_V"]


class ShardingError(ValueError):
    """A layer cannot be split over the requested tensor-parallel ranks (the message names the layer)."""


@dataclass(frozen=True)
class Part:
    """One logical block of a column-parallel layer's output rows (q, k or v of a fused QKV; gate or up).

    Attributes:
        size: rows in the unsharded matrix.
        replicas: ranks holding the same shard (GQA key/value heads when there are more ranks than heads).
    """

    size: int
    replicas: int = 1


def _check_tp(tp_size: int, tp_rank: int, layer: str) -> None:
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ShardingError(f"{layer}: tensor-parallel size must be an integer >= 1, got {tp_size!r}")
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise ShardingError(f"{layer}: tensor-parallel rank must be in [0, {tp_size}), got {tp_rank!r}")


def shard_span(size: int, tp_size: int, tp_rank: int, replicas: int = 1, *, layer: str = "layer",
               what: str = "dimension") -> tuple[int, int]:
    """``(start, length)`` of rank ``tp_rank``'s slice of a dimension of ``size`` split ``tp_size / replicas`` ways.

    Raises:
        ShardingError: the split does not divide ``size``, or ``replicas`` does not divide ``tp_size``.
    """
    _check_tp(tp_size, tp_rank, layer)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1 or tp_size % replicas:
        raise ShardingError(f"{layer}: {replicas!r} replicas of a shard do not divide tensor-parallel size {tp_size}")
    shards = tp_size // replicas
    if size % shards:
        extra = f" ({tp_size} ranks / {replicas} replicas)" if replicas > 1 else ""
        raise ShardingError(f"{layer}: tensor-parallel size {tp_size} does not divide its {what} ({size}): "
                            f"{size} is not a multiple of {shards}{extra}")
    length = size // shards
    return (tp_rank // replicas) * length, length


def column_spans(parts: Sequence[Part], tp_size: int, tp_rank: int, layer: str = "layer") -> list[tuple[int, int]]:
    """``(start, length)`` in the unsharded rows of every part's slice held by ``tp_rank``, in output order."""
    spans, offset = [], 0
    for index, part in enumerate(parts):
        what = "output rows" if len(parts) == 1 else f"output part {index}'s rows"
        start, length = shard_span(part.size, tp_size, tp_rank, part.replicas, layer=layer, what=what)
        spans.append((offset + start, length))
        offset += part.size
    return spans


def _parts(parts: Sequence[Part] | None, rows: int, layer: str) -> list[Part]:
    parts = [Part(rows)] if parts is None else list(parts)
    total = sum(p.size for p in parts)
    if total != rows:
        raise ShardingError(f"{layer}: its parts cover {total} output rows, but the matrix has {rows}")
    return parts


def _style(style: str, layer: str) -> None:
    if style not in STYLES:
        raise ShardingError(f"{layer}: unknown parallel style {style!r}; expected one of {', '.join(STYLES)}")


def _rows(matrix: torch.Tensor, parts: Sequence[Part] | None, tp_size: int, tp_rank: int, layer: str) -> torch.Tensor:
    spans = column_spans(_parts(parts, matrix.shape[0], layer), tp_size, tp_rank, layer)
    pieces = [matrix.narrow(0, start, length) for start, length in spans]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)


def shard_U(U: torch.Tensor, style: str, tp_size: int, tp_rank: int, parts: Sequence[Part] | None = None,
            layer: str = "layer") -> torch.Tensor:
    """Rank ``tp_rank``'s part of the output factor ``U`` (out × r): its rows for a column-parallel layer (per
    part, in output order), all of it otherwise. A view where no concatenation is needed."""
    _style(style, layer)
    _check_tp(tp_size, tp_rank, layer)
    return _rows(U, parts, tp_size, tp_rank, layer) if style == "column" else U


def shard_V(V: torch.Tensor, style: str, tp_size: int, tp_rank: int, layer: str = "layer") -> torch.Tensor:
    """Rank ``tp_rank``'s part of the input factor ``V`` (r × in): its columns for a row-parallel layer, all of
    it otherwise (a view)."""
    _style(style, layer)
    _check_tp(tp_size, tp_rank, layer)
    if style != "row":
        return V
    start, length = shard_span(V.shape[1], tp_size, tp_rank, layer=layer, what="input columns")
    return V.narrow(1, start, length)


def shard_factors(U: torch.Tensor, V: torch.Tensor, style: str, tp_size: int, tp_rank: int,
                  parts: Sequence[Part] | None = None, layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_local, V_local)`` of rank ``tp_rank`` (:func:`shard_U`, :func:`shard_V`).

    Raises:
        ShardingError: the factors do not chain, or the split does not divide a sharded dimension.
    """
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
        raise ShardingError(f"{layer}: factor shapes do not chain: U {tuple(U.shape)}, V {tuple(V.shape)}")
    return shard_U(U, style, tp_size, tp_rank, parts, layer), shard_V(V, style, tp_size, tp_rank, layer)


def shard_dense(W: torch.Tensor, style: str, tp_size: int, tp_rank: int, parts: Sequence[Part] | None = None,
                layer: str = "layer") -> torch.Tensor:
    """Rank ``tp_rank``'s part of a dense (out × in) weight, split as vLLM splits it (rows per part for
    column-parallel, columns for row-parallel)."""
    _style(style, layer)
    _check_tp(tp_size, tp_rank, layer)
    if style == "column":
        return _rows(W, parts, tp_size, tp_rank, layer)
    if style == "row":
        start, length = shard_span(W.shape[1], tp_size, tp_rank, layer=layer, what="input columns")
        return W.narrow(1, start, length)
    return W


def shard_bias(b: torch.Tensor, style: str, tp_size: int, tp_rank: int, parts: Sequence[Part] | None = None,
               layer: str = "layer") -> torch.Tensor | None:
    """Rank ``tp_rank``'s bias: its rows for column-parallel, the whole bias on rank 0 only for row-parallel
    (None elsewhere: the all-reduce would add it ``t`` times), the whole bias when replicated."""
    _style(style, layer)
    _check_tp(tp_size, tp_rank, layer)
    if style == "column":
        return _rows(b.unsqueeze(1), parts, tp_size, tp_rank, layer).squeeze(1)
    if style == "row":
        return b if tp_rank == 0 else None
    return b


def local_shapes(style: str, out_features: int, in_features: int, rank: int, tp_size: int,
                 parts: Sequence[Part] | None = None, layer: str = "layer") -> tuple[tuple[int, int], tuple[int, int]]:
    """``(U shape, V shape)`` on every rank (they are the same on all ranks)."""
    _style(style, layer)
    if style == "column":
        rows = sum(length for _, length in column_spans(_parts(parts, out_features, layer), tp_size, 0, layer))
        return (rows, rank), (rank, in_features)
    if style == "row":
        _, cols = shard_span(in_features, tp_size, 0, layer=layer, what="input columns")
        return (out_features, rank), (rank, cols)
    _check_tp(tp_size, 0, layer)
    return (out_features, rank), (rank, in_features)


def bytes_per_rank(style: str, out_features: int, in_features: int, rank: int | None, tp_size: int,
                   element_size: int = 2, parts: Sequence[Part] | None = None, layer: str = "layer") -> dict[str, int]:
    """Weight bytes one rank reads per forward pass: ``{"U", "V", "total", "dense"}`` (``dense``: the same
    layer unfactorised and sharded the same way; ``rank`` None: a dense layer, ``U = V = 0``)."""
    if style == "column":
        rows = sum(length for _, length in column_spans(_parts(parts, out_features, layer), tp_size, 0, layer))
        dense = rows * in_features
    elif style == "row":
        dense = out_features * shard_span(in_features, tp_size, 0, layer=layer, what="input columns")[1]
    else:
        _style(style, layer)
        dense = out_features * in_features
    if rank is None:
        return {"U": 0, "V": 0, "total": dense * element_size, "dense": dense * element_size}
    (ur, uc), (vr, vc) = local_shapes(style, out_features, in_features, rank, tp_size, parts, layer)
    u, v = ur * uc * element_size, vr * vc * element_size
    return {"U": u, "V": v, "total": u + v, "dense": dense * element_size}


def break_even_rank(style: str, out_features: int, in_features: int, tp_size: int = 1) -> float:
    """The rank at which one rank's factors hold as many bytes as its dense shard: ``out·in / (out + t·in)``
    column-parallel, ``out·in / (t·out + in)`` row-parallel, ``out·in / (out + in)`` replicated or ``t`` = 1."""
    _style(style, "layer")
    m, n, t = out_features, in_features, tp_size
    if style == "column":
        return m * n / (m + t * n)
    if style == "row":
        return m * n / (t * m + n)
    return m * n / (m + n)


# ------------------------------------------------------------------------------------------ quantised factors


def quant_shapes(fmt: str, rows: int, cols: int, group: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(codes shape, scale shape)`` of a quantised ``rows × cols`` matrix as :func:`rankcut.quant.quantize`
    stores it: int8/fp8 ``(rows, cols)`` codes and ``(rows,)`` scales; int4 ``(rows, cols / 2)`` bytes and
    ``(rows, ceil(cols / group))`` scales (the last group may be shorter)."""
    if fmt not in FORMATS:
        raise ShardingError(f"unknown factor format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "int4":
        return (rows, cols // 2), (rows, -(-cols // group))
    return (rows, cols), (rows,)


@dataclass(frozen=True)
class QuantSpan:
    """What one rank holds of a quantised factor (out × in orientation, like the float factors).

    Attributes:
        format, group: the factor's format and int4 group (0 otherwise).
        rows: ``(start, length)`` spans of the full factor's rows held, in order (column-parallel ``U``: one
            per part; otherwise one span of every row).
        col_start, col_count: the block of columns whose codes and scales are held (group-aligned for int4).
        keep_start, keep_count: the columns of that block this rank uses (after dequantising).
    """

    format: str
    group: int
    rows: tuple[tuple[int, int], ...]
    col_start: int
    col_count: int
    keep_start: int
    keep_count: int

    @property
    def n_rows(self) -> int:
        return sum(length for _, length in self.rows)

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(codes shape, scale shape)`` of the held share."""
        return quant_shapes(self.format, self.n_rows, self.col_count, self.group)

    def nbytes(self) -> tuple[int, int]:
        """``(code bytes, scale bytes)`` of the held share."""
        codes, scale = self.shapes()
        return torch.Size(codes).numel(), torch.Size(scale).numel() * 4  # codes are one byte each


def quant_span(which: str, fmt: str, group: int, shape: tuple[int, int], style: str, tp_size: int, tp_rank: int,
               parts: Sequence[Part] | None = None, layer: str = "layer") -> QuantSpan:
    """Rank ``tp_rank``'s share of quantised factor ``which`` (``"U"``: out × r, ``"V"``: r × in) of shape
    ``shape``: ``U``'s rows per part for a column-parallel layer, ``V``'s columns for a row-parallel one (whole
    int4 groups covering them), everything otherwise — the same split as :func:`shard_U` / :func:`shard_V`.

    Raises:
        ShardingError: the split does not divide a sharded dimension (as for a dense layer), or the format or
            int4 group does not fit the factor.
    """
    _style(style, layer)
    _check_tp(tp_size, tp_rank, layer)
    if which not in ("U", "V"):
        raise ShardingError(f"{layer}: unknown factor {which!r}; expected 'U' or 'V'")
    if fmt not in FORMATS:
        raise ShardingError(f"{layer}: unknown factor format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows, cols = shape
    if fmt == "int4":
        try:
            check_group(cols, group, ragged=True)
        except ValueError as err:
            raise ShardingError(f"{layer}: {which}: {err}") from None
    else:
        group = 0
    row_spans: tuple[tuple[int, int], ...] = ((0, rows),)
    start, length = 0, cols
    if which == "U" and style == "column":
        row_spans = tuple(column_spans(_parts(parts, rows, layer), tp_size, tp_rank, layer))
    elif which == "V" and style == "row":
        start, length = shard_span(cols, tp_size, tp_rank, layer=layer, what="input columns")
    if fmt == "int4" and (start, length) != (0, cols):
        first = start // group * group
        end = min(cols, -(-(start + length) // group) * group)
        return QuantSpan(fmt, group, row_spans, first, end - first, start - first, length)
    return QuantSpan(fmt, group, row_spans, start, length, 0, length)


def shard_codes(codes: torch.Tensor, span: QuantSpan, full_shape: tuple[int, int],
                layer: str = "layer") -> torch.Tensor:
    """The codes of the share :func:`quant_span` describes, cut from the full factor's codes (shape and dtype
    checked against :func:`quant_shapes` of ``full_shape``): its rows, and its block of columns (int4: whole
    bytes of a group-aligned block)."""
    want = quant_shapes(span.format, *full_shape, span.group)[0]
    if tuple(codes.shape) != want:
        raise ShardingError(f"{layer}: {span.format} codes of shape {list(codes.shape)} do not store a {full_shape[0]} "
                            f"x {full_shape[1]} factor (expected {list(want)})")
    if codes.dtype != CODE_DTYPES[span.format]:
        raise ShardingError(f"{layer}: {span.format} codes must be {CODE_DTYPES[span.format]}, got {codes.dtype}")
    codes = _span_rows(codes, span)
    if (span.col_start, span.col_count) == (0, full_shape[1]):
        return codes
    if span.format == "int4":
        return codes.narrow(1, span.col_start // 2, span.col_count // 2)
    return codes.narrow(1, span.col_start, span.col_count)


def shard_scale(scale: torch.Tensor, span: QuantSpan, full_shape: tuple[int, int],
                layer: str = "layer") -> torch.Tensor:
    """The scales of the share :func:`quant_span` describes, cut from the full factor's scales: its rows, and
    (int4) the groups of its block of columns; int8/fp8 scales are per row and stay whole along the columns."""
    want = quant_shapes(span.format, *full_shape, span.group)[1]
    if tuple(scale.shape) != want:
        raise ShardingError(f"{layer}: {span.format} scales of shape {list(scale.shape)} do not fit a {full_shape[0]} "
                            f"x {full_shape[1]} factor (expected {list(want)})")
    scale = _span_rows(scale, span)
    if span.format != "int4" or (span.col_start, span.col_count) == (0, full_shape[1]):
        return scale
    return scale.narrow(1, span.col_start // span.group, -(-span.col_count // span.group))


def _span_rows(t: torch.Tensor, span: QuantSpan) -> torch.Tensor:
    pieces = [t.narrow(0, start, length) for start, length in span.rows]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)


def shard_quant(codes: torch.Tensor, scale: torch.Tensor, span: QuantSpan, full_shape: tuple[int, int],
                layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of the share :func:`quant_span` describes (:func:`shard_codes`, :func:`shard_scale`)."""
    return shard_codes(codes, span, full_shape, layer), shard_scale(scale, span, full_shape, layer)


def dequantize_shard(codes: torch.Tensor, scale: torch.Tensor, span: QuantSpan,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float factor one rank uses (its rows × its columns) in ``dtype``, from its share of codes and scales
    (:func:`shard_quant`): :func:`rankcut.quant.dequantize` of the held block, cut to the kept columns."""
    q = Quantized(codes, scale.to(torch.float32), span.format, (span.n_rows, span.col_count), span.group)
    W = dequantize(q, dtype)
    return W if (span.keep_start, span.keep_count) == (0, span.col_count) else W.narrow(1, span.keep_start,
                                                                                        span.keep_count)
