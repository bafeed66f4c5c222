"""Issue 14 side measurement: U's columns rescaled to unit norm (their scale moved into V, the product unchanged)
before int4 / fp8 quantisation with compensation, against the usual sqrt(S) split; whiten keep 0.8, testbed
protocol, CPU. Not adopted: it helps int4 on codellama-16m and hurts it on codegpt2-23m (BENCHMARKS.md).

    python3 benchmarks/quant_rebalance.py
"""
import copy, torch, transformers, rankcut
from pathlib import Path
from rankcut.data import calibration_windows
from rankcut.modules import low_rank_modules, LowRankLinear
from rankcut.quantize import quantize_factors_
torch.set_num_threads(2)
D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"
for name in ["codellama-16m", "codegpt2-23m"]:
    path = str(D / name)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    w = calibration_windows(str(D / "calib/python_calib.txt"), tok, 32, 256, 0, "first")
    rankcut.compress_(base, rankcut.CompressConfig(keep=0.8, calib_samples=32, seq_len=256, sampling="first"), calib=w, progress=False)
    ppl = lambda m: rankcut.perplexity(m, tok, str(D / "heldout/python_heldout.txt"), seq_len=256, max_windows=24, progress=False)
    print(name, "float", ppl(base), flush=True)
    for fmt in ["int4", "fp8"]:
        for rebalance in [False, True]:
            m = copy.deepcopy(base)
            if rebalance:
                with torch.no_grad():
                    for l in low_rank_modules(m).values():
                        c = l.U.weight.norm(dim=0).clamp_min(1e-30)
                        l.U.weight.div_(c); l.V.weight.mul_(c[:, None])
            quantize_factors_(m, fmt, 128, w, True, progress=False)
            print(name, fmt, "rebalance" if rebalance else "sqrt-split", ppl(m), flush=True)
