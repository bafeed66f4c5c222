"""Find the transformer blocks and the target layers of any Hugging Face model, and swap modules."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rankcut.config import pattern_matches
from rankcut.modules import is_dense_linear, is_rankcut_module, rankcut_modules
from rankcut.modules.dense import dense_shape
from rankcut.units import TargetInfo


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer's stack of blocks: the largest ``nn.ModuleList`` of identically-typed modules that
    contain linear layers (``model.layers``, ``transformer.h``, ``decoder.layers``, ``encoder.layer``…).

    Returns:
        ``(name, module_list)``, or None when the model has no such stack.
    """
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(is_dense_linear(m) or is_rankcut_module(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    return None if best is None else (best[0], best[1])


def _tied_modules(model: nn.Module) -> set[str]:
    """Names of linear layers whose weight is shared with another parameter (e.g. a tied LM head)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def find_targets(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Module]:
    """Dense linear layers (``nn.Linear`` or GPT-2 ``Conv1D``) to decompose, by module name.

    Default: every one inside the transformer blocks (so embeddings, LM head, poolers and classifier heads
    are left alone). ``include`` patterns (exact names or ``re:REGEX``) select among all linear layers of the
    model instead; ``exclude`` patterns remove names.

    Raises:
        ValueError: no targets were found, or an included layer shares its weight with another module.
    """
    factors = tuple(f"{n}." for n in rankcut_modules(model))
    linears = {  # the factors inside a rankcut module are not targets (no re-factorising factors)
        name: mod for name, mod in model.named_modules() if is_dense_linear(mod) and not name.startswith(factors)
    }
    if include:
        chosen = {n: m for n, m in linears.items() if any(pattern_matches(p, n) for p in include)}
    else:
        blocks = find_blocks(model)
        if blocks is None:
            chosen = {}
        else:
            prefix = blocks[0] + "."
            chosen = {n: m for n, m in linears.items() if n.startswith(prefix)}
    if exclude:
        chosen = {n: m for n, m in chosen.items() if not any(pattern_matches(p, n) for p in exclude)}
    if not chosen:
        hint = f"include={include}, exclude={exclude}" if include or exclude else "no transformer blocks found"
        raise ValueError(
            f"no target layers found in {type(model).__name__} ({hint}); "
            f"{len(linears)} linear layer(s) exist, e.g. {sorted(linears)[:3]}"
        )
    tied = _tied_modules(model) & set(chosen)
    if tied:
        raise ValueError(f"target(s) {sorted(tied)} share their weight with another module (tied); exclude them")
    return chosen


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; return the module it replaces. The one swap of rankcut."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def swap_modules(
    model: nn.Module, build: Callable[[str, nn.Module], nn.Module | None], filter_fn: Callable[[nn.Module, str], bool]
) -> list[str]:
    """Replace each module for which ``filter_fn(module, name)`` holds by ``build(name, module)``.

    ``build`` may return None to leave a module in place. Returns the names replaced.
    """
    chosen = [(n, m) for n, m in model.named_modules() if n and filter_fn(m, n)]
    swapped = []
    for name, module in chosen:
        new = build(name, module)
        if new is None:
            continue
        replace_module(model, name, new)
        swapped.append(name)
    return swapped


def target_infos(model: nn.Module, targets: dict[str, nn.Module]) -> list[TargetInfo]:
    """:class:`TargetInfo` of each target, in order: shape, block index and tensor type (``mlp.up_proj``)."""
    found = find_blocks(model)
    prefix = found[0] + "." if found else None
    head_dim = _head_dim(model)
    infos = []
    for name, module in targets.items():
        block, kind = None, name
        if prefix and name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                block, kind = int(index), rest
        attention = any(part in ("attn", "attention", "self_attn") or part.endswith(("attn", "attention"))
                        for part in kind.split(".")[:-1])
        infos.append(TargetInfo(name, dense_shape(module), block, kind, head_dim if attention else None))
    return infos


def _head_dim(model: nn.Module) -> int | None:
    """The attention head size from the model's config (``head_dim``, else hidden size / heads), or None."""
    config = getattr(model, "config", None)
    size = getattr(config, "head_dim", None)
    if isinstance(size, int) and size > 0:
        return size
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None
