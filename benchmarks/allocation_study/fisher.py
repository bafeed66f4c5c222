"""Gradient (Fisher) statistics per target, turned into predicted KL curves over every rank.

For target t with whitened SVD W L = U S Vh and Vinv = Vh L^{-1}, cutting to rank r changes the output by
dy = sum_{i>=r} s_i u_i (vinv_i . x). With g = d(sum of log-lik)/dy (labels sampled from the dense model,
so E[g g^T] is the Fisher), the second-order KL is 1/2 E[(sum_t g_t . dy_t)^2] / N.
Estimators (all over every r at once):
  seq : per-sequence square of the summed first-order term (unbiased Fisher form)
  tok : per-token squares (drops cross-position terms)
  diag: output-channel diagonal Fisher f_o = E[g_o^2] times sigma_i^2 |sqrt(f) . u_i|^2 (assumes whitened inputs)
Also the same with the true labels (empirical Fisher: 'emp_*').
"""
import sys
from lib import *


def fisher_curves(model, T, windows, samples=2, bs=4, emp=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    names = T.names
    acc = {n: {} for n in names}
    store = {}
    hooks = []

    def fwd(n):
        def hook(mod, args, out):
            store[n] = {"x": args[0].detach()}
            out.register_hook(lambda g, n=n: store[n].__setitem__("g", g.detach()))
        return hook

    for n in names:
        hooks.append(T.mods[n].register_forward_hook(fwd(n)))
    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    N = 0
    kinds = [("s", i) for i in range(samples)] + ([("e", 0)] if emp else [])
    try:
        for start in range(0, windows.shape[0], bs):
            ids = windows[start : start + bs]
            B, Tn = ids.shape
            N += B * Tn
            for kind, si in kinds:
                store.clear()
                with torch.enable_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
                    lp = F.log_softmax(logits.float(), -1)
                    if kind == "s":
                        y = torch.multinomial(lp.detach().exp().reshape(-1, lp.shape[-1]), 1, generator=gen).view(B, Tn)
                        loss = -lp.gather(-1, y[..., None]).sum()
                    else:
                        loss = -lp[:, :-1].gather(-1, ids[:, 1:, None]).sum()
                    loss.backward()
                pre = "" if kind == "s" else "emp_"
                w = 1.0 / samples if kind == "s" else 1.0
                with torch.no_grad():
                    for n in names:
                        U, S, Vinv = T.svd[n]
                        x = store[n]["x"].reshape(-1, store[n]["x"].shape[-1]).double()
                        g = store[n]["g"].reshape(-1, store[n]["g"].shape[-1]).double()
                        c = (g @ U) * (x @ Vinv.mT) * S  # N x k first-order terms per singular direction
                        tail = c.flip(1).cumsum(1).flip(1)  # tail[:, r] = sum_{i>=r}
                        seq = tail.view(B, Tn, -1).sum(1)
                        a = acc[n]
                        for key, val in ((pre + "tok", (tail ** 2).sum(0)), (pre + "seq", (seq ** 2).sum(0)), (pre + "f", (g ** 2).sum(0))):
                            a[key] = a.get(key, 0) + w * val
                        if kind == "s" and si == 0:
                            a["xx"] = a.get("xx", 0) + ((x @ Vinv.mT) ** 2).sum(0)  # check of whiteness
                model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        U, S, Vinv = T.svd[n]
        a = acc[n]
        curves = {}
        for pre in ("", "emp_") if emp else ("",):
            curves[pre + "seq"] = (0.5 * a[pre + "seq"] / N)
            curves[pre + "tok"] = (0.5 * a[pre + "tok"] / N)
            wdir = (a[pre + "f"][:, None] * U ** 2).sum(0)  # |sqrt(f) . u_i|^2
            e = S ** 2 * wdir
            curves[pre + "diag"] = 0.5 * e.flip(0).cumsum(0).flip(0) / N
        s2 = S ** 2
        curves["rel"] = s2.flip(0).cumsum(0).flip(0) / s2.sum()
        curves["abs"] = s2.flip(0).cumsum(0).flip(0)
        # append r = k (nothing cut) -> 0
        out[n] = {k: torch.cat([v, v.new_zeros(1)]).tolist() for k, v in curves.items()}
        out[n]["white_dev"] = float((a["xx"] / a["xx"].mean() - 1).abs().mean())
    return out, N


if __name__ == "__main__":
    name = sys.argv[1]; nwin = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    model, tok = load(name); data = Data(name, tok)
    for p in model.parameters():
        p.requires_grad_(False)
    grams = grams_for(model, data); T = Targets(model, grams)
    ck = Clock()
    curves, N = fisher_curves(model, T, data.score(nwin), samples=samples)
    t = ck()
    print("fisher time", t, "tokens", N)
    save(f"fisher_{name}_{nwin}_{samples}.json", {"model": name, "nwin": nwin, "samples": samples, "time": t, "curves": curves})
