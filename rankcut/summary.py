"""What a compression did, per target and overall: returned as data and printable as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TargetRow:
    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int | None  # None: kept dense
    params_before: int
    params_after: int
    energy: float | None = None
    note: str = ""


@dataclass
class CompressionSummary:
    method: str
    rows: list[TargetRow]
    model_params_before: int
    model_params_after: int
    times: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None
    calib_tokens: int = 0

    @property
    def target_params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def target_params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def keep_targets(self) -> float:
        return self.target_params_after / max(1, self.target_params_before)

    @property
    def keep_model(self) -> float:
        return self.model_params_after / max(1, self.model_params_before)

    @property
    def dense_targets(self) -> list[str]:
        return [r.name for r in self.rows if r.rank is None]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            keep_targets=self.keep_targets,
            keep_model=self.keep_model,
            target_params_before=self.target_params_before,
            target_params_after=self.target_params_after,
        )
        return out

    def table(self) -> str:
        lines = [f"{'target':<44} {'shape':>12} {'rank':>6} {'params':>10} {'after':>10} {'energy':>7}  note"]
        for r in self.rows:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            rank = "dense" if r.rank is None else str(r.rank)
            energy = "" if r.energy is None else f"{r.energy:.4f}"
            lines.append(
                f"{r.name:<44} {shape:>12} {rank:>6} {r.params_before:>10,} {r.params_after:>10,} {energy:>7}  {r.note}"
            )
        lines.append(
            f"method {self.method}: targets {self.target_params_before:,} -> {self.target_params_after:,} params "
            f"(keep {self.keep_targets:.4f}); whole model {self.model_params_before:,} -> {self.model_params_after:,} "
            f"(keep {self.keep_model:.4f}); {len(self.dense_targets)} of {len(self.rows)} targets left dense"
        )
        if self.times:
            lines.append("wall time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.times.items()))
        if self.peak_gpu_bytes is not None:
            lines.append(f"peak GPU memory: {self.peak_gpu_bytes / 2**30:.2f} GiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
