"""Cost functions for the allocator from the saved curves."""
import math
from lib import load_json


def curve_cost(curves, key):
    """cost(n, r) from a full-resolution curve list (index r = rank; dense -> 0)."""
    def f(n, r):
        if r is None:
            return 0.0
        c = curves[n][key]
        return c[min(r, len(c) - 1)]
    return f


def grid_interp_cost(sens, T, prior=None, nwin=None, use="kl"):
    """Measured grid KL, log-linear interpolation in rank between grid points (or shaped by a prior curve)."""
    pts = {}
    for n, t in sens["targets"].items():
        rows = t["rows"]
        xs = [row["rank"] for row in rows]
        ys = []
        for row in rows:
            v = row[use][: (nwin // 8 if nwin else None)]
            ys.append(max(sum(v) / len(v), 1e-9))
        pts[n] = (xs, ys)

    def f(n, r):
        if r is None:
            return 0.0
        xs, ys = pts[n]
        if r <= xs[0]:
            return ys[0] * (prior(n, r) / prior(n, xs[0]) if prior else 1.0)
        for i in range(len(xs) - 1):
            if xs[i] <= r <= xs[i + 1]:
                if prior:
                    # shape from the prior between the two measured points, scale matched at both ends
                    a = ys[i] / max(prior(n, xs[i]), 1e-30)
                    b = ys[i + 1] / max(prior(n, xs[i + 1]), 1e-30)
                    w = (r - xs[i]) / max(xs[i + 1] - xs[i], 1)
                    return prior(n, r) * math.exp((1 - w) * math.log(a) + w * math.log(b))
                w = (r - xs[i]) / max(xs[i + 1] - xs[i], 1)
                return math.exp((1 - w) * math.log(ys[i]) + w * math.log(ys[i + 1]))
        # beyond last grid point: decay to 0 at break-even following prior or linearly
        mx = T.breakeven(n)
        if prior:
            return ys[-1] * prior(n, r) / max(prior(n, xs[-1]), 1e-30)
        return ys[-1] * max(mx + 1 - r, 0) / max(mx + 1 - xs[-1], 1)
    return f
