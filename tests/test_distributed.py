"""Data parallelism of the statistics phase (rankcut.distributed, rankcut.parallel): 2 gloo processes on the CPU.

- The checkpoint of ``torchrun --nproc-per-node 2 -m rankcut compress`` (and of ``--gpus 2 --device cpu``, with a
  global allocation) equals the one-process checkpoint: the same ranks, the same tensors (to summation order).
- The reduction itself: Gram sums and absmean (sum and count) of two unequal shards equal the one-process
  statistics; modules broadcast with their ties; a candidate broadcast without its factors.
- The launcher names the process that failed, with its message, and stops the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import rankcut
from rankcut.cli import main
from rankcut.distributed import ProcessError, World, current, launch, process_env
from tiny_models import sample_text, save_tiny

FAST = ["--calib-samples", "8", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    model = save_tiny(root / "llama", "llama")
    calib = root / "calib.txt"
    calib.write_text(sample_text(600, seed=1))
    return root, model, calib


def assert_same_checkpoint(one, two) -> None:
    a, b = rankcut.load(one), rankcut.load(two)
    ranks = lambda m: {name: entry.get("rank") for name, entry in m.rankcut_record.targets.items()}  # noqa: E731
    assert ranks(a) == ranks(b) and ranks(a)
    assert a.rankcut_record.dense == b.rankcut_record.dense
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        scale = float(sa[key].norm()) or 1.0
        assert float((sa[key] - sb[key]).norm()) <= 1e-5 * scale, key


def compress_one(files, out, *extra) -> None:
    _, model, calib = files
    assert main(["compress", str(model), "-o", str(out), "--calib", str(calib), *FAST, *extra]) == 0


def test_torchrun_two_processes_equal_one_process(files):
    root, model, calib = files
    compress_one(files, root / "one")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rankcut", "compress",
               str(model), "-o", str(root / "two"), "--calib", str(calib), *FAST, "--summary-json",
               str(root / "two.json")]
    out = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("saved ") == 1  # rank 0 alone prints (and writes)
    assert_same_checkpoint(root / "one", root / "two")
    times = json.loads((root / "two.json").read_text())["summary"]["times"]
    assert "broadcast" in times and "statistics" in times


def test_gpus_spawn_with_a_global_allocation_equals_one_process(files, capsys):
    root, model, calib = files
    compress_one(files, root / "one-spectrum", "--allocation", "spectrum")
    capsys.readouterr()
    code = main(["compress", str(model), "-o", str(root / "two-spectrum"), "--calib", str(calib), *FAST,
                 "--allocation", "spectrum", "--gpus", "2"])
    assert code == 0
    assert_same_checkpoint(root / "one-spectrum", root / "two-spectrum")
    assert rankcut.load(root / "two-spectrum").rankcut_record.dense  # the plan left some targets dense


@pytest.mark.parametrize("argv, match", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "2", "--streaming"], "--streaming does not combine with data parallelism"),
])
def test_bad_gpus_flags(files, tmp_path, capsys, argv, match):
    _, model, calib = files
    code = main(["compress", str(model), "-o", str(tmp_path / "out"), "--calib", str(calib), "--quiet", *argv])
    assert code == 2 and match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
def test_gpus_without_cuda_asks_for_the_cpu(files, tmp_path, capsys):
    _, model, calib = files
    code = main(["compress", str(model), "-o", str(tmp_path / "out"), "--calib", str(calib), "--quiet", "--gpus", "2"])
    assert code == 2 and "--device cpu" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the reduction itself


def _worker(rank: int, size: int, port: int) -> None:
    import torch.distributed as dist

    from rankcut.calibrate import StatsCollector
    from rankcut.distributed import all_reduce_stats
    from rankcut.units import Candidate, TargetInfo, Unit

    os.environ.update(process_env(rank, size, port, cpu=True))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        world = current()
        assert world == World(rank, size, "gloo")
        # windows: contiguous shares, sizes 3 and 4 of 7
        windows = torch.arange(7 * 2).reshape(7, 2)
        mine = world.shard(windows)
        assert mine.tolist() == windows[[0, 1, 2] if rank == 0 else [3, 4, 5, 6]].tolist()
        # statistics: unequal shards (5 and 11 rows), gram and absmean
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        part = x[:5] if rank == 0 else x[5:]
        for kind, expected in (("gram", x.mT @ x), ("absmean", x.abs().mean(0))):
            layer = nn.Linear(6, 3).double()
            with StatsCollector({"layer": layer}, kind) as stats:
                layer(part[:2])
                layer(part[2:])
                all_reduce_stats(stats)
            torch.testing.assert_close(stats.stat("layer"), expected, rtol=1e-12, atol=1e-12)
            assert stats.accumulators["layer"].count == 16
        # modules: a parameter tied between two modules stays tied; bf16 travels exactly
        if rank == 0:
            a, b = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
            b.weight = a.weight
            c = nn.Linear(2, 2).to(torch.bfloat16)
            sent = {"a": a, "b": b, "c": c, "note": "x"}
        got = world.share(sent if rank == 0 else None, 0)
        assert got["b"].weight is got["a"].weight and isinstance(got["a"].weight, nn.Parameter)
        assert got["c"].weight.dtype == torch.bfloat16 and got["note"] == "x"
        checksum = torch.stack([got["a"].weight.sum().double(), got["c"].weight.float().sum().double()])
        gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(size)]
        dist.all_gather(gathered, checksum)
        assert torch.equal(gathered[0], gathered[1])
        # a candidate without its factors: the spectrum arrives, the factors as meta tensors
        unit = Unit((TargetInfo("t", (5, 4)),))
        cand = Candidate(unit, 3, torch.tensor([3.0, 2.0, 1.0]), 15.0) if rank == 1 else None
        if rank == 1:
            cand.U = torch.randn(5, 3)
        light = world.share(cand, 1, data=lambda t: t is cand.spectrum)
        assert light.unit == unit and light.total == 15.0 and light.spectrum.tolist() == [3.0, 2.0, 1.0]
        assert light.U.device.type == ("cpu" if rank == 1 else "meta") and light.U.shape == (5, 3)
    finally:
        dist.destroy_process_group()


def test_reduction_and_broadcasts_with_two_gloo_processes():
    from rankcut.distributed import free_port

    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def test_one_process_is_no_world():
    from rankcut.calibrate import StatsCollector
    from rankcut.distributed import all_reduce_stats

    assert current() is None
    layer = nn.Linear(3, 2)
    with StatsCollector({"l": layer}, "gram") as stats:
        layer(torch.ones(2, 3))
        all_reduce_stats(stats)  # nothing to do
    assert stats.accumulators["l"].count == 2


# ----------------------------------------------------------------------------------------------- launching


def test_launcher_names_the_failing_process_and_stops_the_others():
    script = ("import os, sys, time\n"
              "if os.environ['RANK'] == '1':\n"
              "    print('rankcut: error: boom in rank 1', file=sys.stderr); sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(ProcessError, match="process 1 of 2 failed with exit status 3: boom in rank 1") as err:
        launch(2, [sys.executable, "-c", script])
    assert err.value.code == 3 and not err.value.shown
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for


def test_launcher_environment():
    env = process_env(1, 4, 29500, cpu=True, base={})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "1", "4", "29500")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and int(env["OMP_NUM_THREADS"]) >= 1
    assert launch(2, [sys.executable, "-c", "pass"]) == 0
