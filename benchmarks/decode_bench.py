"""Decode benchmark (issue #4, item 3): ``rankcut bench`` on Llama-2-7B / Llama-3-8B shapes (random bf16 weights),
dense vs uniform keep 0.5 and 0.8, and GPT-2; one JSON per comparison under the output directory.

Each comparison is exactly the CLI command printed before it (run in this process, one after the other; every
comparison measures its own dense baseline in the same run)::

    PYTHONPATH=$PWD python benchmarks/decode_bench.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys

from rankcut.cli import main as cli

CONFIGS = [("llama2-7b", 0.5), ("llama2-7b", 0.8), ("llama3-8b", 0.5), ("llama3-8b", 0.8), ("gpt2", 0.5)]


def run(out: str, only: list[str] | None, extra: list[str]) -> int:
    failures = 0
    for shape, keep in CONFIGS:
        tag = f"{shape}_keep{keep}"
        if only and tag not in only and shape not in only:
            continue
        argv = ["bench", f"random:{shape}", "--random-lowrank", str(keep), "--compare", f"random:{shape}", "--batch", "1",
                "--prompt-len", "128", "--new-tokens", "256", "--quiet", "--json", f"{out}/decode_{tag}.json", *extra]
        print("$ rankcut " + " ".join(argv), flush=True)
        failures += cli(argv) != 0
    return failures


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    args, extra = ap.parse_known_args()
    sys.exit(run(args.out, args.only, extra))
