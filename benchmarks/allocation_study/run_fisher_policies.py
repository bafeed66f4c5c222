import sys
from lib import *
from alloc import allocate, describe
from policies import curve_cost
from evalplans import Evaluator
name = sys.argv[1]; fis = sys.argv[2]
splits = sys.argv[3].split(",") if len(sys.argv) > 3 else ["dev"]
E = Evaluator(name); T = E.T
curves = load_json(fis)["curves"]
keys = ["rel", "abs", "seq", "tok", "diag", "emp_seq", "emp_tok", "emp_diag"]
out = {"model": name, "fisher": fis, "results": []}
for keep in (0.8, 0.6):
    plans = {"uniform": T.uniform(keep)}
    for k in keys:
        plans[k] = allocate(T, curve_cost(curves, k), keep)
    for label, ranks in plans.items():
        row = {"keep": keep, "policy": label, "keep_of": T.keep_of(ranks), "ndense": sum(r is None for r in ranks.values()), "ranks": ranks}
        for s in splits:
            row[s] = E.ppl(ranks, s)
        out["results"].append(row)
        print(keep, label, round(row["keep_of"], 4), row["ndense"], {s: round(row[s], 3) for s in splits}, flush=True)
save(f"fisherpol_{name}_{os.path.basename(fis)}", out)
