"""Measurement helpers: CUDA-graph kernel timing, copy bandwidth, launch floor, NVML energy.

Kernel time follows DESIGN.md §5: the calls are captured in one CUDA graph and its replays are timed with
CUDA events, so host launch overhead is not measured. Weights are rotated among enough copies that the
footprint of one replay is several times the L2 cache (60 MB on an H200): repeated calls then stream from
HBM as in a real decode step instead of hitting the cache.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def graph_time(calls: list[Callable[[], object]], replays: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``calls`` (run in order) captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copies_for(bytes_per_copy: int, footprint: int = 512 << 20, lo: int = 8, hi: int = 256) -> int:
    """How many weight copies make one graph replay stream ``footprint`` bytes (bounded)."""
    return max(lo, min(hi, -(-footprint // max(1, bytes_per_copy))))


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (graph-replayed): the better of
    ``copy_`` and an elementwise kernel (``neg``) over bf16 buffers of ``nbytes`` traffic in all."""
    a = torch.randn(nbytes // 4, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    t = min(graph_time([lambda: b.copy_(a)], replays=10), graph_time([lambda: torch.neg(a, out=b)], replays=10))
    return nbytes / t


def launch_floor(device: torch.device | str = "cuda", grid: int = 132, n: int = 200) -> float:
    """Seconds per launch of an empty Triton kernel with ``grid`` programs, back to back in a CUDA graph."""
    from rankcut.kernels.lowrank import empty_launch

    dummy = torch.empty(1, device=device)
    return graph_time([lambda: empty_launch(grid, dummy)] * n)


class EnergyMeter:
    """Accumulates GPU energy (joules) over ``with`` blocks from NVML's total-energy counter.

    ``joules`` is None when NVML (``pynvml``, from nvidia-ml-py) or the counter is unavailable.
    """

    def __init__(self, device: torch.device) -> None:
        self.handle, self.total, self._start = None, 0.0, None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read()
        except Exception as err:  # noqa: BLE001 - any NVML failure means "no energy figure"
            log.info("NVML energy counter unavailable: %s", err)
            self.handle = None

    def _read(self) -> float:
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ -> J

    def __enter__(self) -> EnergyMeter:
        if self.handle is not None:
            torch.cuda.synchronize()
            self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None and self._start is not None:
            torch.cuda.synchronize()
            self.total += self._read() - self._start

    @property
    def joules(self) -> float | None:
        return self.total if self.handle is not None else None
