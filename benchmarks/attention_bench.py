"""Decode attention at one query token (issue #15): what a layer of the decode step spends on rotary embedding,
cache write and attention, for three implementations.

- ``sdpa``: rankcut's rotary + cache-write kernel, then ``F.scaled_dot_product_attention`` over the whole static
  cache with an additive mask (the decode step before the split-KV kernel, ``--attention sdpa``);
- ``flex``: the same rotary kernel, then PyTorch's FlexAttention (``torch.compile``-d; its decoding path for
  short queries), GQA native, the causal limit as a ``score_mod`` reading the position tensor (so one compiled
  call serves every step, as a CUDA graph needs; every block of the static cache is read);
  ``flex-blockmask``: FlexAttention with a block mask built for this position (only the filled blocks read: its
  best case, though a real loop would rebuild the mask each step);
- ``split``: rankcut's one-launch kernel (:mod:`rankcut.kernels.attention`: rotary, cache write and split-KV
  attention over the filled slots).

Each point is the median per-layer time of a replayed CUDA graph over 32 layers' caches (a different cache per
call, so the reads come from HBM), checked against a float64 reference. KV GB/s = bytes of the filled slots /
time.

Example::

    PYTHONPATH=$PWD python benchmarks/attention_bench.py --json benchmarks/results/attention_bench.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.nn import functional as F

from rankcut.bench.timing import graph_time
from rankcut.kernels import glue
from rankcut.kernels.attention import DecodeAttention
from rankcut.utils import environment

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}
#: (static cache length, position of the new token)
POINTS = [(384, 255), (384, 383), (4096, 2047), (4096, 4095)]


def reference(qkv, cos, sin, kc, vc, pos, H, HKV, D):
    """Float64 attention of the one new token (rotated in fp32 and rounded, as the kernels do) over slots 0..pos."""
    B = qkv.shape[0]
    q, k, v = qkv[:, 0].float().split([H * D, HKV * D, HKV * D], -1)
    q, k, v = q.view(B, H, D), k.view(B, HKV, D), v.view(B, HKV, D)
    c, s = cos.view(B, 1, D).float(), sin.view(B, 1, D).float()

    def rot(x):
        return torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)

    q = (q * c + rot(q) * s).to(qkv.dtype).double()
    k = (k * c + rot(k) * s).to(qkv.dtype).double()
    keys = torch.cat([kc[:, :, :pos].double(), k[:, :, None]], 2).repeat_interleave(H // HKV, 1)
    vals = torch.cat([vc[:, :, :pos].double(), v.double()[:, :, None]], 2).repeat_interleave(H // HKV, 1)
    att = (torch.einsum("bhd,bhnd->bhn", q, keys) / math.sqrt(D)).softmax(-1)
    return torch.einsum("bhn,bhnd->bhd", att, vals).reshape(B, 1, H * D)


def run_point(name, batch, max_len, pos_v, layers, flex_ok, dtype=torch.bfloat16):
    H, HKV, D = SHAPES[name]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    kcs = [torch.randn(batch, HKV, max_len, D, device=dev, dtype=dtype, generator=gen) for _ in range(layers)]
    vcs = [torch.randn(batch, HKV, max_len, D, device=dev, dtype=dtype, generator=gen) for _ in range(layers)]
    qkv = torch.randn(batch, 1, (H + 2 * HKV) * D, device=dev, dtype=dtype, generator=gen)
    ang = torch.rand(batch, 1, D // 2, device=dev, generator=gen) * 6.28
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    pos = torch.full((1,), pos_v, dtype=torch.long, device=dev)
    positions = pos.clone()
    arange = torch.arange(max_len, device=dev)
    mask = torch.where(arange[None, :] <= positions[:, None], 0.0, torch.finfo(dtype).min).to(dtype)[None, None]
    ref = reference(qkv, cos, sin, kcs[0], vcs[0], pos_v, H, HKV, D)
    G = H // HKV
    out: dict = {"shape": name, "batch": batch, "cache_len": max_len, "pos": pos_v,
                 "kv_bytes_filled": 2 * batch * HKV * (pos_v + 1) * D * 2, "kv_bytes_static": 2 * batch * HKV * max_len * D * 2}

    def sdpa(i):
        q = glue.rope_cache(qkv, cos, sin, kcs[i], vcs[i], pos, H, HKV, D)
        return F.scaled_dot_product_attention(q.reshape(batch, HKV, G, D), kcs[i], vcs[i], attn_mask=mask).reshape(batch, 1, H * D)

    split = DecodeAttention(batch, H, HKV, D, max_len, dev)

    def splitkv(i):
        return split(qkv, cos, sin, kcs[i], vcs[i], pos)

    impls = {"sdpa": sdpa, "split": splitkv}
    if flex_ok:
        try:
            from torch import _dynamo
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            _dynamo.config.recompile_limit = 256  # a new score_mod closure per point
            _dynamo.config.cache_size_limit = 256

            flex = torch.compile(flex_attention, dynamic=False)

            def causal(score, b, h, q_idx, kv_idx):
                return torch.where(kv_idx <= pos[0], score, -float("inf"))

            def flex_scoremod(i):
                q = glue.rope_cache(qkv, cos, sin, kcs[i], vcs[i], pos, H, HKV, D)
                return flex(q, kcs[i], vcs[i], score_mod=causal, enable_gqa=G > 1).transpose(1, 2).reshape(batch, 1, H * D)

            bm = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= pos_v, None, None, 1, max_len, device=dev)

            def flex_blockmask(i):
                q = glue.rope_cache(qkv, cos, sin, kcs[i], vcs[i], pos, H, HKV, D)
                return flex(q, kcs[i], vcs[i], block_mask=bm, enable_gqa=G > 1).transpose(1, 2).reshape(batch, 1, H * D)

            impls["flex"] = flex_scoremod
            impls["flex-blockmask"] = flex_blockmask
        except Exception as err:  # noqa: BLE001
            out["flex_error"] = f"{type(err).__name__}: {err}"[:300]
    for key, fn in impls.items():
        try:
            got = fn(0)
            err = (got.double() - ref).abs().max().item()
            t = graph_time([lambda i=i: fn(i) for i in range(layers)], replays=20)
            out[key] = {"us": t * 1e6, "max_abs_err": err, "kv_gbps_filled": out["kv_bytes_filled"] / t / 1e9}
        except Exception as e:  # noqa: BLE001
            out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'shape':<10} {'B':>3} {'cache':>5} {'pos':>5} " + " ".join(f"{k:>16}" for k in ("sdpa", "flex", "flex-blockmask", "split")))
    for b in [int(x) for x in args.batch.split(",")]:
        for name in SHAPES:
            for max_len, pos_v in POINTS:
                r = run_point(name, b, max_len, pos_v, args.layers, not args.no_flex)
                rows.append(r)
                cells = []
                for k in ("sdpa", "flex", "flex-blockmask", "split"):
                    v = r.get(k)
                    cells.append(f"{v['us']:>7.2f} us {v['max_abs_err']:.0e}" if v and "us" in v else f"{'-' if not v else 'error':>16}")
                print(f"{name:<10} {b:>3} {max_len:>5} {pos_v:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)
                for k in ("sdpa", "flex", "flex-blockmask", "split", "flex_error"):
                    v = r.get(k)
                    if isinstance(v, dict) and "error" in v:
                        print(f"  {k}: {v['error']}")
                    elif isinstance(v, str):
                        print(f"  {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
