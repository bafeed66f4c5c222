"""Fisher curves anchored by measured single-target KL at each target's operating rank.

1. tok curves (fisher.py) -> allocation at the budget, Lagrange multiplier lambda.
2. For every target its 'operating rank': the allocated rank, or for a target kept dense the rank it would
   take without the dense option at the same lambda.
3. Measure single-target KL(dense || target at that rank) on the score windows; the per-target correction is
   the log-ratio measured/predicted, interpolated in log-rank between anchors (constant outside).
4. Re-allocate with the corrected curves; repeat from 2 (new anchors are added) `iters` times.
"""
import math
from lib import *
from alloc import allocate, hull, options_for


def lagrange_rank(T, costfn, keep, n_ranks, step=8):
    """Operating rank of each target: allocated rank, or the no-dense best rank at the plan's slope."""
    plan = allocate(T, costfn, keep, step=step)
    # slope lambda = smallest marginal gain accepted among compressed targets (approximate)
    lam = None
    for n, r in plan.items():
        if r is None:
            continue
        h, _ = hull(options_for(T, n, costfn, step, allow_dense=True))
        idx = [o[2] for o in h].index(r) if r in [o[2] for o in h] else None
        if idx is not None and idx + 1 < len(h):
            (p0, c0, _), (p1, c1, _) = h[idx], h[idx + 1]
            s = (c0 - c1) / (p1 - p0)
            lam = s if lam is None else max(lam, s)
    op = {}
    for n, r in plan.items():
        if r is not None:
            op[n] = r
        else:
            opts = options_for(T, n, costfn, step, allow_dense=False)
            op[n] = min(opts, key=lambda o: o[1] + (lam or 0) * o[0])[2]
    return plan, op


class Corrected:
    def __init__(self, base):
        self.base = base
        self.anchors = {}  # n -> sorted list of (rank, log ratio)

    def add(self, n, r, kl):
        pred = max(self.base(n, r), 1e-30)
        lst = [a for a in self.anchors.get(n, []) if a[0] != r] + [(r, math.log(max(kl, 1e-12) / pred))]
        self.anchors[n] = sorted(lst)

    def logratio(self, n, r):
        a = self.anchors.get(n)
        if not a:
            return 0.0
        if r <= a[0][0]:
            return a[0][1]
        if r >= a[-1][0]:
            return a[-1][1]
        for (r0, l0), (r1, l1) in zip(a, a[1:]):
            if r0 <= r <= r1:
                w = (math.log(r) - math.log(r0)) / (math.log(r1) - math.log(r0))
                return (1 - w) * l0 + w * l1

    def __call__(self, n, r):
        if r is None:
            return 0.0
        return self.base(n, r) * math.exp(self.logratio(n, r))


def measure_single(T, R, n, r):
    l = block_index(n, R.prefix)
    T.set(n, r)
    try:
        return R.kl(l)
    finally:
        T.set(n, None)


def anchored_plans(T, R, base, keep, iters=2, step=8, log=print):
    """Returns list of plans: [plan0 (base), plan1, ...] and the corrected cost."""
    C = Corrected(base)
    plans = []
    measured = 0
    for it in range(iters + 1):
        plan, op = lagrange_rank(T, C, keep, None, step)
        plans.append(plan)
        if it == iters:
            break
        for n, r in op.items():
            if any(a[0] == r for a in C.anchors.get(n, [])):
                continue
            C.add(n, r, measure_single(T, R, n, r))
            measured += 1
        log(f"  iter {it}: anchors measured so far {measured}")
    return plans, C, measured


def context_anchored_plans(T, R, base, keep, iters=2, step=8, log=print, start_plan=None):
    """Like anchored_plans, but each anchor is the target's marginal KL in the context of the current plan:
    KL(plan) - KL(plan with the target dense) for compressed targets, KL(plan with it at its operating rank)
    - KL(plan) for dense ones. Captures interactions (e.g. gate x up in SwiGLU, error growth through depth)."""
    C = Corrected(base)
    plans, measured = [], 0
    for it in range(iters + 1):
        plan, op = lagrange_rank(T, C, keep, None, step)
        plans.append(plan)
        if it == iters:
            break
        T.apply(plan)
        R.cache_dense()  # block inputs of the compressed plan
        kl_plan = R.kl(0)
        for n, r in op.items():
            cur = plan[n]
            T.set(n, None if cur is not None else r)
            kl_alt = R.kl(block_index(n, R.prefix))
            T.set(n, cur)
            delta = kl_plan - kl_alt if cur is not None else kl_alt - kl_plan
            C.add(n, r, max(delta, 1e-3 * base(n, r)))
            measured += 1
        T.restore()
        R.cache_dense()
        log(f"  iter {it}: plan KL {kl_plan:.4f}, in-context anchors so far {measured}")
    return plans, C, measured
