"""Final table: every policy's plan (chosen on dev / calibration only) evaluated on eval, dev and devc."""
import copy, sys
from lib import *
from alloc import allocate
from policies import curve_cost
from fisher import fisher_curves
from evalplans import Evaluator
from rankcut.compress import compress_with_stats_
name = sys.argv[1]
E = Evaluator(name); T = E.T
for p in E.model.parameters():
    p.requires_grad_(False)
fis = load_json(f"fisher_{name}_32_2.json")["curves"]
fp = {(r["keep"], r["policy"]): r["ranks"] for r in load_json(f"fisherpol_{name}_fisher_{name}_32_2.json")["results"]}
gp = {(r["keep"], r["policy"]): r["ranks"] for r in load_json(f"gridpol_{name}.json")}
ca = {(r["keep"], r["iter"]): r["ranks"] for r in load_json(f"canchor_{name}_32_2.json")["rows"]}
sw = {(r["keep"], r["policy"]): r["ranks"] for r in load_json(f"swaps_{name}.json")} if os.path.exists(f"{OUTDIR}/swaps_{name}.json") else {}
gcurves, _ = fisher_curves(E.model, T, E.data.calib(32), samples=1, seed=0, emp=False)
plans = {}
for keep in (0.8, 0.6):
    P = {}
    P["uniform"] = T.uniform(keep)
    P["rel-spectrum (step 1)"] = fp[(keep, "rel")]
    P["rel-spectrum (step 8)"] = allocate(T, curve_cost(fis, "rel"), keep, step=8)
    P["abs-spectrum"] = fp[(keep, "abs")]
    P["measured dNLL, 8 win (probe-like)"] = gp[(keep, "grid_dnll8")]
    P["measured dNLL, 64 win"] = gp[(keep, "grid_dnll64")]
    P["measured KL grid, 8 win"] = gp[(keep, "grid_kl8")]
    P["measured KL grid, 64 win"] = gp[(keep, "grid_kl64")]
    P["rel prior x 1 KL point (rho .5)"] = gp[(keep, "rel_anchor0.5")]
    P["Fisher diag (channel)"] = fp[(keep, "diag")]
    P["Fisher seq"] = fp[(keep, "seq")]
    P["Fisher tok, empirical labels"] = fp[(keep, "emp_tok")]
    P["Fisher tok, 2 samples, step 1"] = fp[(keep, "tok")]
    P["Fisher tok, no dense option"] = allocate(T, curve_cost(fis, "tok"), keep, step=8, allow_dense=False)
    P["Fisher tok on Gram windows"] = allocate(T, curve_cost(gcurves, "tok"), keep, step=8)
    P["RECOMMENDED Fisher tok (32 disjoint win, 1 sample, step 8)"] = ca[(keep, 0)]
    P["Fisher tok x KL point (rho .3)"] = gp[(keep, "tok_anchor0.3")]
    P["+ in-context anchors (2 iters)"] = ca[(keep, 2)]
    if sw:
        P["+ validated swaps (40 evals)"] = sw[(keep, "tok+swaps")]
    plans[keep] = P
out = {"model": name, "dense": {s: E.ppl({}, s) for s in ("eval", "dev", "devc")}, "rows": []}
print(name, "dense", {k: round(v, 3) for k, v in out["dense"].items()}, flush=True)
for keep, P in plans.items():
    for label, ranks in P.items():
        row = {"keep": keep, "policy": label, "keep_of": T.keep_of(ranks), "ndense": sum(r is None for r in ranks.values()), "ranks": ranks}
        for s in ("eval", "dev", "devc"):
            row[s] = E.ppl(ranks, s)
        out["rows"].append(row)
        print(f"{keep} {label:58s} keep={row['keep_of']:.4f} dense={row['ndense']:2d} eval={row['eval']:.3f} dev={row['dev']:.3f} devc={row['devc']:.3f}", flush=True)
    save(f"final_{name}.json", out)
# library-path check of the recommended plan: rankcut compress_with_stats_ with overrides + rankcut.perplexity
grams = grams_for(E.model, E.data)
for keep in (0.8, 0.6):
    ranks = plans[keep]["RECOMMENDED Fisher tok (32 disjoint win, 1 sample, step 8)"]
    m2 = copy.deepcopy(E.model)
    ov = {n: ({"dense": True} if r is None else {"rank": r}) for n, r in ranks.items()}
    s = compress_with_stats_(m2, config(overrides=ov), grams, device="cpu", progress=False)
    ppl = rankcut.perplexity(m2, E.tok, HELDOUT if name != "stories" else WIKI, seq_len=256, max_windows=24, progress=False)
    out.setdefault("library_check", {})[str(keep)] = {"keep_targets": s.keep_targets, "ppl": ppl}
    print("library path", keep, s.keep_targets, ppl, flush=True)
save(f"final_{name}.json", out)
