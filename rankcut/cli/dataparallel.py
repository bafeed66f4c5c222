"""``rankcut compress --gpus N`` and ``torchrun --nproc-per-node N -m rankcut compress``: the command line's side
of :mod:`rankcut.distributed` (data parallelism of the statistics phase).

``--gpus N`` outside a world re-runs the same command in N processes on this host (a local rendezvous: the
variables torchrun sets, NVLink multicast off) and waits for them; inside a world (torchrun's variables, or the
processes ``--gpus`` started) the command joins it: each process calibrates on its share of the windows,
decomposes its share of the units, and ends with the same compressed model; only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import sys


def add_gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, metavar="N", help="data parallelism: N processes, one GPU each (cuda:0..N-1; "
                   "with --device cpu, N gloo processes on the CPU), each calibrating on 1/N of the windows and "
                   "decomposing 1/N of the layers; the same as torchrun --nproc-per-node N -m rankcut compress ...")


def check(args: argparse.Namespace) -> None:
    """Refuse what data parallelism does not do, before any work."""
    from rankcut.cli import CLIError
    from rankcut.distributed import env_world_size, launched

    if args.gpus is not None and args.gpus < 1:
        raise CLIError(f"--gpus must be >= 1, got {args.gpus}")
    if launched() and args.gpus is not None and args.gpus != env_world_size():
        raise CLIError(f"--gpus {args.gpus} inside a world of {env_world_size()} processes (torchrun "
                       "--nproc-per-node): give one of them")
    parallel = (args.gpus or 1) > 1 or (launched() and env_world_size() > 1)
    if parallel and getattr(args, "streaming", False):
        raise CLIError("--streaming does not combine with data parallelism (--gpus, torchrun)")


def spawns(args: argparse.Namespace) -> bool:
    """Whether this process is to start the world (``--gpus N`` > 1, not already inside one)."""
    from rankcut.distributed import launched

    return (args.gpus or 1) > 1 and not launched()


def spawn(args: argparse.Namespace, device) -> int:
    """Run this command in ``--gpus`` processes and return their exit status (a failure is reported here)."""
    import torch

    from rankcut.cli import CLIError
    from rankcut.distributed import ProcessError, launch, rankcut_command

    if device.type == "cuda":
        if device.index is not None:
            raise CLIError(f"--gpus uses cuda:0..{args.gpus - 1}: give --device cuda (or auto), not {device}")
        if args.gpus > torch.cuda.device_count():
            raise CLIError(f"--gpus {args.gpus}, and this host has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu" or args.device in (None, "auto"):
        raise CLIError("--gpus needs CUDA GPUs; for gloo processes on the CPU pass --device cpu")
    try:
        return launch(args.gpus, rankcut_command(args.argv), cpu=device.type == "cpu")
    except ProcessError as err:
        if not err.shown:  # process 0's own error is already on stderr
            print(f"rankcut: error: {err}", file=sys.stderr)
        return err.code


def join(args: argparse.Namespace, device):
    """``(world, device)``: the world this process is in (None: one process) and its device."""
    from rankcut.distributed import init_from_env

    world, device = init_from_env(device)
    if world is not None and not world.main:
        args.quiet = True
    return world, device


def done(world) -> int:
    """Leave the world (every process waits there for rank 0's checkpoint); 0."""
    from rankcut.distributed import close

    if world is not None:
        close()
    return 0
