"""Issue 14, speed half of the side-by-side table: batch-1 decode tokens/s on the H200 of the dense bf16 model,
torchao weight-only int8 / fp8 / int4 of the dense model, and rankcut low-rank at keep 0.8 / 0.6 / 0.5 with bf16,
int8, fp8 and int4 factors — every contender of one shape in one process, through rankcut's decode loop (static
KV cache, one CUDA-graph step; random weights: speed does not depend on their values).

    python3 benchmarks/quant_speed.py --shapes llama2-7b llama3-8b --json results/quant_speed.json

torchao contenders run as torchao documents them for speed: the decode step compiled with ``torch.compile``
(inductor fuses the dequantisation into the matrix-vector product), then captured in the same CUDA graph; their
projections are not fused (q/k/v, gate/up separate: torchao's tensor subclasses cannot be concatenated). A
torchao contender that fails to build or compile is reported with its error, not left out silently. Bytes are
those a step reads: codes + scales of every projection, the LM head, norms, one embedding row (rankcut's
``weight_bytes``; torchao's inner tensors counted the same way).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback

import torch

from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import time_decode
from rankcut.bench.models import preset_config, random_lowrank_, random_model, weight_bytes
from rankcut.bench.timing import copy_bandwidth
from rankcut.quantize import quantize_factors_
from rankcut.targets import find_targets

TORCHAO = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig", "int4": "Int4WeightOnlyConfig"}


def _inner_bytes(t: torch.Tensor) -> int:
    """Bytes of a (possibly tensor-subclass) weight: its inner tensors, recursively."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_inner_bytes(getattr(t, n)) for n in names)


def step_bytes(model) -> int:
    """Bytes one decode step reads: rankcut's ``weight_bytes`` for plain tensors, and a torchao weight by its inner
    tensors (codes, scales, zero points; a wrapper subclass has no storage of its own to deduplicate by)."""
    plain = lambda t: type(t) in (torch.Tensor, torch.nn.Parameter)  # noqa: E731
    if all(plain(p) for p in model.parameters()):
        return weight_bytes(model)
    head = model.get_output_embeddings()
    tables = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)} - {head.weight.data_ptr()}
    total, seen = 0, set()
    for p in model.parameters():
        if not plain(p):
            total += _inner_bytes(p)
        elif p.data_ptr() not in seen and p.data_ptr() not in tables:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def torchao_quantize(model, fmt: str) -> str:
    import torchao
    from torchao.quantization import quantize_

    cfg = getattr(__import__("torchao.quantization", fromlist=[TORCHAO[fmt]]), TORCHAO[fmt])
    # int4: the tile-packed format runs PyTorch's own tinygemm kernel (the default "plain" one needs mslk)
    options = {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"} if fmt == "int4" else {}
    targets = set(find_targets(model))
    quantize_(model, cfg(**options), filter_fn=lambda module, name: name in targets)
    return f"torchao {torchao.__version__} {TORCHAO[fmt]}({', '.join(f'{k}={v!r}' for k, v in options.items())})"


_LINEAR = None


def compile_linears(model) -> None:
    """torchao's speed comes from inductor fusing the dequantisation into the product: every quantised projection
    calls one compiled ``F.linear`` (recompiled per weight shape, a handful per model). The rest of the step (norms,
    rotary, attention) stays rankcut's, as for every other contender."""
    global _LINEAR
    if _LINEAR is None:
        torch._dynamo.config.cache_size_limit = 64
        _LINEAR = torch.compile(torch.nn.functional.linear, dynamic=False)
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and type(w) not in (torch.Tensor, torch.nn.Parameter):
            module.forward = lambda x, m=module: _LINEAR(x, m.weight, m.bias)


def run_one(shape: str, kind: str, fmt: str | None, keep: float | None, args) -> dict:
    torch.manual_seed(0)
    model = random_model(preset_config(shape), torch.bfloat16, "cuda")
    label = {"dense": "dense bf16", "torchao": f"torchao {fmt}", "rankcut": f"rankcut keep {keep} {fmt or 'bf16'}"}[kind]
    row = {"shape": shape, "contender": label, "kind": kind, "format": fmt or "bf16", "keep": keep}
    fuse = kind != "torchao"
    if kind == "torchao":
        row["quantizer"] = torchao_quantize(model, fmt)
    if kind == "rankcut":
        random_lowrank_(model, keep)
        if fmt is not None:
            quantize_factors_(model, fmt, 128, compensate=False, progress=False)
    if kind == "torchao":
        compile_linears(model)
        row["compiled"] = "each quantised projection's F.linear, torch.compile(dynamic=False)"
    decoder = make_decoder(model, 1, args.prompt_len + args.new_tokens, fuse=fuse)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device="cuda")
    res = time_decode(decoder, prompt, args.new_tokens, args.repeats, None, False)
    row.update(tokens_per_s=res["tokens_per_s"], ms_per_token=res["ms_per_token"], weight_bytes=step_bytes(model),
               kv_cache_bytes=decoder.kv_bytes())
    del decoder, model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def target_params(shape: str) -> int:
    """Parameters of the decoder projections (the targets) of a shape."""
    cfg = preset_config(shape)
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    return L * (2 * h * h + 2 * h * kv + 3 * h * f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"])
    p.add_argument("--keeps", type=float, nargs="*", default=[0.8, 0.6, 0.5])
    p.add_argument("--formats", nargs="*", default=["bf16", "int8", "fp8", "int4"])
    p.add_argument("--torchao", nargs="*", default=["int8", "fp8", "int4"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quant-elems", type=int)
    p.add_argument("--quant-warps", type=int)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    from rankcut.kernels import dispatch

    if args.quant_elems:
        dispatch.QUANT_ELEMS = args.quant_elems
    if args.quant_warps:
        dispatch.QUANT_WARPS = args.quant_warps
    out = {"command": "python3 benchmarks/quant_speed.py " + " ".join(__import__("sys").argv[1:]),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": 1,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": "bfloat16",
           "copy_bandwidth_bytes_per_s": copy_bandwidth("cuda"), "quant_elems": dispatch.QUANT_ELEMS,
           "quant_warps": dispatch.QUANT_WARPS, "rows": []}
    for shape in args.shapes:
        plan = [("dense", None, None)] + [("torchao", f, None) for f in args.torchao]
        plan += [("rankcut", None if f == "bf16" else f, k) for k in args.keeps for f in args.formats]
        dense = None
        for kind, fmt, keep in plan:
            start = time.perf_counter()
            try:
                row = run_one(shape, kind, fmt, keep, args)
            except Exception as err:  # noqa: BLE001 - a contender that cannot run is reported
                row = {"shape": shape, "contender": f"{kind} {fmt} {keep}", "error": f"{type(err).__name__}: {err}",
                       "trace": traceback.format_exc()[-1500:]}
                gc.collect()
                torch.cuda.empty_cache()
            row["wall_s"] = time.perf_counter() - start
            row["target_params"] = target_params(shape)
            if "tokens_per_s" in row:
                if kind == "dense":
                    dense = row
                if dense is not None:
                    row["speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]
                    row["bound"] = dense["weight_bytes"] / row["weight_bytes"]
                    row["fraction_of_bound"] = row["speedup"] / row["bound"]
                print(f"{shape:10} {row['contender']:28} {row['tokens_per_s']:8.1f} tok/s  "
                      f"{row['weight_bytes'] / 1e9:6.2f} GB  x{row.get('speedup', 1):.3f} "
                      f"(bound x{row.get('bound', 1):.3f}, {row.get('fraction_of_bound', 1):.1%})  {row['wall_s']:.0f}s",
                      flush=True)
            else:
                print(f"{shape:10} {row['contender']:28} FAILED {row['error'][:200]}", flush=True)
            out["rows"].append(row)
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
