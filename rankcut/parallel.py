"""The data-parallel :class:`~rankcut.pipeline.Compression` visitor: units decomposed round-robin over the
processes of a :mod:`rankcut.distributed` world, and the factors broadcast to all.

Every process sees every block's targets with the same (all-reduced) statistics. The units are numbered in the
order they complete (all processes agree on it), and unit ``i`` is decomposed by process ``i mod N`` alone; after
each visit (one block), each unit's result — its decision, its summary rows and the modules that replace its
targets — is broadcast from the process that made it, so every process swaps the same modules and ends with
the same model. A method's error in one process becomes the same ValueError in all of them.

Global policies (``spectrum``, ``sensitivity``): the process that decomposes a unit keeps its compact candidate
and broadcasts the candidate without its factors (the spectrum, the total energy and the unit: what the plan
reads; the factor tensors arrive on the meta device); rank 0 plans from all of them and broadcasts the decisions;
each process then builds its own units at the planned rank and broadcasts the modules. The host of each process
holds its share of the factors, not all of them.
"""

from __future__ import annotations

import logging

from torch import nn

from rankcut.distributed import World, current
from rankcut.pipeline import Compression
from rankcut.targets import replace_module
from rankcut.units import Unit

log = logging.getLogger("rankcut.pipeline")


def compression_visitor(model: nn.Module, config, policy, targets: dict[str, nn.Module], device, timer,
                        progress: bool = True) -> Compression:
    """The :class:`~rankcut.pipeline.Compression` visitor for this process: data-parallel inside a world of
    several processes (:func:`rankcut.distributed.current`), the plain one otherwise."""
    world = current()
    if world is None:
        return Compression(model, config, policy, targets, device, timer, progress)
    return DataParallelCompression(model, config, policy, targets, device, timer, progress, world=world)


class DataParallelCompression(Compression):
    """:class:`~rankcut.pipeline.Compression` with each unit decomposed by one process of ``world`` and its
    modules broadcast to the others (progress bars only in rank 0)."""

    def __init__(self, *args, world: World, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.world = world
        self.progress = self.progress and world.main
        self.turn = 0  # units completed so far: the round-robin counter
        self.completed: list[tuple[Unit, int]] = []  # (unit, owner) completed during the current visit
        self.failed: dict[Unit, ValueError] = {}
        self.order: list[Unit] = []  # global policies: the units waiting for the plan, in completion order
        self.owner_of: dict[Unit, int] = {}
        self.light: dict[Unit, object] = {}  # global policies: other processes' candidates without factors

    def visit(self, block, targets, stats) -> None:
        super().visit(block, targets, stats)
        completed, self.completed = self.completed, []
        with self.timer("broadcast"):
            for unit, owner in completed:
                self._share(unit, owner)

    def _decompose(self, unit: Unit, members: dict) -> None:
        owner = self.world.owner(self.turn)
        self.turn += 1
        self.completed.append((unit, owner))
        if owner != self.world.rank:
            return
        try:
            super()._decompose(unit, members)
        except ValueError as err:  # every process raises it, after the broadcast that tells them
            self.failed[unit] = err

    def _payload(self, unit: Unit) -> dict:
        """What the owner of ``unit`` tells the others once it has decided (or held) it."""
        if unit in self.failed:
            return {"error": str(self.failed[unit])}
        rows = {name: self.rows[name] for name in unit.names if name in self.rows}
        modules = {name: self.model.get_submodule(name) for name, row in rows.items() if row.rank is not None}
        return {"decision": self.decisions.get(unit), "fixed": unit in self.fixed, "rows": rows, "modules": modules,
                "held": unit in self.held}

    def _share(self, unit: Unit, owner: int) -> None:
        mine = owner == self.world.rank
        payload = self.world.share(self._payload(unit) if mine else None, owner, self.device)
        if "error" in payload:
            if mine:
                raise self.failed[unit]
            raise ValueError(payload["error"])
        if not mine:
            for name, module in payload["modules"].items():
                replace_module(self.model, name, module)
            self.rows.update(payload["rows"])
            for name, row in payload["rows"].items():  # the owner logged it; rank 0 is the process that logs
                if row.rank is None and self.world.main and payload["decision"] is not None:
                    chosen = payload["decision"].chosen
                    log.log(logging.INFO if chosen else logging.WARNING, "%s stays dense: %s", name, row.note)
            if payload["decision"] is not None:
                self.decisions[unit] = payload["decision"]
                if payload["fixed"]:
                    self.fixed[unit] = payload["decision"]
        if payload["held"]:
            self.order.append(unit)
            self.owner_of[unit] = owner
            candidate = self.held[unit][0] if mine else None
            light = self.world.share(candidate, owner, data=lambda t: t is candidate.spectrum)
            if not mine:
                self.light[unit] = light

    def finish(self) -> None:
        if self.pending:
            left = [name for members in self.pending.values() for name in members]
            raise RuntimeError(f"groups never completed (targets {left[:3]} waited for the rest of their unit)")
        if not self.order:
            return
        with self.timer("plan"):
            decisions = None
            if self.world.main:
                candidates = {unit: self.held[unit][0] if unit in self.held else self.light[unit]
                              for unit in self.order}
                try:
                    plan = self.policy.plan(candidates, dict(self.fixed))
                    decisions = [plan[unit] for unit in self.order]
                except ValueError as err:
                    decisions = str(err)
            decisions = self.world.share_value(decisions, 0)
            if isinstance(decisions, str):
                raise ValueError(decisions)
        self.light.clear()
        with self.timer("decomposition"):
            for unit, decision in zip(self.order, decisions):
                if unit in self.held:
                    candidate, dense = self.held.pop(unit)
                    try:
                        self._apply(unit, candidate, decision, {name: (module, None) for name, module in dense.items()})
                    except ValueError as err:
                        self.failed[unit] = ValueError(f"{unit.name}: {err}")
        with self.timer("broadcast"):
            for unit, decision in zip(self.order, decisions):
                self._share(unit, self.owner_of[unit])
                self.decisions[unit] = decision
        self.order.clear()
