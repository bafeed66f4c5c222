"""Dev evaluation of allocations built from the measured single-target grid (and hybrids with priors)."""
import sys, math
from lib import *
from alloc import allocate
from policies import curve_cost, grid_interp_cost
from evalplans import Evaluator
name = sys.argv[1]; fis = sys.argv[2]; splits = sys.argv[3].split(",")
E = Evaluator(name); T = E.T
sens = load_json(f"sens_grid_{name}.json")
curves = load_json(fis)["curves"]
tok = curve_cost(curves, "tok"); rel = curve_cost(curves, "rel")
nb = len(next(iter(sens["targets"].values()))["rows"][0]["kl"])


def dnll_sens(nwin):
    """Grid rows with 'kl' replaced by the NLL increase (the probe's score), first nwin windows."""
    import copy
    s = copy.deepcopy(sens)
    k = nwin // 8
    base = sum(sens["dense_nll"][:k]) / k
    for t in s["targets"].values():
        for row in t["rows"]:
            row["kl"] = [max(sum(row["nll"][:k]) / k - base, 1e-6)] * k
    return s


def anchored(prior, rhos, nwin=None):
    """prior curve scaled per target by measured KL / prior at the given grid points (geometric mean)."""
    scale = {}
    for n, t in sens["targets"].items():
        lr = []
        for row in t["rows"]:
            if any(abs(row["rho"] - x) < 1e-9 for x in rhos):
                v = row["kl"][: (nwin // 8 if nwin else None)]
                lr.append(math.log(max(sum(v) / len(v), 1e-12) / max(prior(n, row["rank"]), 1e-30)))
        scale[n] = math.exp(sum(lr) / len(lr))
    return lambda n, r: 0.0 if r is None else scale[n] * prior(n, r)


pols = {
    "grid_kl64": grid_interp_cost(sens, T),
    "grid_kl64_tokshape": grid_interp_cost(sens, T, prior=tok),
    "grid_kl8": grid_interp_cost(sens, T, nwin=8),
    "grid_kl16": grid_interp_cost(sens, T, nwin=16),
    "grid_dnll8": grid_interp_cost(dnll_sens(8), T),
    "grid_dnll64": grid_interp_cost(dnll_sens(64), T),
    "rel_anchor0.5": anchored(rel, [0.5], 32),
    "rel_anchor0.3+0.7": anchored(rel, [0.3, 0.7], 32),
    "tok_anchor0.3": anchored(tok, [0.3], 32),
    "tok": tok,
}
out = []
for keep in (0.8, 0.6):
    for label, f in pols.items():
        ranks = allocate(T, f, keep, step=8)
        row = {"keep": keep, "policy": label, "keep_of": T.keep_of(ranks), "ranks": ranks}
        for s in splits:
            row[s] = E.ppl(ranks, s)
        out.append(row)
        print(keep, label, round(row["keep_of"], 4), {s: round(row[s], 3) for s in splits}, flush=True)
save(f"gridpol_{name}.json", out)
