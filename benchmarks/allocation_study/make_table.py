from lib import load_json
fin = {m: load_json(f"final_{m}.json") for m in ("codellama", "codegpt2", "stories")}
labels = [r["policy"] for r in fin["codellama"]["rows"] if r["keep"] == 0.8]
lines = ["| policy | " + " | ".join(f"{m} {k} eval (dev)" for m in fin for k in (0.8, 0.6)) + " |", "|---|" + "---|" * 6]
for lab in labels:
    cells = []
    for m in fin:
        for k in (0.8, 0.6):
            r = [x for x in fin[m]["rows"] if x["policy"] == lab and x["keep"] == k]
            cells.append(f"{r[0]['eval']:.3f} ({r[0]['dev']:.2f})" if r else "–")
    lines.append(f"| {lab} | " + " | ".join(cells) + " |")
lines.append("| dense | " + " | ".join(f"{fin[m]['dense']['eval']:.3f} ({fin[m]['dense']['dev']:.2f})" for m in fin for k in (0.8, 0.6)) + " |")
open("results/summary_table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
