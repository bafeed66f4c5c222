"""Research ground truth: single-target KL(dense||truncated) and NLL curves on a rank grid, per batch of 8
score windows (calibration windows 32.. not used for the Gram matrices), so window-count subsets can be studied."""
import sys
from lib import *
name = sys.argv[1]; nwin = int(sys.argv[2]) if len(sys.argv) > 2 else 64
GRID = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
model, tok = load(name); data = Data(name, tok)
ck = Clock()
grams = grams_for(model, data); T = Targets(model, grams)
R = Runner(model, data.score(nwin)); R.cache_dense(); R.store_ref()
print("setup", ck(), flush=True)

def per_batch(start):
    out = []
    for i, lg in R.logits(start):
        lq = F.log_softmax(lg, -1); lp = R.ref[i].float()
        ids = R.batch_ids(i)
        kl = (lp.exp() * (lp - lq)).sum().item() / (lg.shape[0] * lg.shape[1])
        nll = -lq[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
        out.append((kl, nll))
    return out

base = per_batch(0)
res = {"model": name, "nwin": nwin, "grid": GRID, "dense_nll": [b[1] for b in base], "targets": {}}
for n in T.names:
    l = block_index(n, R.prefix)
    m, k = T.shape[n]
    rows = []
    for rho in GRID:
        r = max(1, math.floor(rho * m * k / (m + k)))
        T.set(n, r)
        pb = per_batch(l)
        rows.append({"rho": rho, "rank": r, "kl": [b[0] for b in pb], "nll": [b[1] for b in pb]})
    T.set(n, None)
    res["targets"][n] = {"shape": [m, k], "block": l, "rows": rows}
    print(n, ck(), [round(sum(x["kl"]) / len(x["kl"]), 4) for x in rows], flush=True)
    save(f"sens_grid_{name}.json", res)
print("done")
