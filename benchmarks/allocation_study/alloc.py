"""Allocators: exact Lagrangian (lower convex hull) + greedy fill for separable costs.

curves: {name: {rank: cost}} where rank None means dense (cost 0 usually). params via Targets.cost.
"""
import math


def options_for(T, n, costfn, step=1, allow_dense=True, rmin=None):
    """(params, cost, rank) options of target n: ranks step, 2step, ... below break-even, plus dense."""
    mx = T.breakeven(n)
    lo = rmin or step
    ranks = list(range(lo, mx + 1, step))
    opts = [(T.cost(n, r), costfn(n, r), r) for r in ranks]
    if allow_dense:
        opts.append((T.cost(n, None), costfn(n, None), None))
    return opts


def hull(opts):
    """Lower convex hull of (params, cost) points, increasing params, decreasing cost."""
    pts = sorted(opts, key=lambda o: (o[0], o[1]))
    # keep only Pareto points
    par = []
    for p in pts:
        if not par or p[1] < par[-1][1]:
            if par and p[0] == par[-1][0]:
                par[-1] = p
            else:
                par.append(p)
    h = []
    for p in par:
        while len(h) >= 2:
            (x1, y1, _), (x2, y2, _) = h[-2], h[-1]
            # remove h[-1] if it lies above segment h[-2] -> p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                h.pop()
            else:
                break
        h.append(p)
    return h, par


def allocate(T, costfn, keep, step=1, allow_dense=True, names=None, fill=True):
    """Minimise sum of costs subject to sum params <= keep * dense params. Returns {name: rank or None}."""
    names = names or T.names
    budget = keep * T.dense_total - sum(T.cost(n, None) for n in T.names if n not in names)
    hulls, pareto = {}, {}
    for n in names:
        hulls[n], pareto[n] = hull(options_for(T, n, costfn, step, allow_dense))
    # greedy along hull segments in order of slope (exact Lagrangian for the separable problem)
    pos = {n: 0 for n in names}
    used = sum(hulls[n][0][0] for n in names)
    if used > budget:
        raise ValueError("budget below the smallest option")
    import heapq
    heap = []

    def push(n):
        i = pos[n]
        if i + 1 < len(hulls[n]):
            (p0, c0, _), (p1, c1, _) = hulls[n][i], hulls[n][i + 1]
            heapq.heappush(heap, (-(c0 - c1) / (p1 - p0), n, i))

    for n in names:
        push(n)
    stuck = []
    while heap:
        s, n, i = heapq.heappop(heap)
        if i != pos[n]:
            continue
        dp = hulls[n][i + 1][0] - hulls[n][i][0]
        if used + dp <= budget:
            used += dp
            pos[n] += 1
            push(n)
        else:
            stuck.append(n)  # this target's next hull step does not fit; others may
    ranks = {n: hulls[n][pos[n]][2] for n in names}
    if fill:  # spend the leftover on Pareto (non-hull) points: best cost decrease that fits
        cur = {n: hulls[n][pos[n]] for n in names}
        while True:
            best = None
            for n in names:
                p0, c0, _ = cur[n]
                for p, c, r in pareto[n]:
                    if p > p0 and used + p - p0 <= budget and c < c0:
                        gain = (c0 - c) / (p - p0)
                        if best is None or gain > best[0]:
                            best = (gain, n, (p, c, r))
            if best is None:
                break
            _, n, opt = best
            used += opt[0] - cur[n][0]
            cur[n] = opt
        ranks = {n: cur[n][2] for n in names}
    for n in T.names:
        if n not in names:
            ranks[n] = None
    return ranks


def describe(T, ranks):
    out = {}
    for n in T.names:
        r = ranks.get(n)
        out[n] = "dense" if r is None else f"{r}/{T.breakeven(n)}"
    return out
