"""The recommended rank-allocation policy, self-contained (uses only rankcut /work/ref/old as a library).

"Fisher-KL allocation":
  1. Gram matrices X^T X of the dense model on the calibration windows (as whiten needs anyway), and each
     target's whitened SVD  W L = U S Vh  (Vinv = Vh L^{-1}).
  2. One forward + backward pass per batch over `fisher_windows` calibration windows, with next-token labels
     SAMPLED from the dense model (so E[g g^T] is the Fisher of KL(dense || model)); g_t = d(sum log p)/dy_t
     at each target's output, x_t its input.  Cutting the target to rank r changes its output by
     dy_t = sum_{i>=r} s_i u_i (Vinv_i . x_t); the predicted single-target KL is
        cost_t(r) = 1/(2N) * sum_tokens ( sum_{i>=r} s_i (u_i . g_t)(Vinv_i . x_t) )^2
     for every r at once (suffix sums over i).  [per-token Gauss-Newton/Fisher quadratic form]
  3. Exact separable allocation: per target, options rank in {step, 2 step, ...} below break-even plus
     'dense' (cost 0, m n params); lower convex hull of (params, cost) per target; greedy along hull
     segments by slope until the budget sum params <= keep * sum m n; leftover spent on Pareto points.
  4. compress with rank / dense overrides (method whiten).
"""
from __future__ import annotations

import heapq
import os
import math
import sys
import time

sys.path.insert(0, os.environ.get("RANKCUT_OLD", "/work/ref/old"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rankcut  # noqa: E402
from rankcut.compress import compress_with_stats_, dense_stats  # noqa: E402
from rankcut.data import token_stream  # noqa: E402
from rankcut.layers import dense_weight  # noqa: E402
from rankcut.linalg import safe_cholesky  # noqa: E402
from rankcut.targets import find_targets  # noqa: E402


def whitened_svds(model, grams, damping=1e-6):
    out = {}
    for name, mod in find_targets(model).items():
        W = dense_weight(mod).detach().to(torch.float64)
        L, _ = safe_cholesky(grams[name].to(torch.float64), damping=damping)
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        Vinv = torch.linalg.solve_triangular(L.mT, Vh.mT, upper=True).mT
        out[name] = (U, S, Vinv)
    return out


def fisher_costs(model, svds, windows, batch_size=4, samples=1, seed=0):
    """Predicted single-target KL curves: {name: tensor c[r], r = 0..k} (c[k] = 0)."""
    targets = find_targets(model)
    store, hooks = {}, []
    acc = {n: 0.0 for n in targets}

    def fwd(n):
        def hook(mod, args, out):
            store[n] = [args[0].detach()]
            out.register_hook(lambda g, n=n: store[n].append(g.detach()))
        return hook

    for n, mod in targets.items():
        hooks.append(mod.register_forward_hook(fwd(n)))
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    N = 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            N += ids.numel()
            for _ in range(samples):
                store.clear()
                with torch.enable_grad():
                    lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
                    y = torch.multinomial(lp.detach().exp().reshape(-1, lp.shape[-1]), 1, generator=gen)
                    (-lp.reshape(-1, lp.shape[-1]).gather(-1, y).sum()).backward()
                with torch.no_grad():
                    for n in targets:
                        U, S, Vinv = svds[n]
                        x, g = store[n]
                        x = x.reshape(-1, x.shape[-1]).double()
                        g = g.reshape(-1, g.shape[-1]).double()
                        c = (g @ U) * (x @ Vinv.mT) * S
                        tail = c.flip(1).cumsum(1).flip(1)
                        acc[n] = acc[n] + (tail ** 2).sum(0) / samples
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return {n: torch.cat([0.5 * a / N, a.new_zeros(1)]) for n, a in acc.items()}


def _hull(points):
    pts = sorted(points)
    par = []
    for p in pts:
        if not par or p[1] < par[-1][1]:
            if par and p[0] == par[-1][0]:
                par[-1] = p
            else:
                par.append(p)
    h = []
    for p in par:
        while len(h) >= 2 and (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0]) >= (p[1] - h[-2][1]) * (h[-1][0] - h[-2][0]):
            h.pop()
        h.append(p)
    return h, par


def allocate(shapes, costs, keep, step=8):
    """shapes {name: (m, n)}, costs {name: c[r]} -> {name: rank or None (dense)}."""
    budget = keep * sum(m * n for m, n in shapes.values())
    hulls, pars = {}, {}
    for name, (m, n) in shapes.items():
        mx = math.ceil(m * n / (m + n)) - 1
        c = costs[name]
        opts = [(r * (m + n), float(c[min(r, len(c) - 1)]), r) for r in range(step, mx + 1, step)]
        opts.append((m * n, 0.0, None))
        hulls[name], pars[name] = _hull(opts)
    pos = {k: 0 for k in shapes}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise ValueError(f"keep {keep} is below the smallest plan ({used / budget * keep:.3f})")
    heap = []

    def push(k):
        i, h = pos[k], hulls[k]
        if i + 1 < len(h):
            heapq.heappush(heap, (-(h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0]), k, i))

    for k in shapes:
        push(k)
    while heap:
        _, k, i = heapq.heappop(heap)
        if i != pos[k]:
            continue
        dp = hulls[k][i + 1][0] - hulls[k][i][0]
        if used + dp <= budget:
            used += dp
            pos[k] += 1
            push(k)
    cur = {k: hulls[k][pos[k]] for k in shapes}
    while True:  # leftover budget: best cost decrease per parameter that still fits
        best = None
        for k in shapes:
            p0, c0, _ = cur[k]
            for p, c, r in pars[k]:
                if p0 < p and used + p - p0 <= budget and c < c0:
                    g = (c0 - c) / (p - p0)
                    if best is None or g > best[0]:
                        best = (g, k, (p, c, r))
        if best is None:
            break
        used += best[2][0] - cur[best[1]][0]
        cur[best[1]] = best[2]
    return {k: v[2] for k, v in cur.items()}


def overrides_for(plan):
    return {n: ({"dense": True} if r is None else {"rank": r}) for n, r in plan.items()}


def gram_and_fisher_windows(calib, tokenizer, n, f, seq_len, seed=0, sampling="first"):
    """The Gram windows exactly as rankcut picks them, and f further windows of the same text that are
    disjoint from them (the next ones for 'first', the next ones of the same permutation for 'random').
    Falls back to the Gram windows themselves when the text has no spare windows."""
    ids = token_stream(calib, tokenizer, split="train")
    avail = ids.numel() // seq_len
    chunks = ids[: avail * seq_len].view(avail, seq_len)
    if sampling == "first":
        order = torch.arange(avail)
    else:
        order = torch.randperm(avail, generator=torch.Generator().manual_seed(seed))
    gram = chunks[order[:n].sort().values]
    rest = order[n : n + f]
    fisher = chunks[rest.sort().values] if rest.numel() >= max(1, f // 2) else gram[:f]
    return gram.clone(), fisher.clone()


def fisher_kl_plan(model, tokenizer, calib, keep, calib_samples=32, seq_len=256, sampling="first",
                   fisher_windows=32, samples=1, step=8, seed=0, grams=None, timings=None):
    """The recommended policy: returns (plan, grams). Fisher windows = the first calibration windows."""
    t0 = time.perf_counter()
    cfg = rankcut.CompressConfig(method="whiten", calib_samples=calib_samples, seq_len=seq_len, sampling=sampling)
    windows, fwin = gram_and_fisher_windows(calib, tokenizer, calib_samples, fisher_windows, seq_len, cfg.seed, sampling)
    if grams is None:
        grams = dense_stats(model, "gram", windows, cfg, device="cpu", progress=False)
    t1 = time.perf_counter()
    svds = whitened_svds(model, grams)
    t2 = time.perf_counter()
    costs = fisher_costs(model, svds, fwin, samples=samples, seed=seed)
    t3 = time.perf_counter()
    shapes = {n: tuple(dense_weight(m).shape) for n, m in find_targets(model).items()}
    plan = allocate(shapes, costs, keep, step=step)
    t4 = time.perf_counter()
    if timings is not None:
        timings.update(grams=t1 - t0, svd=t2 - t1, fisher=t3 - t2, allocate=t4 - t3)
    return plan, grams


if __name__ == "__main__":
    import json
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("NTHREADS", "2")))
    path, keep = sys.argv[1], float(sys.argv[2])
    calib = sys.argv[3] if len(sys.argv) > 3 else "/work/shared/data/testbed/calib/python_calib.txt"
    heldout = sys.argv[4] if len(sys.argv) > 4 else "/work/shared/data/testbed/heldout/python_heldout.txt"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    times = {}
    plan, grams = fisher_kl_plan(model, tok, calib, keep, timings=times)
    t = time.perf_counter()
    cfg = rankcut.CompressConfig(method="whiten", calib_samples=32, seq_len=256, sampling="first", overrides=overrides_for(plan))
    summary = compress_with_stats_(model, cfg, grams, device="cpu", progress=False)
    times["compress"] = time.perf_counter() - t
    ppl = rankcut.perplexity(model, tok, heldout, seq_len=256, max_windows=24, progress=False)
    print(json.dumps({"model": path, "keep": keep, "keep_targets": summary.keep_targets, "ppl": ppl, "times": times,
                      "ndense": sum(r is None for r in plan.values()), "plan": plan}))


def spectrum_anchor_costs(model, svds, windows, rho=0.5, batch_size=8):
    """Tier 2 ('spectrum prior x one measured KL point'): per target, cost_t(r) = lam_t * rel_t(r) with
    rel_t(r) = sum_{i>=r} s_i^2 / sum s_i^2 (whitened spectrum) and lam_t = KL_t(r0) / rel_t(r0), KL_t(r0)
    the measured single-target KL(dense || target cut to r0 = floor(rho * mn/(m+n))) on `windows`
    (one partial forward from the target's block, on cached dense block inputs)."""
    sys.path.insert(0, "/work/research/alloc")
    from lib import Runner, block_index

    targets = find_targets(model)
    R = Runner(model, windows, batch_size)
    R.cache_dense()
    R.store_ref()
    costs = {}
    for name, mod in targets.items():
        U, S, Vinv = svds[name]
        s2 = S ** 2
        rel = torch.cat([s2.flip(0).cumsum(0).flip(0) / s2.sum(), s2.new_zeros(1)])
        m, n = dense_weight(mod).shape
        r0 = max(1, math.floor(rho * m * n / (m + n)))
        W0 = mod.weight.detach().clone()
        Wr = ((U[:, :r0] * S[:r0]) @ Vinv[:r0]).to(W0.dtype)
        with torch.no_grad():
            mod.weight.copy_(Wr if isinstance(mod, torch.nn.Linear) else Wr.t())
            kl = R.kl(block_index(name, R.prefix))
            mod.weight.copy_(W0)
        costs[name] = rel * (kl / max(float(rel[r0]), 1e-30))
    return costs
