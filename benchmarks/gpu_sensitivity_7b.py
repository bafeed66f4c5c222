"""Time ``rankcut.sensitivity.measure_sensitivity`` on a Llama-2-7B-shaped model (random bf16 weights: the time
is real, the scores are not), as issue 11 asks. With ``--output`` the measurement is cached and resumable, and the
progress bar (stderr) shows the rate per target, so a run cut off by a time limit still says how far it got.

    PYTHONPATH=$PWD python3 benchmarks/gpu_sensitivity_7b.py --samples 256 --seq-len 2048 --score-windows 32 \\
        --json OUT/gpu_sensitivity_7b.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

import rankcut
from rankcut.sensitivity import SensitivitySettings, measure_sensitivity

sys.path.insert(0, "benchmarks")
from gpu_compress_7b import build_random_model, environment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--score-windows", type=int, default=32)
    p.add_argument("--score", default="kl", choices=["kl", "fisher", "loss"])
    p.add_argument("--fractions", default="0.5")
    p.add_argument("--output", help="sensitivity cache directory (resumable)")
    p.add_argument("--json")
    args = p.parse_args()
    model = build_random_model(args.layers, torch.bfloat16, 0)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (args.samples + args.score_windows, args.seq_len), generator=gen)
    config = rankcut.CompressConfig(method="whiten", calib_samples=args.samples, seq_len=args.seq_len, batch_size=8)
    settings = SensitivitySettings(fractions=tuple(float(f) for f in args.fractions.split(",")), score=args.score,
                                   windows=args.score_windows, batch_size=4)
    start = time.perf_counter()
    result = measure_sensitivity(model, None, calib, config, settings, device="cuda", progress=True,
                                 output=args.output)
    wall = time.perf_counter() - start
    out = {"command": " ".join(["python3", *sys.argv]), "environment": environment(), "wall_s": wall,
           "times": result.times, "targets": len(result.curves), "settings": result.settings["settings"],
           "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
           "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
