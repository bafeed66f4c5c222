"""Issue 14, first measurement: `whiten` factors quantised after decomposition (int8 and fp8 per output channel,
int4 in groups of 128 columns), naive or with the error compensation of
:func:`rankcut.quant.refit_left` (V quantised, U refitted in the whitened norm, then quantised), on a testbed
model. Dequantised back to float32 for evaluation (quality only; no kernels, no bytes on a GPU).

    python3 benchmarks/quant_probe.py codellama-16m --json benchmarks/results/quant_probe_codellama-16m.json
"""

import argparse
import copy
import json
from pathlib import Path

import torch
import transformers

import rankcut
from rankcut.compress import dense_stats
from rankcut.data import calibration_windows
from rankcut.modules import low_rank_modules
from rankcut.quant import dequantize, quantize, refit_left

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"


def roundtrip(W: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantise and dequantise; int4 in groups of 128 columns (the last group shorter: the matrix is padded with
    zero columns to a multiple of 128 and cut back, so an odd rank works too)."""
    if fmt != "int4":
        return dequantize(quantize(W, fmt))
    n = W.shape[1]
    pad = (-n) % 128
    Wp = torch.nn.functional.pad(W, (0, pad))
    return dequantize(quantize(Wp, fmt, 128))[:, :n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="codellama-16m")
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = str(D / args.model)
    calib, held = str(D / "calib" / "python_calib.txt"), str(D / "heldout" / "python_heldout.txt")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = rankcut.CompressConfig(method="whiten", keep=args.keep, calib_samples=32, seq_len=256, sampling="first")
    windows = calibration_windows(calib, tok, 32, 256, 0, "first")
    stats = dense_stats(dense, "gram", windows, config, progress=False)
    base = copy.deepcopy(dense)
    rankcut.compress_(base, config, calib=calib, tokenizer=tok, progress=False)

    def ppl(model):
        return rankcut.perplexity(model, tok, held, seq_len=256, max_windows=24, progress=False)

    out = {"command": "python3 benchmarks/quant_probe.py " + args.model, "keep": args.keep, "dense": ppl(dense),
           "float32 factors": ppl(base), "rows": []}
    print(out, flush=True)
    for fmt in ("int8", "fp8", "int4"):
        for compensate in (False, True):
            model = copy.deepcopy(base)
            with torch.no_grad():
                for name, layer in low_rank_modules(model).items():
                    U, V = layer.U.weight, layer.V.weight
                    Vq = roundtrip(V, fmt)
                    U2 = refit_left(U, V, Vq, stats[name]) if compensate else U
                    Uq = roundtrip(U2, fmt)
                    layer.V.weight.copy_(Vq)
                    layer.U.weight.copy_(Uq)
            value = ppl(model)
            row = {"format": fmt, "compensated": compensate, "ppl": value,
                   "vs float32 factors": value / out["float32 factors"] - 1}
            out["rows"].append(row)
            print(row, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
