"""Shared machinery for the rank-allocation research (own code; uses /work/ref/old rankcut as a library).

Fast evaluation: for whiten, the rank-r factorisation of target t is W_r = U_r S_r Vh_r L^{-1}, where
A = W L = U S Vh (full SVD computed once). Setting the dense weight to W_r computes the same function as
the LowRankLinear that rankcut would build (checked against compress_with_stats_ in check_equiv.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.environ.get("RANKCUT_OLD", "/work/ref/old"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rankcut  # noqa: E402
from rankcut.calibrate import block_output, capture_block_inputs, with_hidden  # noqa: E402
from rankcut.compress import dense_stats  # noqa: E402
from rankcut.data import read_text, tokenize  # noqa: E402
from rankcut.layers import dense_weight  # noqa: E402
from rankcut.linalg import safe_cholesky  # noqa: E402
from rankcut.targets import find_blocks, find_targets  # noqa: E402

torch.set_num_threads(int(os.environ.get("NTHREADS", "1")))

D = "/work/shared/data"
MODELS = {
    "codellama": f"{D}/testbed/codellama-16m",
    "codegpt2": f"{D}/testbed/codegpt2-23m",
    "stories": f"{D}/stories260K/hf",
}
CALIB = f"{D}/testbed/calib/python_calib.txt"
HELDOUT = f"{D}/testbed/heldout/python_heldout.txt"
WIKI = f"{D}/wikitext-2-raw/wiki.test.raw"
WIKI_VALID = f"{D}/wikitext-2-raw/wiki.valid.raw"
SEQ = 256
OUTDIR = "/work/research/alloc/results"
os.makedirs(OUTDIR, exist_ok=True)


def load(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = MODELS[name]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


_stream_cache = {}


def stream(tok, path, start_char=0):
    key = (id(tok), path, start_char)
    if key not in _stream_cache:
        text = read_text(path)
        _stream_cache[key] = tokenize(tok, text[start_char:])
    return _stream_cache[key]


def windows_of(ids, n, skip=0, seq=SEQ):
    avail = ids.numel() // seq
    assert avail >= skip + n, (avail, skip, n)
    return ids[: avail * seq].view(avail, seq)[skip : skip + n].clone()


class Data:
    """The protocol's text splits for one model family (text sources per model name)."""

    def __init__(self, name, tok):
        self.name = name
        if name == "stories":
            # out of domain, direction only: calib = wiki.valid, eval = wiki.test first 24, dev = wiki.test later
            self.calib_ids = stream(tok, WIKI_VALID)
            self.eval_ids = stream(tok, WIKI)
            self.dev_ids = stream(tok, WIKI, 600_000)
        else:
            self.calib_ids = stream(tok, CALIB)
            self.eval_ids = stream(tok, HELDOUT)
            self.dev_ids = stream(tok, HELDOUT, 2_000_000)

    def calib(self, n=32):  # the protocol's calibration windows (Gram statistics)
        return windows_of(self.calib_ids, n)

    def score(self, n, skip=32):  # calibration windows NOT used for the Gram matrices
        return windows_of(self.calib_ids, n, skip)

    def eval(self, n=24):
        return windows_of(self.eval_ids, n)

    def dev(self, n=32):
        """n windows evenly spread over the dev stream (a contiguous block is dominated by one file)."""
        avail = self.dev_ids.numel() // SEQ
        allw = self.dev_ids[: avail * SEQ].view(avail, SEQ)
        idx = torch.linspace(0, avail - 1, n).round().long()
        return allw[idx].clone()

    def devc(self, n=32, skip=200):
        """n calibration-text windows evenly spread over windows skip.. (never used for Gram or scoring)."""
        avail = self.calib_ids.numel() // SEQ
        allw = self.calib_ids[: avail * SEQ].view(avail, SEQ)
        idx = torch.linspace(skip, avail - 1, n).round().long()
        return allw[idx].clone()


def config(**kw):
    base = dict(method="whiten", calib_samples=32, seq_len=SEQ, sampling="first")
    base.update(kw)
    return rankcut.CompressConfig(**base)


class Targets:
    """Each target's weight, shape, setter, and its whitened SVD (computed once)."""

    def __init__(self, model, grams, dtype=torch.float64):
        self.model = model
        self.mods = find_targets(model)
        self.names = list(self.mods)
        self.W0 = {n: dense_weight(m).detach().clone() for n, m in self.mods.items()}
        self.shape = {n: tuple(self.W0[n].shape) for n in self.names}
        self.dense_total = sum(m * n for m, n in self.shape.values())
        self.svd = {}
        for n in self.names:
            W = self.W0[n].to(torch.float64)
            L, _ = safe_cholesky(grams[n].to(torch.float64), damping=1e-6)
            A = W @ L
            U, S, Vh = torch.linalg.svd(A, full_matrices=False)
            Vinv = torch.linalg.solve_triangular(L.mT, Vh.mT, upper=True).mT  # Vh L^{-1}
            self.svd[n] = (U, S, Vinv)

    def breakeven(self, n):
        m, k = self.shape[n]
        return math.ceil(m * k / (m + k)) - 1  # max useful rank

    def cost(self, n, r):
        m, k = self.shape[n]
        return m * k if r is None else r * (m + k)

    def params(self, ranks):
        return sum(self.cost(n, ranks.get(n)) for n in self.names)

    def keep_of(self, ranks):
        return self.params(ranks) / self.dense_total

    def weight(self, n, r):
        if r is None:
            return self.W0[n]
        U, S, Vinv = self.svd[n]
        return ((U[:, :r] * S[:r]) @ Vinv[:r]).to(torch.float32)

    def set(self, n, r):
        mod = self.mods[n]
        W = self.weight(n, r)
        with torch.no_grad():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(W)
            else:  # Conv1D (in, out)
                mod.weight.copy_(W.t())

    def apply(self, ranks):
        for n in self.names:
            self.set(n, ranks.get(n))

    def restore(self):
        self.apply({})

    def uniform(self, keep):
        out = {}
        for n in self.names:
            m, k = self.shape[n]
            out[n] = max(1, math.floor(keep * m * k / (m + k)))
        return out


def final_head(model):
    if hasattr(model, "model") and hasattr(model.model, "norm"):
        return lambda h: model.lm_head(model.model.norm(h))
    return lambda h: model.lm_head(model.transformer.ln_f(h))


class Runner:
    """Forward passes with cached block inputs, so a change in block l reruns only blocks l.."""

    def __init__(self, model, windows, batch_size=8):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self.head = final_head(model)
        self.windows = windows
        with torch.no_grad():
            self.calls = capture_block_inputs(model, self.blocks[0], windows, batch_size, "cpu")
        self.cache = None  # per block: list over batches of the dense input hidden states

    def cache_dense(self):
        """Store every block's input on the (current, dense) model."""
        self.cache = [[] for _ in self.blocks]
        with torch.no_grad():
            for args, kwargs in self.calls:
                h = args[0] if args else kwargs["hidden_states"]
                for l, block in enumerate(self.blocks):
                    self.cache[l].append(h)
                    a, k = with_hidden(args, kwargs, h)
                    h = block_output(block(*a, **k))

    def logits(self, start=0):
        """Per batch logits (generator), running from block ``start`` on cached dense inputs."""
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(self.calls):
                h = self.cache[start][i] if start > 0 else (args[0] if args else kwargs["hidden_states"])
                for block in self.blocks[start:]:
                    a, k = with_hidden(args, kwargs, h)
                    h = block_output(block(*a, **k))
                yield i, self.head(h)

    def batch_ids(self, i, bs=8):
        return self.windows[i * bs : (i + 1) * bs]

    def nll(self, start=0):
        total, count = 0.0, 0
        for i, lg in self.logits(start):
            ids = self.batch_ids(i)
            total += F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()
        return total / count

    def ppl(self):
        return math.exp(self.nll())

    def store_ref(self):
        """Dense log-probabilities (the KL reference), fp16 to save memory."""
        self.ref = [F.log_softmax(lg, -1).to(torch.float16) for _, lg in self.logits(0)]

    def kl(self, start=0):
        """Mean per-token KL(dense || current) over all positions."""
        total, count = 0.0, 0
        for i, lg in self.logits(start):
            lq = F.log_softmax(lg, -1)
            lp = self.ref[i].float()
            total += (lp.exp() * (lp - lq)).sum().item()
            count += lg.shape[0] * lg.shape[1]
        return total / count

    def kl_and_nll(self, start=0):
        tk, tn, c, cn = 0.0, 0.0, 0, 0
        for i, lg in self.logits(start):
            lq = F.log_softmax(lg, -1)
            lp = self.ref[i].float()
            tk += (lp.exp() * (lp - lq)).sum().item()
            c += lg.shape[0] * lg.shape[1]
            ids = self.batch_ids(i)
            tn += -lq[:, :-1].gather(-1, ids[:, 1:, None]).sum().item()
            cn += ids[:, 1:].numel()
        return tk / c, tn / cn


def block_index(name, prefix):
    rest = name[len(prefix) + 1 :]
    return int(rest.split(".", 1)[0])


def grams_for(model, data, n=32):
    cfg = config()
    return dense_stats(model, "gram", data.calib(n), cfg, device="cpu", progress=False)


def save(name, obj):
    with open(os.path.join(OUTDIR, name), "w") as f:
        json.dump(obj, f, indent=1)


def load_json(name):
    with open(os.path.join(OUTDIR, name)) as f:
        return json.load(f)


class Clock:
    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self):
        now = time.perf_counter()
        d, self.t = now - self.t, now
        return d
