"""Noise study of the Fisher curves: windows, label samples, seeds -> dev perplexity of the allocation."""
import sys
from lib import *
from alloc import allocate
from policies import curve_cost
from evalplans import Evaluator
from fisher import fisher_curves
name = sys.argv[1]
settings = [tuple(int(v) for v in s.split(":")) for s in sys.argv[2].split(",")]  # nwin:samples:seed:offset
E = Evaluator(name); T = E.T
for p in E.model.parameters():
    p.requires_grad_(False)
out = []
for nwin, samples, seed, offset in settings:
    w = windows_of(E.data.calib_ids, nwin, 32 + offset)
    ck = Clock()
    curves, N = fisher_curves(E.model, T, w, samples=samples, seed=seed, emp=False)
    t = ck()
    for keep in (0.8, 0.6):
        for k in ("tok", "diag"):
            ranks = allocate(T, curve_cost(curves, k), keep, step=8)
            row = {"nwin": nwin, "samples": samples, "seed": seed, "offset": offset, "time": t, "keep": keep, "key": k,
                   "dev": E.ppl(ranks, "dev"), "devc": E.ppl(ranks, "devc"), "ranks": ranks}
            out.append(row)
            print(nwin, samples, seed, offset, round(t, 1), keep, k, round(row["dev"], 3), round(row["devc"], 3), flush=True)
    save(f"fisher_study_{name}_{sys.argv[3] if len(sys.argv) > 3 else 'a'}.json", out)
