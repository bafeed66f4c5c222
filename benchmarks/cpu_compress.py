"""CPU compression time and quality of the testbed models (BENCHMARKS.md, "CPU compression").

For each model and method: wall time per stage of ``rankcut.compress_`` and held-out perplexity, with the
dense perplexity from the same run. Settings follow DESIGN.md §4: fp32, calibration = the first
``--calib-samples`` windows of ``--seq-len`` tokens of the calibration text, evaluation = the first
``--eval-windows`` windows of the held-out text.

    python benchmarks/cpu_compress.py --data ../shared/data --json benchmarks/results/cpu_compress.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers

import rankcut
from rankcut.data import token_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--models", default="codellama-16m,codegpt2-23m")
    parser.add_argument("--methods", default="svd,asvd,whiten")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default="benchmarks/results/cpu_compress.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) / "testbed"
    runs = []
    for name in args.models.split(","):
        path = data / name
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        calib = token_stream(data / "calib" / "python_calib.txt", tokenizer)[: args.calib_samples * args.seq_len]
        held = token_stream(data / "heldout" / "python_heldout.txt", tokenizer)[: args.eval_windows * args.seq_len]
        dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        dense_ppl = rankcut.perplexity(dense, tokenizer, held, seq_len=args.seq_len, progress=False)
        del dense
        for method in args.methods.split(","):
            for keep in args.keep:
                model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                config = rankcut.CompressConfig(
                    method=method, keep=keep, calib_samples=args.calib_samples, seq_len=args.seq_len, sampling="first"
                )
                start = time.perf_counter()
                summary = rankcut.compress_(model, config, calib=calib, tokenizer=tokenizer, device="cpu", progress=False)
                wall = time.perf_counter() - start
                ppl = rankcut.perplexity(model, tokenizer, held, seq_len=args.seq_len, progress=False)
                row = {
                    "model": name,
                    "method": method,
                    "keep": keep,
                    "keep_targets": summary.keep_targets,
                    "keep_model": summary.keep_model,
                    "wall_s": wall,
                    "times": summary.times,
                    "ppl": ppl,
                    "dense_ppl": dense_ppl,
                }
                runs.append(row)
                stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.times.items())
                print(f"{name:14} {method:7} keep {keep}: ppl {ppl:.2f} (dense {dense_ppl:.2f}); {stages}", flush=True)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rankcut": rankcut.__version__,
        "args": vars(args),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
