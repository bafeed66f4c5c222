"""Cost model vs measurement (issue #4, item 4): predicted time of each benchmarked layer and of each decode
step from :mod:`rankcut.cost` (constants :data:`~rankcut.cost.H200_BF16`, fitted on the layer
benchmark), against the measured figures in ``benchmarks/results``.

A decode step is predicted as: the projections (launch units as the decode step runs them), the LM head, the
small kernels measured alone in the layer benchmark (per block: two add+RMSNorm, rotary + KV write, SiLU·up,
attention over the KV cache), and every remaining kernel of the step (embedding, rotary tables, mask, argmax,
copies; counted by the profiler) at the graph launch floor::

    PYTHONPATH=$PWD python benchmarks/cost_model.py --results benchmarks/results --json benchmarks/results/cost_model.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rankcut.units import uniform_rank
from rankcut import cost
from rankcut.bench.models import preset_config

PROJ = ("nvjet", "splitKreduce", "gemv", "_p1_", "_p2_")
PER_BLOCK = ("_add_rmsnorm_kernel", "_rope_cache_kernel", "_silu_mul_kernel", "sdpa")


def llama_rows(cfg, keep: float | None) -> list[tuple[str, int, int, int | None]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    shapes = {"self_attn.q_proj": (cfg.num_attention_heads * d, h), "self_attn.k_proj": (cfg.num_key_value_heads * d, h),
              "self_attn.v_proj": (cfg.num_key_value_heads * d, h), "self_attn.o_proj": (h, cfg.num_attention_heads * d),
              "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    rows = []
    for layer in range(cfg.num_hidden_layers):
        for name, (m, n) in shapes.items():
            r = None if keep is None else uniform_rank(m, n, keep)
            rows.append((f"model.layers.{layer}.{name}", m, n, r))
    return rows


def predict_decode(run: dict, shape: str, keep: float | None, glue: dict, floor: float) -> dict:
    cfg = preset_config(shape)
    rows = llama_rows(cfg, keep)
    tag = "llama2" if cfg.num_key_value_heads == cfg.num_attention_heads else "llama3"
    per_block = 2 * glue["add_rmsnorm"] + glue[f"rope_cache_{tag}"] + glue[f"silu_mul_{tag}"] + glue[f"sdpa_{tag}"]
    names = run["kernel_names"]
    other = sum(c for n, c in names.items() if not any(p in n for p in PROJ) and not any(p in n for p in PER_BLOCK))
    other += names.get("_add_rmsnorm_kernel", 0) - 2 * cfg.num_hidden_layers  # the final norm
    t_targets = cost.targets_time(rows)
    t_head = cost.dense_time(cfg.vocab_size, cfg.hidden_size)
    t_glue = cfg.num_hidden_layers * per_block + other * floor
    return {"targets_ms": t_targets * 1e3, "head_ms": t_head * 1e3, "glue_ms": t_glue * 1e3,
            "predicted_ms": (t_targets + t_head + t_glue) * 1e3, "measured_ms": run["ms_per_token"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--json")
    args = ap.parse_args()
    res = Path(args.results)
    layer = json.loads((res / "layer_bench.json").read_text())
    glue, floor = layer["glue_s"], layer["launch_floor_s"]["grid_132"]
    out = {"profile": cost.H200_BF16.to_dict(), "layers": [], "decode": []}
    print("| shape | rank | dense µs (pred / meas) | low-rank µs (pred / meas) |\n|---|---|---|---|")
    for p in layer["points"]:
        if p["rows"] != 1:
            continue
        pd, pl = cost.dense_time(p["m"], p["n"]), cost.lowrank_time(p["m"], p["n"], p["rank"])
        out["layers"].append({"m": p["m"], "n": p["n"], "rank": p["rank"], "dense_pred_s": pd, "dense_s": p["dense_s"],
                              "lowrank_pred_s": pl, "lowrank_s": p["kernel_s"]})
        print(f"| {p['m']}×{p['n']} | {p['rank']} | {pd * 1e6:.1f} / {p['dense_s'] * 1e6:.1f} | "
              f"{pl * 1e6:.1f} / {p['kernel_s'] * 1e6:.1f} |")
    print("\n| model | keep | predicted ms/token (targets + head + small kernels) | measured | error |\n|---|---|---|---|---|")
    for shape in ("llama2-7b", "llama3-8b"):
        for keep in (0.5, 0.8):
            data = json.loads((res / f"decode_{shape}_keep{keep}.json").read_text())
            for role, k in (("baseline", None), ("model", keep)):
                row = predict_decode(data[role], shape, k, glue, floor)
                row.update(shape=shape, keep=k, pair=keep)
                out["decode"].append(row)
                print(f"| {shape} | {k or 'dense'} (pair {keep}) | {row['predicted_ms']:.3f} ({row['targets_ms']:.3f} + "
                      f"{row['head_ms']:.3f} + {row['glue_ms']:.3f}) | {row['measured_ms']:.3f} | "
                      f"{row['predicted_ms'] / row['measured_ms'] - 1:+.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
