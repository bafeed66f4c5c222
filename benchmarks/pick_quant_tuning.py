"""Pick the quantised kernels' tile size and warps from a quant_layer_bench.py run: the (elems, warps) with the
least summed M = 1 time of the int8 and fp8 rows over every shape. Prints ``--quant-elems E --quant-warps W``."""
import json
import sys

rows = json.load(open(sys.argv[1]))["rows"]
total: dict = {}
for r in rows:
    if r.get("m") == 1 and r.get("format") in ("int8", "fp8") and "magic=1" in r["variant"]:
        key = (r["elems"], r["warps"])
        total[key] = total.get(key, 0.0) + r["us"]
best = min(total, key=total.get)
print(f"--quant-elems {best[0]} --quant-warps {best[1]}")
print(json.dumps({f"{k[0]}/{k[1]}": round(v, 2) for k, v in sorted(total.items())}), file=sys.stderr)
