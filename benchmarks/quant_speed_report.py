"""Issue 14: the speed table and the tokens/s-against-bytes plot from quant_speed.py's results (H200).

    python3 benchmarks/quant_speed_report.py benchmarks/results/quant/quant_speed_rankcut.json \
        benchmarks/results/quant/quant_speed_torchao.json --plot benchmarks/results/quant/quant_tps_vs_bytes.png

Bytes per parameter = bytes the step reads for the decoder projections (the targets: codes + scales, or bf16) /
the dense targets' parameters; the rest of the step (LM head, norms, one embedding row) is the dense run's bytes
less its targets' bf16 bytes, the same for every contender. Each run's speedups are against the dense row of the
same run (the file it comes from).
"""

import argparse
import json


def rows(path: str) -> list[dict]:
    data = json.load(open(path))
    out, dense = [], {}
    for r in data["rows"]:
        if "tokens_per_s" not in r:
            continue
        if r["weight_bytes"] <= 0:  # the first torchao rows of the rankcut run: bytes miscounted (see BENCHMARKS)
            print(f"(left out: {path}: {r['shape']} {r['contender']} {r['tokens_per_s']:.1f} tok/s, bytes miscounted)")
            continue
        if r["kind"] == "dense":
            dense[r["shape"]] = r
        base = dense[r["shape"]]
        rest = base["weight_bytes"] - 2 * base["target_params"]
        r = dict(r, bytes_per_param=(r["weight_bytes"] - rest) / r["target_params"], source=path,
                 dense_tokens_per_s=base["tokens_per_s"])
        out.append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--plot")
    args = p.parse_args()
    table = [r for path in args.results for r in rows(path)]
    for shape in dict.fromkeys(r["shape"] for r in table):
        print(f"\n**{shape}** (H200, bf16 activations, batch 1, prompt 128, 256 new tokens)\n")
        print("| contender | bytes / param | GB / step | tok/s | speedup | bound | of bound | dense tok/s (same run) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sorted((r for r in table if r["shape"] == shape), key=lambda r: -r["bytes_per_param"]):
            print(f"| {r['contender']} | {r['bytes_per_param']:.3f} | {r['weight_bytes'] / 1e9:.2f} | "
                  f"{r['tokens_per_s']:.1f} | {r['speedup']:.3f}x | {r['bound']:.3f}x | {r['fraction_of_bound']:.1%} | "
                  f"{r['dense_tokens_per_s']:.1f} |")
    if args.plot:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = list(dict.fromkeys(r["shape"] for r in table))
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            mine = [r for r in table if r["shape"] == shape]
            for r in mine:
                if r["kind"] != "rankcut":
                    ax.scatter(r["bytes_per_param"], r["tokens_per_s"], marker="s" if r["kind"] == "dense" else "^",
                               color="black" if r["kind"] == "dense" else "grey", zorder=3)
                    ax.annotate(r["contender"], (r["bytes_per_param"], r["tokens_per_s"]), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
            for fmt, color in (("bf16", "C0"), ("int8", "C1"), ("fp8", "C2"), ("int4", "C3")):
                pts = sorted((r["bytes_per_param"], r["tokens_per_s"], r["keep"]) for r in mine
                             if r["kind"] == "rankcut" and r["format"] == fmt)
                if pts:
                    ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", color=color,
                            label=f"rankcut {fmt} factors (keep 0.5/0.6/0.8)")
            base = next(r for r in mine if r["kind"] == "dense")
            rest, P = base["weight_bytes"] - 2 * base["target_params"], base["target_params"]
            xs = [0.25 + 0.05 * i for i in range(36)]
            ax.plot(xs, [base["tokens_per_s"] * base["weight_bytes"] / (rest + x * P) for x in xs], ":",
                    color="black", lw=0.8, label="bound: dense tok/s x dense bytes / bytes")
            ax.set_xscale("log")
            ax.set_xticks([0.25, 0.5, 1.0, 2.0], ["0.25", "0.5", "1", "2"])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("bytes per parameter of the projections")
            ax.set_ylabel("decode tokens/s (batch 1)")
            ax.set_title(f"{shape}, H200, bf16 activations")
            ax.grid(alpha=0.3, which="both")
            ax.set_ylim(0, max(r["tokens_per_s"] for r in mine) * 1.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=130)


if __name__ == "__main__":
    main()
