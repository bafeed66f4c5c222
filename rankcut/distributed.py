"""Data parallelism of the statistics phase over ``torch.distributed``: the process group and its collectives.

N processes (one per GPU with NCCL, or gloo processes on the CPU) each hold the whole model on the host and run
the block pipeline (:func:`rankcut.pipeline.run_blocks`) on their own contiguous 1/N of the calibration windows:

- :meth:`World.shard` gives each process its windows (contiguous, so that each process's batches are the
  one-process batches and the summed statistics differ from the one-process sums only in summation order);
  each process propagates only its own windows through each block, so memory per GPU is one block plus its share
  of the activations;
- :func:`all_reduce_stats` sums each block's statistics over the processes, in float64: the accumulated sum and
  the count of rows, for ``gram`` (Σ xᵀx) and ``absmean`` (Σ |x| then / count: exact under any split);
- :meth:`World.share` broadcasts an object from one process, its tensors as tensors (the decomposed modules of a
  unit, from the process that decomposed it: :mod:`rankcut.parallel`);
- :func:`init_from_env` joins the world that ``torchrun`` (or :func:`launch`, ``rankcut compress --gpus N``)
  describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; the backend follows the
  device (NCCL on CUDA, gloo on the CPU).

NVLink multicast (NVLS) stays off in every process rankcut starts, and by default in the processes it joins
(:data:`NO_MULTICAST`). Every process of the world must make the same rankcut calls in the same order (they meet
in the collectives); :func:`current` is None outside a process group of more than one process, and then nothing
here does anything.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

#: NVLink multicast off: set in every process :func:`launch` starts, and (unless already set) by
#: :func:`init_from_env` before the process group is made.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

#: How long a process waits in a collective for the others (a slow decomposition, rank 0 saving the checkpoint).
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """The process group rankcut works in: this process's ``rank`` of ``size``, the ``backend`` (``nccl`` or
    ``gloo``) and the device its collectives run on (the current CUDA device for NCCL, else the CPU)."""

    rank: int
    size: int
    backend: str

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that shows progress, logs and writes."""
        return self.rank == 0

    def owner(self, turn: int) -> int:
        """The process that decomposes the ``turn``-th unit (round-robin)."""
        return turn % self.size

    # ---------------------------------------------------------------------------------------- windows

    def bounds(self, n: int) -> tuple[int, int]:
        """This process's slice ``[start, stop)`` of ``n`` windows: contiguous, sizes differing by at most one."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the (N, T) calibration ``windows``, after checking that every
        process was given the same windows.

        Raises:
            ValueError: fewer windows than processes, or the processes' windows differ.
        """
        n = windows.shape[0]
        ids = windows.reshape(n, -1).to("cpu", torch.int64)
        weights = torch.arange(1, ids.shape[1] + 1, dtype=torch.int64)
        digest = (tuple(windows.shape), int(ids.sum()), int((ids * weights).sum() % (2**61 - 1)))
        digests = [None] * self.size
        dist.all_gather_object(digests, digest)
        if any(d != digests[0] for d in digests):
            raise ValueError("the processes were given different calibration windows (the same data, seed and "
                             f"settings are needed in every process): {digests}")
        if n < self.size:
            raise ValueError(f"{n} calibration window(s) for {self.size} processes: each process needs at least one "
                             "(more calibration samples, or fewer processes)")
        start, stop = self.bounds(n)
        return windows[start:stop]

    # ------------------------------------------------------------------------------------- broadcasts

    def share(self, obj=None, src: int = 0, device: torch.device | None = None,
              data: Callable[[torch.Tensor], bool] | None = None):
        """``obj`` of process ``src``, in every process: the object pickled, each distinct tensor in it broadcast
        as a tensor (identity kept: a parameter tied between modules stays tied). ``data(tensor)`` False: that
        tensor travels as its shape and dtype only and arrives on the meta device. Received tensors land on
        ``device`` (default: the CPU) where the sender's were on an accelerator, on the CPU where its were."""
        if self.rank == src:
            tensors, index = [], {}
            buffer = io.BytesIO()
            pickler = _TensorPickler(buffer, tensors, index, data)
            pickler.dump(obj)
            header = (buffer.getvalue(), [_spec(t, real) for t, real in tensors])
        else:
            header = None
        box = [header]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        payload, specs = box[0]
        sender = self.rank == src
        received = []
        for i, (shape, dtype, on_accelerator, is_param, grad, real) in enumerate(specs):
            if not real:
                received.append(None if sender else torch.empty(shape, dtype=dtype, device="meta"))
                continue
            value = self._broadcast_tensor(tensors[i][0] if sender else None, shape, dtype, src)
            if not sender:
                value = value.to((device or torch.device("cpu")) if on_accelerator else torch.device("cpu"))
                received.append(nn.Parameter(value, requires_grad=grad) if is_param else value)
        if sender:
            return obj  # the sender keeps its own objects (views, ties and all)
        return _TensorUnpickler(io.BytesIO(payload), received).load()

    def _broadcast_tensor(self, tensor: torch.Tensor | None, shape, dtype, src: int) -> torch.Tensor:
        """One tensor's bytes from ``src`` (any dtype: it travels as uint8)."""
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if tensor is not None:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device)
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:
            dist.broadcast(flat, src=src)
        return flat.view(dtype).reshape(shape)

    def share_value(self, value=None, src: int = 0):
        """A small picklable value (no tensors) of process ``src``, in every process."""
        box = [value]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _spec(tensor: torch.Tensor, real: bool) -> tuple:
    return (tuple(tensor.shape), tensor.dtype, tensor.device.type not in ("cpu", "meta"),
            isinstance(tensor, nn.Parameter), tensor.requires_grad, real and tensor.device.type != "meta")


class _TensorPickler(pickle.Pickler):
    """Pickles everything but tensors, which it lists (each distinct tensor once) for :meth:`World.share`."""

    def __init__(self, file, tensors: list, index: dict, data) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors, self.index, self.data = tensors, index, data

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        key = id(obj)
        if key not in self.index:
            self.index[key] = len(self.tensors)
            self.tensors.append((obj, self.data is None or bool(self.data(obj))))
        return ("tensor", self.index[key])


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        kind, i = pid
        if kind != "tensor":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self.tensors[i]


# ---------------------------------------------------------------------------------------------- statistics


def all_reduce_stats(collector) -> None:
    """Sum a :class:`~rankcut.calibrate.StatsCollector`'s accumulators over the world, in place (float64): each
    accumulator's sum (Σ xᵀx, or Σ |x|) and its count of rows, so that ``value()`` (the Gram sum, or the mean
    |x| = sum / count) is the statistic of every process's windows together. Nothing outside a world."""
    world = current()
    if world is None:
        return
    names = sorted(collector.accumulators)
    seen = [None] * world.size
    dist.all_gather_object(seen, names)
    if any(s != names for s in seen):
        raise RuntimeError(f"the processes accumulated statistics of different layers: {seen}")
    accumulators = [collector.accumulators[name] for name in names]
    if not accumulators:
        return
    missing = [name for name, acc in zip(names, accumulators) if acc.total is None]
    if missing:
        raise RuntimeError(f"no calibration data reached {missing[0]} in process {world.rank}")
    counts = torch.tensor([float(acc.count) for acc in accumulators], dtype=torch.float64, device=world.device)
    dist.all_reduce(counts)
    for acc, count in zip(accumulators, counts.tolist()):
        total = acc.total if acc.total.device == world.device else acc.total.to(world.device)
        dist.all_reduce(total)
        acc.total = total if total.device == acc.total.device else total.to(acc.total.device)
        acc.count = int(count)


# ------------------------------------------------------------------------------------------ process group


def current() -> World | None:
    """The world of the initialised ``torch.distributed`` process group, or None (not initialised, or one
    process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    if size < 2:
        return None
    return World(dist.get_rank(), size, dist.get_backend())


def launched() -> bool:
    """Whether this process was started as one of a world (``torchrun``, or :func:`launch`)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    """NCCL on CUDA, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device, quiet_others: bool = True) -> tuple[World | None, torch.device]:
    """Join the world ``torchrun``'s (or :func:`launch`'s) environment variables describe, if any.

    On CUDA each process takes ``cuda:LOCAL_RANK`` (the device must be given without an index); the backend is
    NCCL, on the CPU gloo. With ``quiet_others``, processes other than rank 0 log only errors.

    Returns:
        ``(world, device)``: the world (None outside one, or in a world of one process) and the device this
        process works on.

    Raises:
        ValueError: a CUDA device with an index, more processes on a host than it has GPUs, or no backend.
    """
    device = torch.device(device)
    if not launched() or env_world_size() < 2:
        return None, device
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend = backend_for(device)
    if backend == "nccl":
        if device.index is not None:
            raise ValueError(f"device {device}: with several processes each takes cuda:LOCAL_RANK; give cuda or auto")
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} on this host, and only {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        if not dist.is_nccl_available():
            raise ValueError("this torch has no NCCL: data parallelism on GPUs needs it")
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=TIMEOUT, **kwargs)
    world = current()
    if world is not None and quiet_others and not world.main:
        logging.getLogger("rankcut").setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
    return world, device


def close() -> None:
    """Leave the process group (after a barrier: the others wait for rank 0's checkpoint)."""
    world = current()
    if world is not None:
        world.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessError(ValueError):
    """A process of the world failed: ``code`` is its exit status; ``shown``: its own message is already on this
    process's stderr (process 0 writes there)."""

    def __init__(self, message: str, code: int, shown: bool = False) -> None:
        super().__init__(message)
        self.code, self.shown = code, shown


def process_env(rank: int, n: int, port: int, cpu: bool, base: dict | None = None) -> dict[str, str]:
    """The environment of process ``rank`` of ``n`` on this host (torchrun's variables, a local rendezvous,
    NVLink multicast off; on the CPU, an equal share of the cores unless OMP_NUM_THREADS is set)."""
    env = dict(os.environ if base is None else base)
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **NO_MULTICAST})
    if cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return env


def launch(n: int, command: list[str], cpu: bool = False, poll: float = 0.2) -> int:
    """Run ``command`` in ``n`` processes of one world on this host and wait for them.

    Process 0 writes to this process's stdout and stderr; the others' stdout is discarded and their stderr kept.
    When one fails, the others are stopped (they would wait for it in a collective).

    Returns:
        0 when every process succeeded.

    Raises:
        ProcessError: a process failed: which, its exit status, and the end of its error output.
    """
    port = free_port()
    logs, procs = [], []
    try:
        for rank in range(n):
            err = None if rank == 0 else tempfile.TemporaryFile()
            logs.append(err)
            procs.append(subprocess.Popen(command, env=process_env(rank, n, port, cpu),
                                          stdout=None if rank == 0 else subprocess.DEVNULL, stderr=err))
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is None:
                time.sleep(poll)
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        if failed is None:
            return 0
        deadline = time.monotonic() + 2.0  # the others usually fail too (the same error): let process 0 say it
        while procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(poll)
        _stop(procs)
        if procs[0].returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            failed = 0
        code = procs[failed].returncode
        code = code if code > 0 else 1
        if failed == 0:
            raise ProcessError(f"process 0 of {n} failed with exit status {code}", code, shown=True)
        logs[failed].seek(0)
        lines = logs[failed].read().decode(errors="replace").strip().splitlines()
        errors = [line for line in lines if line.startswith("rankcut: ")]
        tail = errors[-1].removeprefix("rankcut: error: ") if errors else " | ".join(lines[-5:]) or "no message"
        raise ProcessError(f"process {failed} of {n} failed with exit status {code}: {tail}", code)
    finally:
        _stop(procs)
        for handle in logs:
            if handle is not None:
                handle.close()


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Terminate the processes still running (those this module started), then kill what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def rankcut_command(argv: list[str]) -> list[str]:
    """The command line that runs ``rankcut`` with ``argv`` in a new process (this interpreter)."""
    return [sys.executable, "-m", "rankcut", *argv]
