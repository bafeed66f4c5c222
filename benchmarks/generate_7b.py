"""What a user of ``rankcut.generate`` gets on a 7B shape, against ``rankcut bench`` on the same model (issue #15).

A random Llama-2-7B-shaped bf16 model (its vocabulary is the given tokenizer's, so that text round-trips;
``random:llama2-7b`` in ``rankcut bench`` has 32000 tokens), dense and with random uniform-keep factors. For each:

- ``rankcut.generate`` (the function behind ``rankcut generate``): one prompt of ``--prompt-len`` tokens,
  ``--new-tokens`` greedy tokens (no end-of-sequence token, so every run makes all of them), ``--repeats``
  runs: end-to-end tokens/s (prefill included) and decode tokens/s (after the first token), host checks every
  16 tokens; once more streaming (the host looks at every token);
- ``rankcut bench``'s loop (:func:`rankcut.bench.run.bench_model`) on the same model and lengths;
- Hugging Face ``generate`` (eager, dynamic cache) for ``--hf-tokens`` tokens, for reference.

"of limit" = tokens/s over measured copy bandwidth / (weight bytes + KV-cache bytes read per step).

Example (H200)::

    PYTHONPATH=$PWD python benchmarks/generate_7b.py --tokenizer .carry/data/testbed/codellama-16m \\
        --json benchmarks/results/generate_7b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import transformers

import rankcut
from rankcut.bench.models import preset_config, random_lowrank_, random_model
from rankcut.bench.run import bench_model
from rankcut.bench.timing import copy_bandwidth
from rankcut.utils import environment

TEXT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n")


def prompt_of(tok, n: int) -> str:
    """A prompt text of about ``n`` tokens."""
    special = len(tok("a").input_ids) - len(tok("a", add_special_tokens=False).input_ids)
    ids = tok(TEXT * (1 + n // 16), add_special_tokens=False).input_ids[:n - special]
    return tok.decode(ids)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--keeps", default="dense,0.5,0.8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: a functional run of the script (eager fast loop)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = preset_config(args.shape)
    cfg.vocab_size = len(tok)
    prompt = prompt_of(tok, args.prompt_len)
    bandwidth = copy_bandwidth(args.device) if cuda else 1e12
    rows = []
    for keep in args.keeps.split(","):
        model = random_model(cfg, torch.bfloat16 if cuda else torch.float32, args.device)
        if keep != "dense":
            random_lowrank_(model, float(keep))
        row = {"keep": keep}
        runs = [rankcut.generate(model, tok, prompt, max_new_tokens=args.new_tokens, eos_token_id=-1, engine="fast")
                for _ in range(args.repeats)]
        assert all(r.engine == "fast" and r.cuda_graph == cuda and r.new_tokens == args.new_tokens for r in runs)
        row["generate_tokens_per_s"] = statistics.median(r.tokens_per_s for r in runs)
        row["generate_decode_tokens_per_s"] = statistics.median(r.decode_tokens_per_s for r in runs)
        row["generate_prefill_ms"] = statistics.median(r.prefill_seconds * 1e3 for r in runs)
        row["generate_runs"] = [{"tokens_per_s": r.tokens_per_s, "decode_tokens_per_s": r.decode_tokens_per_s,
                                 "prefill_s": r.prefill_seconds, "seconds": r.seconds} for r in runs]
        streamed = rankcut.generate(model, tok, prompt, max_new_tokens=args.new_tokens, eos_token_id=-1,
                                    stream=lambda row_, text: None, engine="fast")
        row["streamed_decode_tokens_per_s"] = streamed.decode_tokens_per_s
        row["streamed_tokens_per_s"] = streamed.tokens_per_s
        row["prompt_tokens"] = len(tok(prompt).input_ids)
        b = bench_model(model, 1, row["prompt_tokens"], args.new_tokens, repeats=args.repeats)
        row["bench_tokens_per_s"] = b["tokens_per_s"]
        row["weight_bytes"], row["kv_read_bytes_per_step"] = b["weight_bytes"], b["kv_read_bytes_per_step"]
        row["attention"] = b["attention"]
        limit = bandwidth / (b["weight_bytes"] + b["kv_read_bytes_per_step"])
        row["bandwidth_limit_tokens_per_s"] = limit
        for key in ("generate_decode_tokens_per_s", "bench_tokens_per_s", "streamed_decode_tokens_per_s"):
            row[key.replace("tokens_per_s", "of_limit")] = row[key] / limit
        if args.hf_tokens:
            ids = tok(prompt, return_tensors="pt").input_ids.to(args.device)
            with torch.no_grad():
                model.generate(ids, max_new_tokens=4, do_sample=False)
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.hf_tokens, min_new_tokens=args.hf_tokens, do_sample=False)
                if cuda:
                    torch.cuda.synchronize()
            row["hf_generate_tokens_per_s"] = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "generate_runs"}),
              flush=True)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    dense = next((r for r in rows if r["keep"] == "dense"), None)
    print(f"{'keep':<6} {'generate tok/s':>14} {'decode tok/s':>12} {'streamed':>9} {'bench tok/s':>11} {'of limit (gen/bench)':>21} "
          f"{'speedup (gen/bench)':>20} {'bound':>6} {'HF tok/s':>8}")
    for r in rows:
        sp = ""
        if dense and r is not dense:
            bound = dense["weight_bytes"] / r["weight_bytes"]
            g = r["generate_decode_tokens_per_s"] / dense["generate_decode_tokens_per_s"]
            bb = r["bench_tokens_per_s"] / dense["bench_tokens_per_s"]
            r["comparison"] = {"bound": bound, "generate_speedup": g, "bench_speedup": bb,
                               "generate_fraction_of_bound": g / bound, "bench_fraction_of_bound": bb / bound}
            sp = f"{g:>8.3f}x /{bb:.3f}x {bound:>6.3f}x"
        print(f"{r['keep']:<6} {r['generate_tokens_per_s']:>14.1f} {r['generate_decode_tokens_per_s']:>12.1f} "
              f"{r['streamed_decode_tokens_per_s']:>9.1f} {r['bench_tokens_per_s']:>11.1f} "
              f"{r['generate_decode_of_limit']:>10.1%} / {r['bench_of_limit']:>6.1%} {sp:>27} "
              f"{r.get('hf_generate_tokens_per_s', float('nan')):>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "settings": vars(args), "bandwidth_bytes_per_s": bandwidth,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
