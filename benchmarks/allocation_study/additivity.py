"""Joint KL of whole plans vs the sum of single-target predictions (Fisher tok) on the score windows."""
import sys
from lib import *
from alloc import allocate
from policies import curve_cost
name = sys.argv[1]; fis = sys.argv[2]; nwin = int(sys.argv[3]) if len(sys.argv) > 3 else 32
model, tok = load(name); data = Data(name, tok)
T = Targets(model, grams_for(model, data))
curves = load_json(fis)["curves"]
R = Runner(model, windows_of(data.calib_ids, nwin, 32 + 64)); R.cache_dense(); R.store_ref()  # windows beyond the Fisher ones
cost = curve_cost(curves, "tok")
out = []
for keep in (0.9, 0.8, 0.7, 0.6, 0.5):
    for label, ranks in (("uniform", T.uniform(keep)), ("tok", allocate(T, cost, keep, step=8))):
        pred = sum(cost(n, ranks[n]) for n in T.names)
        T.apply(ranks); kl, nll = R.kl_and_nll(); T.restore()
        # per-block contributions: apply only one block's ranks
        blocks = {}
        for b in range(len(R.blocks)):
            sub = {n: r for n, r in ranks.items() if block_index(n, R.prefix) == b}
            T.apply(sub); blocks[b] = (R.kl(b), sum(cost(n, sub[n]) for n in sub)); T.restore()
        out.append({"keep": keep, "policy": label, "pred_sum": pred, "joint_kl": kl, "nll": nll, "blocks": blocks})
        print(keep, label, "pred", round(pred, 4), "joint", round(kl, 4), "ratio", round(kl / pred, 3),
              "blocks(meas/pred)", [f"{m:.3f}/{p:.3f}" for m, p in blocks.values()], "sum blocks", round(sum(m for m, _ in blocks.values()), 4), flush=True)
save(f"additivity_{name}.json", out)
