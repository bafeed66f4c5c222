"""The block pipeline: statistics -> plan -> decompose -> swap, with the phases as explicit objects.

:func:`run_blocks` drives the **statistics** phase: it runs calibration windows through the model with
forward hooks (one accumulator per distinct input, :mod:`rankcut.calibrate`) either

- layer by layer (default): each transformer block in turn moves to the work device, sees the calibration
  activations, is handed to the visitor, and moves back; memory is one block plus the activations. Where a
  block's weights come from and go to is a :class:`BlockSource` (default: the model's own;
  :mod:`rankcut.streaming` reads each block from the source's safetensors and writes it when it is done);
- over the whole model at once (``layerwise=False``), or
- not at all, for data-free methods,

and hands each block's targets with their statistics to a **visitor**. Visitors are what the statistics
are for:

- :class:`Compression` (``compress_``): per unit of the method, the **plan** (the allocation policy's bound,
  then its decision), the **decompose** phase (the method), and the **swap**. Local policies decide each
  unit as soon as it is decomposed; global ones see every unit's candidate first (compacted on the host).
- :class:`StatRecorder` (``dense_stats``): keeps the statistics, changes nothing.
- ``rankcut.analyze``'s spectra visitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut.calibrate import (
    StatsCollector,
    batches,
    block_output,
    capture_block_inputs,
    model_inputs,
    move_outside,
    with_hidden,
)
from rankcut.distributed import all_reduce_stats, current as current_world
from rankcut.methods import Item
from rankcut.modules.dense import dense_weight
from rankcut.policies import Policy
from rankcut.summary import TargetRow
from rankcut.targets import find_blocks, replace_module, target_infos
from rankcut.units import Candidate, Decision, Unit
from rankcut.utils import Timer

log = logging.getLogger(__name__)

Stats = Callable[[str], torch.Tensor]


class Visitor:
    """What the block runner calls. ``stat`` names the statistic to accumulate (None: no calibration pass)."""

    stat: str | None = None

    def visit(self, block: int | None, targets: dict[str, nn.Module], stats: Stats | None) -> None:
        """The targets of one block (``block`` None: all targets at once) with their statistics."""

    def finish(self) -> None:
        """After the last block."""


def check_finite_weights(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter of ``model`` that holds inf/NaN.

    Every parameter is checked up front, not only the targets: a NaN in a norm of a later block would
    otherwise surface mid-calibration, after earlier blocks were already swapped.
    """
    for name, param in model.named_parameters():
        if param.device.type != "meta" and param.is_floating_point() and not torch.isfinite(param).all():
            layer = name.rpartition(".")[0] or name
            raise ValueError(f"non-finite values (inf/NaN) in layer {layer} ({name})")


def split_by_block(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList, list[dict]]:
    """``(prefix, blocks, per_block)``: the targets of each transformer block, in order.

    Raises:
        ValueError: the model has no block stack, or a target lies outside it.
    """
    found = find_blocks(model)
    if found is None:
        raise ValueError("layerwise processing needs a stack of transformer blocks; use layerwise=False")
    prefix, blocks = found
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    outside = []
    for info in target_infos(model, targets):
        if info.block is None:
            outside.append(info.name)
        else:
            per_block[info.block][info.name] = targets[info.name]
    if outside:
        raise ValueError(f"targets outside the transformer blocks {outside[:3]} need layerwise=False")
    return prefix, blocks, per_block


def run_blocks(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor | None, visitor: Visitor, *,
               device: torch.device, batch_size: int = 8, layerwise: bool = True, sequential: bool = False,
               progress: bool = True, timer: Timer | None = None, blocks: BlockSource | None = None) -> None:
    """The statistics phase over ``targets`` (emptied as they are handed over, so dense layers can be freed).

    ``windows`` (N, T) token ids are the calibration data (None, or a visitor without ``stat``: no forward
    pass). With ``sequential``, each block is calibrated on the outputs of the blocks before it as the
    visitor left them (compressed), and re-run afterwards to propagate. ``blocks`` says where each block's
    weights come from and go to (default :class:`ResidentBlocks`: the model's own, moved to ``device`` and
    back; :mod:`rankcut.streaming` reads them from disk and writes the result); it needs ``layerwise``.
    """
    if blocks is not None and not layerwise:
        raise ValueError("a block source (blocks=...) needs layerwise processing")
    timer = timer or Timer()
    world = current_world()
    if world is not None:  # data parallel (rankcut.distributed): this process's windows; progress from rank 0 only
        windows = None if windows is None else world.shard(windows)
        progress = progress and world.main
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if blocks is not None:  # block by block even without a calibration pass: the weights come and go
                _layerwise(model, targets, None if visitor.stat is None else windows, visitor, device, batch_size,
                           sequential, progress, timer, blocks)
            elif windows is None or visitor.stat is None:
                visitor.visit(None, targets, None)
            elif layerwise:
                _layerwise(model, targets, windows, visitor, device, batch_size, sequential, progress, timer,
                           blocks or ResidentBlocks())
            else:
                _whole_model(model, targets, windows, visitor, device, batch_size, progress, timer)
            visitor.finish()
    finally:
        model.train(was_training)


def _whole_model(model, targets, windows, visitor, device, batch_size, progress, timer) -> None:
    """All targets hooked at once over whole-model forward passes (memory: the whole model on ``device``)."""
    first = next(model.parameters()).device
    model.to(device)
    try:
        with timer("statistics"), StatsCollector(targets, visitor.stat) as stats:
            for ids in tqdm(list(batches(windows, batch_size)), desc="calibrate", disable=not progress):
                model(**model_inputs(model, ids.to(device)))
            all_reduce_stats(stats)  # summed over the processes of a data-parallel world (no-op otherwise)
        visitor.visit(None, targets, stats.stat)
    finally:
        model.to(first)


class BlockSource:
    """Where the layerwise runner's blocks live: what it calls around each block. The default
    (:class:`ResidentBlocks`) keeps the weights in the model and moves each block to the device and back; a
    streaming source (:mod:`rankcut.streaming`) reads each block from disk, writes it when the visitor is done,
    and frees it.

    Attributes:
        start: the first block to calibrate; blocks before it were processed by an earlier, interrupted run:
            the runner hands them to :meth:`skip` instead (to bring the activations up to ``start``).
    """

    start: int = 0

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Before block ``index`` is calibrated: its weights on ``device``."""

    def unload(self, index: int, block: nn.Module, calls: list) -> None:
        """After the visitor has had block ``index`` (and, with sequential calibration, after its outputs were
        propagated): ``calls`` are the next block's inputs."""

    def skip(self, index: int, block: nn.Module, calls: list, device: torch.device) -> list:
        """Block ``index`` < :attr:`start`: return the next block's inputs (``calls`` may be updated in place)."""
        raise NotImplementedError(f"{type(self).__name__} cannot skip blocks")


class ResidentBlocks(BlockSource):
    """The blocks are the model's own: each moves to the work device for its turn and back where it was."""

    def load(self, index, block, device) -> None:
        self.home = next(block.parameters()).device
        block.to(device)

    def unload(self, index, block, calls) -> None:
        block.to(self.home)


def propagate(block: nn.Module, calls: list) -> None:
    """Replace each call's hidden-state input (in place) by ``block``'s output for it: the next block's inputs."""
    for i, (args, kwargs) in enumerate(calls):
        calls[i] = with_hidden(args, kwargs, block_output(block(*args, **kwargs)))


def _layerwise(model, targets, windows, visitor, device, batch_size, sequential, progress, timer,
               source: BlockSource) -> None:
    """One block at a time on ``device``; its inputs are the previous block's outputs (dense or compressed).
    ``windows`` None (a data-free method with a block source): no forward pass, the visitor gets no statistics."""
    prefix, blocks, per_block = split_by_block(model, targets)
    home = model.get_input_embeddings().weight.device
    move_outside(model, prefix, device)
    try:
        calls = None
        if windows is not None:
            with timer("capture"):
                calls = capture_block_inputs(model, blocks[0], windows, batch_size, device)
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            if index < source.start:
                calls = source.skip(index, block, calls, device)
                per_block[index] = {}
                continue
            source.load(index, block, device)
            chosen = per_block[index]
            if calls is None:
                visitor.visit(index, chosen, None)
            else:
                rerun = sequential and bool(chosen)
                with timer("statistics"), StatsCollector(chosen, visitor.stat) as stats:
                    for i, (args, kwargs) in enumerate(calls):
                        out = block_output(block(*args, **kwargs))
                        if not rerun:  # the dense output is the next block's input: replace in place, so
                            calls[i] = with_hidden(args, kwargs, out)  # inputs and outputs never coexist
                    del out
                    all_reduce_stats(stats)  # summed over the processes of a data-parallel world (no-op otherwise)
                visitor.visit(index, chosen, stats.stat)
                del stats
                if rerun:
                    with timer("propagation"):
                        propagate(block, calls)
            source.unload(index, block, calls)
            # Drop the runner's references to the block's dense layers so that, once the visitor has swapped
            # them out, their memory (on the device, where the block was processed) is freed now.
            for name in chosen:
                targets.pop(name, None)
            per_block[index] = chosen = {}
    finally:
        move_outside(model, prefix, home)


# ------------------------------------------------------------------------------------------ visitors


class StatRecorder(Visitor):
    """Keeps each target's statistic (on the CPU); swaps nothing."""

    def __init__(self, kind: str) -> None:
        self.stat = kind
        self.stats: dict[str, torch.Tensor] = {}

    def visit(self, block, targets, stats) -> None:
        for name in targets:
            self.stats[name] = stats(name).detach().cpu()


class GivenStats(Visitor):
    """Adapts a visitor to statistics computed earlier (``{name: tensor}``): one visit, no forward pass."""

    def __init__(self, inner: Visitor, stats: dict[str, torch.Tensor] | None) -> None:
        self.inner, self.given = inner, stats or {}

    def run(self, targets: dict[str, nn.Module]) -> None:
        self.inner.visit(None, targets, (lambda name: self.given[name]) if self.inner.stat else None)
        self.inner.finish()


class Compression(Visitor):
    """Plan, decompose and swap each unit of the method as its targets' statistics arrive.

    Args:
        model: the model being compressed (swapped in place).
        config: the :class:`~rankcut.config.CompressConfig`.
        policy: the allocation policy (overrides included).
        targets: every target, in order (the units are formed from them up front).
        device: where decompositions run.
    """

    def __init__(self, model: nn.Module, config, policy: Policy, targets: dict[str, nn.Module], device: torch.device,
                 timer: Timer, progress: bool = True) -> None:
        self.model, self.config, self.policy, self.device, self.timer = model, config, policy, device, timer
        self.spec = config.method_spec
        self.stat = self.spec.stat
        self.progress = progress
        self.infos = {info.name: info for info in target_infos(model, targets)}
        self.units: list[Unit] = self.spec.units(list(self.infos.values()), config.options)
        self.unit_of = {name: unit for unit in self.units for name in unit.names}
        missing = set(self.infos) - set(self.unit_of)
        if missing:
            raise ValueError(f"method {self.spec.name!r} left target(s) {sorted(missing)[:3]} out of its units")
        policy.check_targets(list(self.infos))
        self.pending: dict[Unit, dict[str, tuple[nn.Module, torch.Tensor | None]]] = {}
        self.held: dict[Unit, tuple[Candidate, dict[str, nn.Module]]] = {}
        self.fixed: dict[Unit, Decision] = {}
        self.rows: dict[str, TargetRow] = {}
        self.decisions: dict[Unit, Decision] = {}

    def visit(self, block, targets, stats) -> None:
        names = list(targets)
        bar = tqdm(names, desc="decompose", disable=not self.progress or block is not None)
        for name in bar:
            unit = self.unit_of[name]
            stat = None if stats is None or self.stat is None else stats(name)
            members = self.pending.setdefault(unit, {})
            if len(unit.names) > 1 and stat is not None:
                stat = stat.detach().cpu()  # waits for the rest of its group, off the device
            members[name] = (targets[name], stat)
            if len(members) == len(unit.names):
                self._decompose(unit, self.pending.pop(unit))

    def _decompose(self, unit: Unit, members: dict) -> None:
        with self.timer("decomposition"):
            bound = self.policy.bound(unit)
            if isinstance(bound, Decision):
                self.fixed[unit] = bound
                self._apply(unit, None, bound, members)
                return
            items = [Item(self.infos[name], dense_weight(module).detach().to(self.device),
                          None if stat is None else stat.to(self.device)) for name, (module, stat) in members.items()]
            try:
                candidate = self.spec.decompose(items, self.config.options, bound, self.config.seed)
                del items
                if self.policy.is_global:
                    dtype = dense_weight(next(iter(members.values()))[0]).dtype
                    self.held[unit] = (candidate.compact(dtype), {n: m for n, (m, _) in members.items()})
                    return
                decision = self.policy.choose(unit, candidate)
                self._apply(unit, candidate, decision, members)
            except ValueError as err:
                raise ValueError(f"{unit.name}: {err}") from err

    def _apply(self, unit: Unit, candidate: Candidate | None, decision: Decision, members: dict) -> None:
        self.decisions[unit] = decision
        if decision.dense:
            for name, (module, _) in members.items():
                m, n = dense_weight(module).shape
                log.log(logging.INFO if decision.chosen else logging.WARNING, "%s stays dense: %s", name, decision.reason)
                self.rows[name] = TargetRow(name, (m, n), None, m * n, m * n, None, decision.reason)
            return
        dense = {name: module for name, (module, _) in members.items()}
        built = candidate.build(decision.rank, dense)
        params = candidate.target_params(decision.rank)
        energy = candidate.energy(decision.rank)
        for name, module in built.items():
            m, n = dense_weight(dense[name]).shape
            replace_module(self.model, name, module)
            self.rows[name] = TargetRow(name, (m, n), decision.rank, m * n, params[name], energy)

    def finish(self) -> None:
        if self.pending:
            left = [name for members in self.pending.values() for name in members]
            raise RuntimeError(f"groups never completed (targets {left[:3]} waited for the rest of their unit)")
        if not self.held:
            return
        with self.timer("plan"):
            candidates = {unit: cand for unit, (cand, _) in self.held.items()}
            plan = self.policy.plan(candidates, dict(self.fixed))
        with self.timer("decomposition"):
            for unit, (candidate, dense) in list(self.held.items()):
                members = {name: (module, None) for name, module in dense.items()}
                try:
                    self._apply(unit, candidate, plan[unit], members)
                except ValueError as err:
                    raise ValueError(f"{unit.name}: {err}") from err
                del self.held[unit]
