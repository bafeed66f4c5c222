"""(d) Interaction-aware refinement: pairwise rank swaps validated by the joint KL of the whole plan on
held-out calibration windows (not used for Gram or Fisher). Accept a swap only if the joint KL drops by
more than `margin` (relative)."""
import sys
from lib import *
from alloc import allocate
from policies import curve_cost
from fisher import fisher_curves
from evalplans import Evaluator


def moves(T, plan, cost, step):
    """Per target: ('up' gain per param, new rank) and ('down' loss per param, new rank)."""
    ups, downs = [], []
    for n in T.names:
        r = plan[n]
        mx = T.breakeven(n)
        if r is not None:
            nr = r + step if r + step <= mx else None
            dp = T.cost(n, nr) - T.cost(n, r)
            ups.append(((cost(n, r) - cost(n, nr)) / dp, n, nr, dp))
            if r - step >= step:
                dp = T.cost(n, r) - T.cost(n, r - step)
                downs.append(((cost(n, r - step) - cost(n, r)) / dp, n, r - step, dp))
        else:
            nr = (mx // step) * step
            dp = T.cost(n, None) - T.cost(n, nr)
            downs.append(((cost(n, nr) - 0.0) / dp, n, nr, dp))
    ups.sort(reverse=True)
    downs.sort()
    return ups, downs


def refine(T, R, plan, cost, keep, step=8, max_evals=40, topk=6, margin=0.002, log=print):
    budget = keep * T.dense_total
    T.apply(plan); best = R.kl(0); T.restore()
    evals, tried = 0, set()
    improved = True
    while improved and evals < max_evals:
        improved = False
        ups, downs = moves(T, plan, cost, step)
        for _, a, ra, dpa in ups[:topk]:
            for _, b, rb, dpb in downs[:topk]:
                if a == b or (a, ra, b, rb) in tried:
                    continue
                cand = dict(plan); cand[a] = ra; cand[b] = rb
                # take more from b while over budget
                while T.params(cand) > budget and cand[b] is not None and cand[b] - step >= step:
                    cand[b] -= step
                if T.params(cand) > budget:
                    continue
                tried.add((a, ra, b, rb))
                T.apply(cand); kl = R.kl(0); T.restore(); evals += 1
                if kl < best * (1 - margin):
                    log(f"  accept {a} -> {ra}, {b} -> {cand[b]}: {best:.4f} -> {kl:.4f} (eval {evals})")
                    best, plan, improved = kl, cand, True
                    break
                if evals >= max_evals:
                    break
            if improved or evals >= max_evals:
                break
    return plan, best, evals


if __name__ == "__main__":
    name = sys.argv[1]; splits = sys.argv[2].split(",")
    E = Evaluator(name); T = E.T
    for p in E.model.parameters():
        p.requires_grad_(False)
    curves, _ = fisher_curves(E.model, T, E.data.score(32), samples=1, seed=0, emp=False)
    cost = curve_cost(curves, "tok")
    R = Runner(E.model, windows_of(E.data.calib_ids, 32, 96)); R.cache_dense(); R.store_ref()
    out = []
    for keep in (0.8, 0.6):
        plan0 = allocate(T, cost, keep, step=8)
        ck = Clock()
        plan, kl, ev = refine(T, R, plan0, cost, keep)
        t = ck()
        for label, p in (("tok", plan0), ("tok+swaps", plan)):
            row = {"keep": keep, "policy": label, "evals": ev, "time": t, "keep_of": T.keep_of(p), "ranks": p}
            for s in splits:
                row[s] = E.ppl(p, s)
            out.append(row)
            print(keep, label, ev, round(t, 1), round(row["keep_of"], 4), {s: round(row[s], 3) for s in splits}, flush=True)
        save(f"swaps_{name}.json", out)
