"""Does folding add + RMSNorm and SiLU·up into phase 1 pay? (issue #15) One model, several decoders, one process.

A random Llama-2-7B-shaped bf16 model at uniform keep (``--keep``); the decode loop of ``rankcut bench`` (batch 1,
``--prompt-len``, ``--new-tokens``, median of ``--repeats``) with the folds off and on, and with phase 1 at
``--block-r`` rows of ``V`` per program (the folded prologue re-reads the input row from L2 in every program;
more rows per program read it less often). The dense model's time comes first, for the fraction of bound.

Example (H200)::

    PYTHONPATH=$PWD python benchmarks/fold_bench.py --json benchmarks/results/decode15/fold_bench.json
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import time_decode
from rankcut.bench.models import preset_config, random_lowrank_, random_model, weight_bytes
from rankcut.kernels import dispatch
from rankcut.utils import environment


def timed(model, fold: bool, prompt, new_tokens: int, repeats: int, overrides: dict) -> float:
    with dispatch.plan_overrides(**overrides):
        dec = make_decoder(model, prompt.shape[0], prompt.shape[1] + new_tokens, fold=fold)
        ms = time_decode(dec, prompt, new_tokens, repeats)["ms_per_token"]
        dec.release()
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--block-r", default="auto,2,4", help="comma-separated: auto (the plan's) or rows per program")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg = preset_config(args.shape)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)).cuda()
    model = random_model(cfg, torch.bfloat16, "cuda")
    dense_bytes = weight_bytes(model)
    dense_ms = timed(model, False, prompt, args.new_tokens, args.repeats, {})
    random_lowrank_(model, args.keep)
    bound = dense_bytes / weight_bytes(model)
    rows = []
    print(f"dense {dense_ms:.3f} ms/token; keep {args.keep}: bound {bound:.3f}x")
    for br in args.block_r.split(","):
        # more rows per program with the same 4096-column tile (the RMSNorm prologue needs the row in one tile)
        overrides = {} if br == "auto" else {"block_r": int(br), "max_elems": 4096 * int(br)}
        for fold in (False, True):
            ms = timed(model, fold, prompt, args.new_tokens, args.repeats, overrides)
            frac = dense_ms / ms / bound
            rows.append({"block_r": br, "fold": fold, "ms_per_token": ms, "fraction_of_bound": frac})
            print(f"block_r {br:>4}  fold {str(fold):<5}  {ms:.3f} ms/token  {1e3 / ms:.1f} tok/s  "
                  f"fraction of bound {frac:.1%}", flush=True)
            gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "settings": vars(args), "dense_ms_per_token": dense_ms,
                       "bound": bound, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
