import sys, time, json, os
sys.path.insert(0, "/work/research/alloc")
import torch
torch.set_num_threads(int(os.environ.get("NTHREADS", "2")))
from recommended import *
from transformers import AutoModelForCausalLM, AutoTokenizer
import rankcut
path = sys.argv[1]
calib, held = "/work/shared/data/testbed/calib/python_calib.txt", "/work/shared/data/testbed/heldout/python_heldout.txt"
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32); tok = AutoTokenizer.from_pretrained(path)
cfg = rankcut.CompressConfig(method="whiten", calib_samples=32, seq_len=256, sampling="first")
t0 = time.perf_counter()
gw, fw = gram_and_fisher_windows(calib, tok, 32, 32, 256)
grams = dense_stats(model, "gram", gw, cfg, device="cpu", progress=False)
t1 = time.perf_counter(); svds = whitened_svds(model, grams); t2 = time.perf_counter()
costs = spectrum_anchor_costs(model, svds, fw, rho=0.5); t3 = time.perf_counter()
shapes = {n: tuple(dense_weight(m).shape) for n, m in find_targets(model).items()}
res = {"model": path, "times": {"grams": t1 - t0, "svd": t2 - t1, "measure_anchors": t3 - t2}}
import copy
for keep in (0.8, 0.6):
    ta = time.perf_counter(); plan = allocate(shapes, costs, keep, step=8); res["times"][f"allocate_{keep}"] = time.perf_counter() - ta
    m2 = copy.deepcopy(model)
    compress_with_stats_(m2, rankcut.CompressConfig(method="whiten", calib_samples=32, seq_len=256, sampling="first", overrides=overrides_for(plan)), grams, device="cpu", progress=False)
    res[f"ppl_{keep}"] = rankcut.perplexity(m2, tok, held, seq_len=256, max_windows=24, progress=False)
print(json.dumps(res))
