"""How well do the cheap curves predict the measured single-target KL (64 windows)? Log-space stats per grid point."""
import sys, math
from lib import load_json
name = sys.argv[1]; fis = sys.argv[2]
sg = load_json(f"sens_grid_{name}.json"); fi = load_json(fis)["curves"]
keys = ["tok", "seq", "diag", "emp_tok", "emp_diag", "rel"]
import statistics as st
print("rho", *[f"{k:>16}" for k in keys])
for j, rho in enumerate(sg["grid"]):
    line = [f"{rho:4.2f}"]
    for k in keys:
        lr = []
        for n, t in sg["targets"].items():
            row = t["rows"][j]; kl = sum(row["kl"]) / len(row["kl"])
            pred = fi[n][k][row["rank"]]
            if kl > 0 and pred > 0:
                lr.append(math.log(kl / pred))
        # spread of log ratio across targets (0 = perfect up to a global scale)
        line.append(f"{st.mean(lr):7.2f}±{st.pstdev(lr):5.2f}({len(lr)})")
    print(*line)
# noise of KL itself: half vs half of windows
lr = []
for n, t in sg["targets"].items():
    for row in t["rows"]:
        h = len(row["kl"]) // 2
        a, b = sum(row["kl"][:h]), sum(row["kl"][h:])
        if a > 0 and b > 0: lr.append(math.log(a / b))
print("KL half/half log-ratio sd", st.pstdev(lr), "n", len(lr))
lr = []
for n, t in sg["targets"].items():
    for row in t["rows"]:
        h = len(row["nll"]) // 2
        d = [x - y for x, y in zip(row["nll"], sg["dense_nll"])]
        a, b = sum(d[:h]), sum(d[h:])
        if a > 0 and b > 0: lr.append(math.log(a / b))
print("dNLL half/half log-ratio sd", st.pstdev(lr), "n", len(lr))
