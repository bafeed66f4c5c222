"""Issue 14's quality table: rankcut's low-rank factors stored quantised against weight-only quantisation of the
dense model with torchao, at equal bytes per parameter of the targets, on the CPU (DESIGN §4).

    python3 benchmarks/quant_table.py codellama-16m codegpt2-23m --json benchmarks/results/quant_table.json \\
        --plot benchmarks/results/quant_ppl_vs_bytes.png

Testbed protocol: calibration on the first 32 windows of 256 tokens of the calibration text, evaluation on the
first 24 windows of 256 tokens of the held-out text, float32 compute, 2 threads, seed 0. Every contender touches
only the targets rankcut decomposes (``rankcut.targets.find_targets``: the linear layers of the decoder blocks);
embeddings, norms and the LM head stay float32 everywhere.

Contenders, per model:

- dense float32 (reference) and dense with bf16 target weights (cast to bf16 and back: the baseline every change
  is measured against);
- torchao weight-only quantisation of the dense targets: ``Int8WeightOnlyConfig`` and ``Float8WeightOnlyConfig``
  (both run on the CPU); int4 through ``IntxWeightOnlyConfig(torch.int4, PerGroup(128))`` (affine and HQQ scale
  search; the CPU config of torchao's weight-only int4), and ``Int4WeightOnlyConfig``'s own quantiser math
  (tinygemm and HQQ qparams, group 128), which has no CPU kernel, run with torchao's quantise and dequantise
  primitives on the CPU; int3 and int2 through ``IntxWeightOnlyConfig`` for the low-byte range. GPT-2's Conv1D
  targets become ``nn.Linear`` (weight transposed) first.
- rankcut ``whiten`` at each keep, factors in bf16 (cast and back), and int8 / fp8 e4m3 / int4 (group 128) by
  :func:`rankcut.quantize.quantize_factors_` on copies of one float decomposition per keep, with and without
  error compensation. ``--check`` also runs the config route (``CompressConfig(factor_dtype=...)``) once per
  model and records whether it gives the same perplexity.

Bytes: of the target weights only (biases, identical float32 vectors in every contender, are left out of both
the bytes and the parameter count; they are recorded apart); bytes per parameter = those bytes / the number of
weight parameters of the dense targets. Dense bf16: 2 bytes a weight. Float low-rank layers: r·(m+n)·2 (bf16).
Quantised low-rank layers: :meth:`QuantLowRankLinear.nbytes` less the bias (codes + float32 scales). torchao: the
nominal bytes of the format (codes at their bit width, packed; scales; zero points where the mapping is
asymmetric); ``stored_bytes`` is what the torchao tensor holds in this run (``IntxUnpackedToInt8Tensor`` keeps
int2/3/4 codes unpacked in int8 and a zero-point tensor for the symmetric mapping too).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from torch import nn

import rankcut
from rankcut.data import calibration_windows
from rankcut.modules import LowRankLinear, QuantLowRankLinear, rankcut_modules
from rankcut.modules.dense import dense_shape
from rankcut.quantize import quantize_factors_
from rankcut.targets import find_targets, replace_module

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "testbed"
FORMATS = ("int8", "fp8", "int4")
TORCHAO = ("int8", "fp8", "int4 intx", "int4 intx hqq", "int4 tinygemm", "int4 hqq", "int3 intx", "int2 intx")


# ---------------------------------------------------------------- torchao contenders


def linearize_(model: nn.Module, names: list[str]) -> None:
    """GPT-2's Conv1D targets as nn.Linear (weight transposed, same bias): the same product, for torchao."""
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Linear):
            continue
        out_f, in_f = dense_shape(mod)
        lin = nn.Linear(in_f, out_f, bias=mod.bias is not None, dtype=mod.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(mod.weight.T)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        replace_module(model, name, lin)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def torchao_config(kind: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    if kind == "int8":
        return Int8WeightOnlyConfig(), "Int8WeightOnlyConfig() (per output channel)"
    if kind == "fp8":
        return Float8WeightOnlyConfig(), "Float8WeightOnlyConfig() (e4m3, per output channel)"
    bits = int(kind[3])
    dtype = {4: torch.int4, 3: torch.int3, 2: torch.int2}[bits]
    algo = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if kind.endswith("hqq") else IntxChooseQParamsAlgorithm.AFFINE
    cfg = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(128), intx_choose_qparams_algorithm=algo)
    return cfg, f"IntxWeightOnlyConfig(torch.int{bits}, PerGroup(128), symmetric, {algo.value})"


def torchao_quantize_(model: nn.Module, names: list[str], kind: str) -> tuple[int, int, str]:
    """Quantise the targets (already nn.Linear) in place with a torchao config; returns (nominal bytes, stored
    bytes, label). Nominal: codes at the format's bit width + scales (+ zero points when not all zero)."""
    from torchao.quantization import quantize_

    cfg, label = torchao_config(kind)
    wanted = set(names)
    quantize_(model, cfg, filter_fn=lambda mod, fqn: fqn in wanted)
    nominal = stored = 0
    bits = 8 if kind in ("int8", "fp8") else int(kind[3])
    for name in names:
        w = model.get_submodule(name).weight
        if not hasattr(w, "qdata"):
            raise RuntimeError(f"torchao left {name} unquantised ({type(w).__name__})")
        parts = {k: getattr(w, k, None) for k in ("qdata", "scale", "zero_point")}
        stored += sum(_tensor_bytes(t) for t in parts.values())
        zp = parts["zero_point"]
        nominal += math.ceil(parts["qdata"].numel() * bits / 8) + _tensor_bytes(parts["scale"])
        if zp is not None and bool((zp != 0).any()):
            nominal += _tensor_bytes(zp)
    return nominal, stored, f"torchao {label}"


def torchao_int4_dequantised_(model: nn.Module, names: list[str], algo: str) -> tuple[int, int, str]:
    """``Int4WeightOnlyConfig(group_size=128)``'s quantiser without its CUDA kernel: the qparams and rounding of
    torchao's tinygemm path (``Int4TilePackedTo4dTensor.from_hp``: bf16 weight, asymmetric uint4, bf16 scale and
    zero point per group; ``tinygemm`` min/max or ``hqq`` optimised), dequantised on the CPU with torchao's
    ``_dequantize_affine_tinygemm`` and put back as the float32 weight. Bytes: 4 bits a code + bf16 scale and
    zero point per group of 128 (as the packed tensor would hold)."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _choose_qparams_and_quantize_affine_hqq,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    group, nbytes = 128, 0
    for name in names:
        lin = model.get_submodule(name)
        W = lin.weight.detach().to(torch.bfloat16)
        out_f, in_f = W.shape
        Wp = nn.functional.pad(W, (0, (-in_f) % 1024, 0, (-out_f) % 8))  # the tile path's padding
        block = (1, group)
        if algo == "hqq":
            q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
                Wp, nbits=4, group_size=group, axis=1, compute_dtype=torch.bfloat16, device="cpu", verbose=False,
                raw_output=False)
            q = q.to(torch.int32)
        else:
            scale, zero = _choose_qparams_affine_tinygemm(
                Wp, mapping_type=MappingType.ASYMMETRIC, block_size=block, target_dtype=torch.int32, quant_min=0,
                quant_max=15, scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
            q = _quantize_affine_tinygemm(Wp, block, scale, zero, torch.int32, quant_min=0, quant_max=15)
        scale, zero = scale.reshape(Wp.shape[0], -1), zero.reshape(Wp.shape[0], -1)
        Wd = _dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(Wd[:out_f, :in_f].to(torch.float32))
        groups = out_f * (-(-in_f // group))
        nbytes += out_f * in_f // 2 + groups * 2 * 2
    label = (f"torchao Int4WeightOnlyConfig(group_size=128, {algo}) quantiser, dequantised on CPU "
             "(its int4 kernels are CUDA/XPU/NPU only)")
    return nbytes, nbytes, label


# ---------------------------------------------------------------- rankcut helpers


def cast_bf16_(modules) -> None:
    with torch.no_grad():
        for w in modules:
            w.copy_(w.to(torch.bfloat16).to(torch.float32))


def factor_bytes(model: nn.Module, dense_shapes: dict[str, tuple[int, int]]) -> tuple[int, int, list[str]]:
    """(weight bytes, bias bytes, dense names) of the targets of a compressed model: bf16 for float low-rank
    factors and any target left dense, codes + scales for quantised ones."""
    mods = rankcut_modules(model)
    weights = biases = 0
    dense = []
    for name, (m, n) in dense_shapes.items():
        mod = mods.get(name)
        if isinstance(mod, QuantLowRankLinear):
            b = _tensor_bytes(mod.bias)
            assert mod.nbytes() == mod.V.nbytes() + mod.U.nbytes() + b
            weights += mod.V.nbytes() + mod.U.nbytes()
            biases += b
        elif isinstance(mod, LowRankLinear):
            weights += mod.rank * (m + n) * 2
            biases += _tensor_bytes(mod.U.bias)
        else:
            dense.append(name)
            weights += m * n * 2
            biases += _tensor_bytes(getattr(model.get_submodule(name), "bias", None))
    return weights, biases, dense


# ---------------------------------------------------------------- the run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["codellama-16m", "codegpt2-23m"])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--torchao", nargs="*", default=list(TORCHAO), choices=TORCHAO)
    p.add_argument("--calib", default=str(D / "calib" / "python_calib.txt"))
    p.add_argument("--eval", default=str(D / "heldout" / "python_heldout.txt"))
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the config-route check (CompressConfig(factor_dtype=...)) at the first keep")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--render", action="store_true", help="only print the Markdown table (and plot) of --json")
    args = p.parse_args()
    if args.render:
        data = json.loads(Path(args.json).read_text())
        print(render(data))
        if args.plot:
            plot(data, args.plot)
        return
    torch.set_num_threads(2)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    try:
        tao_version = version("torchao")
    except Exception:  # noqa: BLE001
        tao_version = None
    out = {"command": "python3 benchmarks/quant_table.py " + " ".join(args.models), "torch": torch.__version__,
           "torchao": tao_version, "transformers": transformers.__version__, "keeps": args.keeps,
           "protocol": "calibration: first 32 windows x 256 tokens of python_calib.txt; evaluation: first 24 "
                       "windows x 256 tokens of python_heldout.txt; float32 compute, 2 threads, seed 0",
           "bytes": "target weights only (biases left out of bytes and parameter count, recorded apart)",
           "rows": [], "checks": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    for name in args.models:
        path = str(D / name) if not Path(name).is_dir() else name
        tok = transformers.AutoTokenizer.from_pretrained(path)

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

        def ppl(model) -> float:
            return rankcut.perplexity(model, tok, args.eval, seq_len=256, max_windows=24, progress=False)

        dense = load()
        dense.eval()
        targets = find_targets(dense)
        names = list(targets)
        shapes = {n: dense_shape(m) for n, m in targets.items()}
        n_params = sum(m * n for m, n in shapes.values())
        bias_bytes = sum(_tensor_bytes(getattr(m, "bias", None)) for m in targets.values())
        windows = calibration_windows(args.calib, tok, 32, 256, 0, "first")
        rows: list[dict] = []

        def add(row: dict) -> dict:
            row = {"model": name, **row}
            row["bytes_per_param"] = row["bytes"] / n_params
            base = row["ppl"] if row["label"] == "dense bf16" else next(
                (r["ppl"] for r in rows if r["label"] == "dense bf16"), None)
            row["vs_dense_bf16"] = None if base is None else row["ppl"] / base - 1
            rows.append(row)
            out["rows"].append(row)
            save()
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                     if k in ("label", "ppl", "bytes_per_param", "vs_dense_bf16", "vs_bf16_factors", "seconds")}
            print(name, shown, flush=True)
            return row

        out.setdefault("models", {})[name] = {"targets": len(names), "target_weight_params": n_params,
                                              "target_bias_bytes_float32": bias_bytes}
        t = time.time()
        add({"method": "dense", "label": "dense float32", "format": "float32", "ppl": ppl(dense),
             "bytes": 4 * n_params, "seconds": time.time() - t})
        t = time.time()
        m16 = copy.deepcopy(dense)
        cast_bf16_(m16.get_submodule(n).weight for n in names)
        add({"method": "dense", "label": "dense bf16", "format": "bf16", "ppl": ppl(m16), "bytes": 2 * n_params,
             "seconds": time.time() - t})
        del m16
        rows[0]["vs_dense_bf16"] = rows[0]["ppl"] / rows[1]["ppl"] - 1

        # torchao on the dense targets
        lin = copy.deepcopy(dense)
        linearize_(lin, names)
        if any(not isinstance(dense.get_submodule(n), nn.Linear) for n in names):
            out["models"][name]["conv1d_to_linear_ppl"] = ppl(lin)
            print(name, "Conv1D -> nn.Linear, float32:", round(out["models"][name]["conv1d_to_linear_ppl"], 4))
        for kind in args.torchao:
            t = time.time()
            model = copy.deepcopy(lin)
            note = None
            if kind in ("int4 tinygemm", "int4 hqq"):
                nominal, stored, label = torchao_int4_dequantised_(model, names, kind.split()[1])
                note = "dequantised on CPU"
            else:
                nominal, stored, label = torchao_quantize_(model, names, kind)
            add({"method": "torchao", "label": f"torchao {kind}", "format": kind, "quantizer": label,
                 "ppl": ppl(model), "bytes": nominal, "stored_bytes": stored, "note": note,
                 "seconds": time.time() - t})
            del model
        del lin

        # rankcut: one float decomposition per keep, quantised copies
        for i, keep in enumerate(args.keeps):
            config = rankcut.CompressConfig(method="whiten", keep=keep, calib_samples=32, seq_len=256,
                                            sampling="first")
            t = time.time()
            base = copy.deepcopy(dense)
            summary = rankcut.compress_(base, config, calib=args.calib, tokenizer=tok, progress=False)
            compress_s = time.time() - t
            weights, biases, left = factor_bytes(base, shapes)
            common = {"method": "rankcut", "keep": keep, "keep_targets": summary.keep_targets,
                      "dense_targets": left, "compress_s": compress_s}
            t = time.time()
            add({**common, "label": f"rankcut whiten keep {keep} float32", "format": "float32", "compensated": None,
                 "ppl": ppl(base), "bytes": 2 * weights, "seconds": time.time() - t})
            t = time.time()
            m16 = copy.deepcopy(base)
            cast_bf16_([w for mod in rankcut_modules(m16).values() for w in (mod.U.weight, mod.V.weight)])
            ref = add({**common, "label": f"rankcut whiten keep {keep} bf16", "format": "bf16", "compensated": None,
                       "ppl": ppl(m16), "bytes": weights, "seconds": time.time() - t})
            del m16
            for fmt in args.formats:
                for compensate in (False, True):
                    t = time.time()
                    model = copy.deepcopy(base)
                    quantize_factors_(model, fmt, 128, windows if compensate else None, compensate, progress=False)
                    qbytes, _, qleft = factor_bytes(model, shapes)
                    value = ppl(model)
                    add({**common, "label": f"rankcut whiten keep {keep} {fmt}" + (" comp" if compensate else ""),
                         "format": fmt, "compensated": compensate, "ppl": value, "bytes": qbytes,
                         "dense_targets": qleft, "vs_bf16_factors": value / ref["ppl"] - 1,
                         "seconds": time.time() - t})
                    if args.check and i == 0 and fmt == args.formats[0] and compensate:
                        t = time.time()
                        direct = load()
                        cfg = rankcut.CompressConfig(method="whiten", keep=keep, calib_samples=32, seq_len=256,
                                                     sampling="first", factor_dtype=fmt, factor_group=128,
                                                     compensate=True)
                        rankcut.compress_(direct, cfg, calib=args.calib, tokenizer=tok, progress=False)
                        same_codes = all(
                            torch.equal(a.V.codes.view(torch.uint8), b.V.codes.view(torch.uint8))
                            and torch.equal(a.U.codes.view(torch.uint8), b.U.codes.view(torch.uint8))
                            and torch.equal(a.V.scale, b.V.scale) and torch.equal(a.U.scale, b.U.scale)
                            for a, b in zip(rankcut_modules(direct).values(), rankcut_modules(model).values()))
                        check = {"model": name, "keep": keep, "format": fmt, "compensated": True,
                                 "config_route_ppl": ppl(direct), "copy_route_ppl": value,
                                 "identical_codes_and_scales": same_codes, "seconds": time.time() - t}
                        check["same_ppl"] = check["config_route_ppl"] == value
                        out["checks"].append(check)
                        save()
                        print(name, "check", check, flush=True)
                        del direct
                    del model
            del base
        del dense
    save()
    print(render(out))
    if args.plot:
        plot(out, args.plot)


# ---------------------------------------------------------------- output


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.2f} %"


def render(data: dict) -> str:
    """One Markdown table per model: every point with its bytes per parameter, sorted by bytes."""
    parts = []
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        rows = sorted((r for r in data["rows"] if r["model"] == model), key=lambda r: -r["bytes_per_param"])
        lines = [f"**{model}**", "", "| contender | bytes / param | perplexity | vs dense bf16 | vs bf16 factors |",
                 "|---|---|---|---|---|"]
        for r in rows:
            label = r["label"].replace("rankcut whiten ", "rankcut ").replace(" comp", " (compensated)")
            if r.get("note"):
                label += f" ({r['note']})"
            lines.append(f"| {label} | {r['bytes_per_param']:.3f} | {r['ppl']:.3f} | {_pct(r['vs_dense_bf16'])} "
                         f"| {_pct(r.get('vs_bf16_factors'))} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


COLORS = {"bf16": "tab:blue", "int8": "tab:orange", "fp8": "tab:green", "int4": "tab:red"}
FMT_MARKERS = {"bf16": "o", "int8": "s", "fp8": "D", "int4": "o"}
MARKERS = {"int8": "s", "fp8": "D", "int4 intx": "v", "int4 intx hqq": "^", "int4 tinygemm": "<", "int4 hqq": ">",
           "int3 intx": "p", "int2 intx": "X"}


def plot(data: dict, path: str) -> Path:
    """Perplexity against bytes per parameter of the targets, one panel per model (log y)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in data["rows"] if r["model"] == model]
        bf16 = next(r for r in rows if r["label"] == "dense bf16")
        f32 = next((r for r in rows if r["label"] == "dense float32"), None)
        ax.plot([bf16["bytes_per_param"]], [bf16["ppl"]], "k*", ms=12, label="dense bf16", zorder=5)
        if f32:
            ax.axhline(f32["ppl"], color="k", lw=0.6, ls=":", label=f"dense float32 ({f32['ppl']:.2f}, 4 B)")
        for r in (r for r in rows if r["method"] == "torchao"):
            ax.plot([r["bytes_per_param"]], [r["ppl"]], MARKERS.get(r["format"], "o"), color="0.35", ms=7,
                    mfc="none", mew=1.5, label=r["label"] + (" (deq. CPU)" if r.get("note") else ""))
        for fmt, color in COLORS.items():
            for comp, style in ((True, "-"), (False, "--"), (None, "-")):
                pts = sorted(((r["bytes_per_param"], r["ppl"], r["keep"]) for r in rows if r["method"] == "rankcut"
                              and r["format"] == fmt and r["compensated"] is comp), key=lambda p: p[0])
                if not pts:
                    continue
                label = f"rankcut {fmt}" + {True: " compensated", False: " naive", None: ""}[comp]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=FMT_MARKERS[fmt], ms=4, color=color,
                        lw=2.6 if fmt == "int8" else 1.3, alpha=0.55 if comp is False else 1.0, label=label)
                if comp is not False:
                    for x, y, k in pts:
                        ax.annotate(f"{k:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                    color=color)
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter, NullLocator

        low, high = min(r["ppl"] for r in rows), max(r["ppl"] for r in rows)
        ticks, step = [], (high / low) ** (1 / 9)  # about ten labels, evenly spread on the log axis
        for t in (7, 7.5, 8, 8.5, 9, 9.5, 10, 11, 12, 13, 14, 15, 17.5, 20, 25, 30, 40, 50, 70, 100):
            if low / 1.1 <= t <= high * 1.1 and (not ticks or t / ticks[-1] >= step):
                ticks.append(t)
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticks(ticks)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("bytes per parameter of the targets (codes + scales)")
        ax.set_ylabel("perplexity (held-out, 24 x 256)")
        ax.set_title(model)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=6, ncol=2)
    version_ = data.get("torchao")
    fig.suptitle(f"rankcut whiten + quantised factors vs torchao {version_} weight-only quantisation (CPU, float32 "
                 "compute)\nrankcut points labelled by keep; dashed: without compensation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    main()
