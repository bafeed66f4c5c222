"""Flag builders shared by the subcommands, and the small parsers of flag values.

A flag that sets a field of a config dataclass takes its name, type and default from the field
(:func:`add_fields`); the method-option flags come from the config dataclasses of the registered methods, with
their ``metadata["help"]`` (:func:`add_method_options`). Values are validated by the dataclasses, not here.
Only the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from rankcut.cli import CLIError


def helptext(text: str, default=None, default_text: str | None = None) -> str:
    """``text`` with its default appended (none for flags that default to off/empty), escaped for argparse."""
    off = default is None or default is False or (isinstance(default, (list, tuple)) and not default)
    if default_text is None and not off:
        default_text = f"{default:g}" if isinstance(default, float) else str(default)
    full = text if default_text is None else f"{text} (default: {default_text})"
    return full.replace("%", "%%")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kind(cls: type, f: dataclasses.Field) -> type:
    """The field's type with ``X | None`` reduced to X."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint if isinstance(hint, type) else str


def add_fields(p, cls: type, helps: dict[str, str], names=None, flags: dict | None = None,
               defaults: dict | None = None, default_texts: dict | None = None) -> None:
    """One flag per field of ``cls`` (all, or those in ``names``): ``--field-name`` (or ``flags[name]``), its
    type and default (or ``defaults[name]``), dest the field name, help from ``helps`` or the field's metadata."""
    flags, defaults, default_texts = flags or {}, defaults or {}, default_texts or {}
    for f in dataclasses.fields(cls):
        if f.name == "version" or (names is not None and f.name not in names):
            continue
        kind = _kind(cls, f)
        default = defaults.get(f.name, _default(f))
        text = helps.get(f.name) or f.metadata.get("help") or f"{cls.__name__}.{f.name}"
        flag = flags.get(f.name, flag_name(f.name))
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            p.add_argument(flag, dest=f.name, action=action, default=bool(default), help=helptext(text))
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=default,
                           help=helptext(text, default, default_texts.get(f.name)))


def field_values(args: argparse.Namespace, cls: type) -> dict:
    """``{field: args.field}`` for the fields of ``cls`` that ``add_fields`` made flags for."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


# ------------------------------------------------------------------------------------ method options


def _method_fields() -> dict[str, list[tuple[str, dataclasses.Field, type]]]:
    """Option name -> ``[(method, field, config class)]`` over the registered methods."""
    from rankcut.methods import available_methods, get_method

    out: dict[str, list] = {}
    for method in available_methods():
        cls = get_method(method).config_cls
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append((method, f, cls))
    return out


def takers(name: str) -> list[str]:
    """The methods that have option ``name``."""
    return [m for m, _, _ in _method_fields().get(name, [])]


def add_method_options(p) -> None:
    """``--solver``, ``--alpha``, … : every field of every registered method's config dataclass, default None
    (so only what the user gave is passed on); the help names the methods and their defaults."""
    from rankcut.methods import available_methods

    group = p.add_argument_group("method options (each applies to the methods that have it)")
    every = available_methods()
    for name, entries in _method_fields().items():
        method, f, cls = entries[0]
        by_default: dict[str, list[str]] = {}
        for m, g, _ in entries:
            value = _default(g)
            by_default.setdefault(f"{value:g}" if isinstance(value, float) else str(value), []).append(m)
        where = "every method" if len(entries) == len(every) else ", ".join(m for m, _, _ in entries)
        if len(by_default) == 1:
            default_text = next(iter(by_default))
        else:
            default_text = "; ".join(f"{d} for {', '.join(ms)}" for d, ms in by_default.items())
        text = f"{f.metadata.get('help') or name}; an option of {where}"
        group.add_argument(flag_name(name), dest=name, type=_kind(cls, f), default=None,
                           help=helptext(text, default_text=default_text))


def given_options(args: argparse.Namespace) -> dict:
    """The method options the user gave (any method's)."""
    return {name: getattr(args, name) for name in _method_fields() if getattr(args, name, None) is not None}


def method_options(args: argparse.Namespace, method: str) -> dict:
    """The given method options, for ``method``; one it does not have is an error naming the methods that do.

    Raises:
        ValueError: an unknown method (from the registry); CLIError: an option of other methods.
    """
    from rankcut.methods import get_method

    have = get_method(method).option_names()
    options = given_options(args)
    for name in options:
        if name not in have:
            raise CLIError(f"{flag_name(name)} is an option of {', '.join(takers(name))}, not of {method}")
    return options


# --------------------------------------------------------------------------------- shared flag groups


def add_model(p, text: str = "Hugging Face Hub id or local model directory") -> None:
    p.add_argument("model", help=text)


def add_output(p, text: str, overwrite: str) -> None:
    p.add_argument("-o", "--output", required=True, help=text)
    p.add_argument("--overwrite", action="store_true", help=overwrite)


def add_device(p, text: str = "where the work runs: auto (CUDA when available), cpu, cuda, cuda:N",
               default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=helptext(text, default))


def add_dtype(p, text: str = "model dtype while working (auto: float32 on a CPU, the stored dtype on a GPU)",
              default: str = "auto", choices=None) -> None:
    from rankcut.utils import DTYPES

    choices = list(choices or ["auto", *DTYPES])
    p.add_argument("--dtype", default=default, choices=choices, help=helptext(text, default))


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (also transformers' loading bar) and no decode-speed prediction warning")


def add_targets(p) -> None:
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="select targets by name (exact or re:REGEX; repeatable; default: every linear layer in the blocks)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="remove targets by name (exact or re:REGEX; repeatable)")


def add_overrides(p) -> None:
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=RULE",
                   help="per-target rule, first match wins (repeatable), e.g. 're:down_proj=keep:0.9', "
                        "'model.layers.0.mlp.up_proj=dense'; RULE is keep:X, energy:X, rank:N or dense")


CALIBRATION_HELP = {
    "calib_samples": "calibration windows",
    "seq_len": "calibration window length in tokens",
    "seed": "seed of the random calibration windows (and of randomized solvers)",
    "sampling": "random: distinct windows drawn with --seed; first: the first windows in order",
    "batch_size": "calibration windows per forward pass",
}


def add_calibration(p, calib: str) -> None:
    """``--calib`` and the calibration-window flags, from the fields of CompressConfig."""
    from rankcut.config import CompressConfig

    p.add_argument("--calib", metavar="TEXT", help=calib)
    add_fields(p, CompressConfig, CALIBRATION_HELP, names=CALIBRATION_HELP,
               default_texts={"seq_len": "min(2048, the model's maximum)"})


def add_full_model(p) -> None:
    p.add_argument("--full-model", action="store_true",
                   help="hook the whole model at once instead of processing it block by block")


def compress_config(args: argparse.Namespace, **fixed):
    """A CompressConfig from the flags shared by ``compress`` and ``sweep`` (plus ``fixed``); validated by it."""
    from rankcut.config import CompressConfig

    return CompressConfig(overrides=dict(parse_override(o) for o in getattr(args, "override", [])),
                          include=args.include, exclude=args.exclude, layerwise=not getattr(args, "full_model", False),
                          **{k: getattr(args, k) for k in CALIBRATION_HELP}, **fixed)


def check_sources(**given) -> None:
    """Every text source given on the command line exists (a file) or is a known dataset name, before any model
    is loaded: ``check_sources(calib=args.calib, ppl=args.ppl)`` checks ``--calib`` and each ``--ppl``
    (:func:`rankcut.data.check_source`, the one check, names the flag)."""
    from rankcut.data import check_source

    for name, value in given.items():
        for source in value if isinstance(value, (list, tuple)) else [value]:
            check_source(source, flag_name(name))


# ------------------------------------------------------------------------------------- value parsers


def parse_override(text: str) -> tuple[str, dict]:
    """``PATTERN=keep:0.9`` / ``PATTERN=rank:64`` / ``PATTERN=energy:0.95`` / ``PATTERN=dense``."""
    pattern, sep, rule = text.rpartition("=")
    if not sep or not pattern:
        raise CLIError(f"--override {text!r}: expected PATTERN=keep:X, PATTERN=energy:X, PATTERN=rank:N or PATTERN=dense")
    if rule == "dense":
        return pattern, {"dense": True}
    key, _, value = rule.partition(":")
    if key not in ("keep", "energy", "rank"):
        raise CLIError(f"--override {text!r}: rule must be keep:, energy:, rank: or dense")
    try:
        number = int(value) if key == "rank" else float(value)
    except ValueError:
        raise CLIError(f"--override {text!r}: {value!r} is not {'an integer' if key == 'rank' else 'a number'}") from None
    return pattern, {key: number}


def parse_list(flag: str, text: str, kind=str) -> list:
    """A comma-separated flag value as a list (numbers with ``kind=float``)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected a comma-separated list of numbers") from None


def compute_dtype(name: str, device):
    """The dtype to load a model in: ``auto`` is float32 on a CPU and the stored dtype (None) elsewhere."""
    import torch

    from rankcut.utils import parse_dtype

    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else None
    return parse_dtype(name)
