"""Dev check of the refinement stage on top of Fisher-on-calibration-windows: context anchors measured on
the Gram windows themselves (no extra text) with 16 or 32 windows, 1 or 2 iterations; wall times."""
import sys
from lib import *
from fisher import fisher_curves
from policies import curve_cost
from anchor import context_anchored_plans
from evalplans import Evaluator
name = sys.argv[1]; splits = sys.argv[2].split(","); variants = sys.argv[3].split(",")  # e.g. g16,g32,s32
E = Evaluator(name); T = E.T
for p in E.model.parameters():
    p.requires_grad_(False)
ck = Clock()
curves, _ = fisher_curves(E.model, T, E.data.calib(32), samples=1, seed=0, emp=False)
tf = ck()
base = curve_cost(curves, "tok")
out = {"fisher_s": tf, "rows": []}
print("fisher(gram windows)", round(tf, 1), flush=True)
for v in variants:
    nw = int(v[1:])
    w = E.data.calib(nw) if v[0] == "g" else E.data.score(nw)
    ck()
    R = Runner(E.model, w); R.cache_dense(); R.store_ref()
    tref = ck()
    for keep in (0.8, 0.6):
        ck()
        plans, C, m = context_anchored_plans(T, R, base, keep, iters=2)
        ta = ck()
        for it, plan in enumerate(plans):
            row = {"variant": v, "keep": keep, "iter": it, "anchor_s": ta, "ref_s": tref, "keep_of": T.keep_of(plan), "ranks": plan}
            for s in splits:
                row[s] = E.ppl(plan, s)
            out["rows"].append(row)
            print(v, keep, "iter", it, "t_anchor(2 iters)", round(ta, 1), round(row["keep_of"], 4), {s: round(row[s], 3) for s in splits}, flush=True)
        save(f"refine_{name}.json", out)
