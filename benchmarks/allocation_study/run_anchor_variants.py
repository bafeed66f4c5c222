"""Dev-only: which prior shape x which single measured KL point (grid data, 32 windows)."""
import sys, math
from lib import *
from alloc import allocate
from policies import curve_cost
from evalplans import Evaluator
name = sys.argv[1]
E = Evaluator(name); T = E.T
sens = load_json(f"sens_grid_{name}.json"); curves = load_json(f"fisher_{name}_32_2.json")["curves"]


def anchored(prior, rho, nwin=32):
    scale = {}
    for n, t in sens["targets"].items():
        row = [r for r in t["rows"] if abs(r["rho"] - rho) < 1e-9][0]
        v = row["kl"][: nwin // 8]
        scale[n] = max(sum(v) / len(v), 1e-12) / max(prior(n, row["rank"]), 1e-30)
    return lambda n, r: 0.0 if r is None else scale[n] * prior(n, r)


out = []
for keep in (0.8, 0.6):
    for shape in ("rel", "tok", "diag"):
        for rho in (0.3, 0.5, 0.7):
            ranks = allocate(T, anchored(curve_cost(curves, shape), rho), keep, step=8)
            row = {"keep": keep, "shape": shape, "rho": rho, "dev": E.ppl(ranks, "dev"), "devc": E.ppl(ranks, "devc"), "ranks": ranks}
            out.append(row)
            print(keep, shape, rho, round(row["dev"], 3), round(row["devc"], 3), flush=True)
save(f"anchorvar_{name}.json", out)
