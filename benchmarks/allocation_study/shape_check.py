"""Shape accuracy of priors anchored at one measured point: log error of predicted single-target KL
(64-window grid) at the other grid ranks, and error of local slopes (log KL(rho_j)/KL(rho_j+1))."""
import math, sys, statistics as st
from lib import load_json
for name in sys.argv[1:]:
    sg = load_json(f"sens_grid_{name}.json"); fi = load_json(f"fisher_{name}_32_2.json")["curves"]
    print(name)
    for key in ("tok", "rel", "diag"):
        errs = {}; slope = []
        for n, t in sg["targets"].items():
            rows = t["rows"]; kl = [max(sum(r["kl"]) / len(r["kl"]), 1e-9) for r in rows]
            pr = [max(fi[n][key][r["rank"]], 1e-30) for r in rows]
            a = math.log(kl[5] / pr[5])  # anchor rho=0.5
            for j, r in enumerate(rows):
                errs.setdefault(r["rho"], []).append(math.log(kl[j] / pr[j]) - a)
            for j in range(len(rows) - 1):
                if rows[j]["rank"] != rows[j + 1]["rank"]:
                    slope.append(math.log(kl[j] / kl[j + 1]) - math.log(pr[j] / pr[j + 1]))
        print(f"  {key:5s} anchored@.5 log-err mean/sd by rho:", " ".join(f"{rho}:{st.mean(e):+.2f}/{st.pstdev(e):.2f}" for rho, e in errs.items()),
              f"| slope err mean {st.mean(slope):+.3f} rms {math.sqrt(st.mean([s*s for s in slope])):.3f}")
