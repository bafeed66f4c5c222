import sys
from lib import *
from fisher import fisher_curves
from policies import curve_cost
from anchor import anchored_plans
from evalplans import Evaluator
name = sys.argv[1]; splits = sys.argv[2].split(","); nw = int(sys.argv[3]) if len(sys.argv) > 3 else 32
iters = int(sys.argv[4]) if len(sys.argv) > 4 else 2
E = Evaluator(name); T = E.T
for p in E.model.parameters():
    p.requires_grad_(False)
ck = Clock()
curves, _ = fisher_curves(E.model, T, E.data.score(nw), samples=1, seed=0, emp=False)
tf = ck()
R = Runner(E.model, E.data.score(nw)); R.cache_dense(); R.store_ref()
tr = ck()
out = {"fisher_s": tf, "ref_s": tr, "rows": []}
print("fisher", tf, "ref", tr, flush=True)
for keep in (0.8, 0.6):
    ck()
    plans, C, m = anchored_plans(T, R, curve_cost(curves, "tok"), keep, iters=iters)
    ta = ck()
    for it, plan in enumerate(plans):
        row = {"keep": keep, "iter": it, "anchors": m, "anchor_s": ta, "keep_of": T.keep_of(plan), "ranks": plan}
        for s in splits:
            row[s] = E.ppl(plan, s)
        out["rows"].append(row)
        print(keep, "iter", it, "time", round(ta, 1), "measured", m, round(row["keep_of"], 4), {s: round(row[s], 3) for s in splits}, flush=True)
    save(f"anchor_{name}_{nw}_{iters}.json", out)
