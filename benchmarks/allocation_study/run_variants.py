"""Dev evaluation of allocation variants from one Fisher file: rank step (kernel rounding), no-dense, etc."""
import sys
from lib import *
from alloc import allocate
from policies import curve_cost
from evalplans import Evaluator
name = sys.argv[1]; fis = sys.argv[2]; splits = sys.argv[3].split(","); keys = sys.argv[4].split(",")
E = Evaluator(name); T = E.T
curves = load_json(fis)["curves"]
out = []
for s in splits:
    print("dense", s, E.ppl({n: None for n in T.names}, s))
for keep in (0.8, 0.6):
    for k in keys:
        for step, dense in ((1, True), (8, True), (16, True), (1, False)):
            ranks = allocate(T, curve_cost(curves, k), keep, step=step, allow_dense=dense)
            row = {"keep": keep, "key": k, "step": step, "allow_dense": dense, "keep_of": T.keep_of(ranks), "ranks": ranks}
            for s in splits:
                row[s] = E.ppl(ranks, s)
            out.append(row)
            print(keep, k, step, dense, round(row["keep_of"], 4), {s: round(row[s], 3) for s in splits}, flush=True)
save(f"variants_{name}_{os.path.basename(fis)}", out)
