"""Issue 11's allocation policies on a model, testbed protocol: uniform, spectrum, and sensitivity (one measured
KL point per target × the spectrum's shape), at keep 0.8 and 0.6, whiten; sensitivity measured first (timed).

    python3 benchmarks/allocation.py codellama-16m
    python3 benchmarks/allocation.py codegpt2-23m
    python3 benchmarks/allocation.py stories260K ../shared/data/stories260K/hf \\
        ../shared/data/wikitext-2-raw/wiki.valid.raw ../shared/data/wikitext-2-raw/wiki.test.raw

Arguments: model name [model dir, calibration text, evaluation text] (default: the testbed's). Calibration = the
first 32 windows of 256 tokens of the calibration text; sensitivity scores 32 further windows of it; evaluation =
the first 24 windows of 256 tokens of the evaluation text. 2 threads. Prints one line per point and the JSON.
"""

import json
import sys
import time
from pathlib import Path

import torch
import transformers

import rankcut
from rankcut.sensitivity import SensitivitySettings, measure_sensitivity

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"


def main() -> None:
    torch.set_num_threads(2)
    name = sys.argv[1]
    path = sys.argv[2] if len(sys.argv) > 2 else str(D / name)
    calib, held = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else (str(D / "calib" / "python_calib.txt"),
                                                                          str(D / "heldout" / "python_heldout.txt"))
    tok = transformers.AutoTokenizer.from_pretrained(path)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    base = dict(method="whiten", calib_samples=32, seq_len=256, sampling="first")
    out = {"command": " ".join(["python3", *sys.argv])}
    start = time.time()
    sens = measure_sensitivity(load(), tok, calib, rankcut.CompressConfig(**base), SensitivitySettings(), progress=False)
    out["sensitivity_s"] = time.time() - start
    for keep in (0.8, 0.6):
        for policy, extra, context in [
            ("uniform", {}, None),
            ("spectrum", {"allocation": "spectrum"}, None),
            ("sensitivity", {"allocation": "sensitivity", "policy_options": {"key": sens.key}}, {"sensitivity": sens}),
        ]:
            model = load()
            start = time.time()
            summary = rankcut.compress_(model, rankcut.CompressConfig(**base, keep=keep, **extra), calib=calib,
                                        tokenizer=tok, progress=False, context=context)
            wall = time.time() - start
            ppl = rankcut.perplexity(model, tok, held, seq_len=256, max_windows=24, progress=False)
            out[f"{policy}_{keep}"] = {"ppl": ppl, "keep_targets": summary.keep_targets,
                                       "dense_targets": len(summary.dense_targets), "compress_s": wall}
            print(name, keep, policy, round(ppl, 4), round(summary.keep_targets, 4), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
