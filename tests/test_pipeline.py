"""The block pipeline's phases and registries: group methods, global policies, overrides around them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankcut
from rankcut import CompressConfig, LowRankLinear, compress_
from rankcut.linalg import split_factors, truncated_svd
from rankcut.methods import SpectralConfig, get_method, register_group, unregister
from rankcut.methods.spectral import FactorCandidate, SpectralCandidate, _low_rank
from rankcut.policies import Policy, _REGISTRY as POLICIES, get_policy, make_policy, register_policy
from rankcut.policies.overrides import Overrides
from rankcut.units import Candidate, Decision, TargetInfo, Unit
from tiny_models import ARCHS, forward, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = token_windows(8)
IDS = token_windows(2, seed=99)


# ------------------------------------------------------------------------------------- group methods


class SharedVCandidate(Candidate):
    """Several targets reading one input, factorised with one shared V: the SVD of the stacked weights."""

    def __init__(self, unit, weights, rank):
        stacked = torch.cat(weights)
        U, S, Vh = truncated_svd(stacked.double(), rank)
        super().__init__(unit, rank, S, float(stacked.double().pow(2).sum()))
        self.U, self.Vh, self.S = U, Vh, S
        self.rows = [w.shape[0] for w in weights]

    def build(self, rank, dense):
        Uf, Vf = split_factors(self.U[:, :rank], self.S[:rank], self.Vh[:rank])
        parts = Uf.split(self.rows)
        return {name: _low_rank(part, Vf, dense[name]) for name, part in zip(self.unit.names, parts)}


CALLS: list = []


def qkv_units(targets, config):
    """q/k/v of each block as one unit; every other target alone."""
    groups: dict = {}
    for t in targets:
        key = (t.block, "qkv") if t.kind.endswith(("q_proj", "k_proj", "v_proj")) else (t.block, t.kind)
        groups.setdefault(key, []).append(t)
    return [Unit(tuple(g)) for g in groups.values()]


@pytest.fixture
def toy_group_method():
    name = "_toy_shared_v"

    @register_group(name, stat="gram", reference="test", config=SpectralConfig, units=qkv_units)
    def shared_v(items, config, rank, seed=0):
        CALLS.append([(i.target.name, None if i.stat is None else i.stat.clone()) for i in items])
        return SharedVCandidate(Unit(tuple(i.target for i in items)), [i.W for i in items], rank)

    CALLS.clear()
    yield name
    unregister(name)


def test_group_method_receives_the_whole_group(toy_group_method):
    """The method interface carries several targets at once: q/k/v of a block arrive together, each with its
    statistic (one shared Gram for the shared input), and come back as modules sharing one V."""
    model = ARCHS["llama"].build()
    reference = ARCHS["llama"].build()
    compress_(model, CompressConfig(method=toy_group_method, rank=4, calib_samples=8, batch_size=4), calib=CALIB,
              progress=False)
    groups = [[n for n, _ in call] for call in CALLS]
    for block in (0, 1):
        assert [f"model.layers.{block}.self_attn.{p}_proj" for p in "qkv"] in groups
    q_call = next(c for c in CALLS if len(c) == 3)
    assert torch.equal(q_call[0][1], q_call[1][1]) and torch.equal(q_call[0][1], q_call[2][1])  # shared input
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and torch.equal(attn.q_proj.V.weight, attn.k_proj.V.weight)
    ref = reference.model.layers[0].self_attn
    W = torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight]).double()
    U, S, Vh = truncated_svd(W, 4)
    best = (U * S) @ Vh
    got = torch.cat([attn.q_proj.U.weight @ attn.q_proj.V.weight, attn.k_proj.U.weight @ attn.k_proj.V.weight,
                     attn.v_proj.U.weight @ attn.v_proj.V.weight]).double()
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)
    assert model.rankcut_record.method == toy_group_method


def cross_layer_units(targets, config):
    """The same tensor type of every block as one unit (a cross-layer group)."""
    groups: dict = {}
    for t in targets:
        groups.setdefault(t.kind, []).append(t)
    return [Unit(tuple(g)) for g in groups.values()]


def test_group_spanning_blocks_waits_for_its_last_member():
    """Layer by layer, a unit whose members live in different blocks is decomposed once the last block's
    statistics are in; earlier members' statistics wait off the device."""
    name = "_toy_cross_layer"
    seen = []

    @register_group(name, stat="gram", reference="test", config=SpectralConfig, units=cross_layer_units)
    def per_layer_types(items, config, rank, seed=0):
        seen.append([(i.target.name, i.target.block, i.stat.shape) for i in items])
        return SharedVCandidate(Unit(tuple(i.target for i in items)), [i.W for i in items], rank)

    try:
        model = ARCHS["llama"].build()
        compress_(model, CompressConfig(method=name, rank=2, calib_samples=8, batch_size=4), calib=CALIB, progress=False)
    finally:
        unregister(name)
    assert len(seen) == 7 and all([b for _, b, _ in call] == [0, 1] for call in seen)
    assert all(isinstance(m, LowRankLinear) for m in rankcut.modules.low_rank_modules(model).values())
    assert len(rankcut.modules.low_rank_modules(model)) == 14


# ----------------------------------------------------------------------------------- global policies


@pytest.fixture
def recording_policy():
    """A global policy that plans the uniform ranks, after checking that nothing was swapped before."""
    events = {}

    @register_policy
    class RecordingUniform(Policy):
        name = "_test_global_uniform"
        is_global = True

        @classmethod
        def check_config(cls, config):
            config.keep = config.keep or 0.5

        def plan(self, candidates, fixed):
            model = self.context["model"]
            events["dense_at_plan"] = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
            events["kinds"] = {type(c) for c in candidates.values()}
            events["devices"] = {c.U.device.type for c in candidates.values()}
            events["max_ranks"] = {u.name: c.max_rank for u, c in candidates.items()}
            return {u: Decision(u.uniform_rank(self.config.keep)) for u in candidates}

    yield events
    POLICIES.pop("_test_global_uniform")


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_global_policy_sees_every_candidate_before_any_swap(recording_policy, method):
    model, reference = ARCHS["llama"].build(), ARCHS["llama"].build()
    cfg = CompressConfig(method=method, allocation="_test_global_uniform", keep=0.5, calib_samples=8, batch_size=4)
    summary = compress_(model, cfg, calib=CALIB, progress=False, context={"model": model})
    assert recording_policy["dense_at_plan"] == []  # the plan came before the first swap
    assert recording_policy["kinds"] == {FactorCandidate} and recording_policy["devices"] == {"cpu"}
    # decomposed up to break-even (the largest rank the policy could choose), truncated after the plan
    for name, k in recording_policy["max_ranks"].items():
        m, n = model.get_submodule(name).out_features, model.get_submodule(name).in_features
        assert k == min(rankcut.units.max_useful_rank(m, n), m, n)
    assert "plan" in summary.times
    compress_(reference, CompressConfig(method=method, keep=0.5, calib_samples=8, batch_size=4), calib=CALIB,
              progress=False)
    exact = dict(rtol=0, atol=0) if method == "svd" else dict(rtol=1e-4, atol=1e-5)  # whiten: unapply, then slice
    torch.testing.assert_close(forward(model, IDS), forward(reference, IDS), **exact)


def test_global_policy_with_sequential_calibration_is_refused(recording_policy):
    cfg = CompressConfig(method="whiten", allocation="_test_global_uniform", keep=0.5, calib_samples=8, sequential=True)
    model = ARCHS["llama"].build()
    with pytest.raises(ValueError, match="sequential calibration needs each block swapped"):
        compress_(model, cfg, calib=CALIB, progress=False, context={"model": model})
    assert not rankcut.modules.low_rank_modules(model)


def test_overrides_wrap_a_global_policy(recording_policy):
    """Overridden units follow their rule; the global policy sees only the others, and the overridden
    decisions as fixed (their parameters count against a budget)."""
    seen = {}

    class Spy(Policy):
        name = "_spy"
        is_global = True

        def plan(self, candidates, fixed):
            seen["planned"], seen["fixed"] = sorted(u.name for u in candidates), dict(fixed)
            return {u: Decision(1) for u in candidates}

    cfg = CompressConfig(method="svd", keep=0.5, overrides={"re:mlp\\.down_proj": {"rank": 3},
                                                            "model.layers.0.self_attn.q_proj": {"dense": True}})
    policy = Overrides(Spy(cfg), cfg.overrides)
    assert policy.is_global
    model = ARCHS["llama"].build()
    from rankcut.pipeline import Compression, GivenStats
    from rankcut.targets import find_targets
    from rankcut.utils import Timer

    targets = find_targets(model)
    work = Compression(model, cfg, policy, targets, torch.device("cpu"), Timer(), progress=False)
    with torch.no_grad():
        GivenStats(work, None).run(targets)
    assert "model.layers.0.self_attn.q_proj" not in seen["planned"]
    assert not any("down_proj" in n for n in seen["planned"]) and len(seen["planned"]) == 14 - 3
    assert [d for u, d in seen["fixed"].items() if u.name.endswith("q_proj")] == [Decision(None, "dense by override")]
    assert model.model.layers[1].mlp.down_proj.rank == 3 and model.model.layers[0].self_attn.k_proj.rank == 1
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_policy_registry():
    assert {"uniform", "energy", "rank"} <= set(rankcut.available_policies())
    with pytest.raises(ValueError, match="unknown allocation 'nope'"):
        get_policy("nope")
    plain = make_policy(CompressConfig(method="svd", keep=0.5))
    assert type(plain).__name__ == "Uniform" and not plain.is_global
    wrapped = make_policy(CompressConfig(method="svd", keep=0.5, overrides={"x": {"rank": 2}}))
    assert isinstance(wrapped, Overrides)
    with pytest.raises(ValueError, match="takes no options"):
        CompressConfig(method="svd", keep=0.5, policy_options={"x": 1})


def test_local_policies_give_the_documented_ranks():
    unit = Unit((TargetInfo("a", (40, 60)),))
    assert make_policy(CompressConfig(method="svd", keep=0.5)).bound(unit) == 12  # floor(0.5 * 2400 / 100)
    assert make_policy(CompressConfig(method="svd", rank=30)).bound(unit) == Decision(
        None, "rank 30 >= break-even 24.0: kept dense")
    energy = make_policy(CompressConfig(method="svd", energy=0.5))
    assert energy.bound(unit) == 23
    spectrum = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    cand = Candidate(unit, 3, spectrum, total=20.0)  # the top 3 of a longer spectrum
    assert energy.choose(unit, cand) == Decision(2)  # 9/20 < 0.5 <= 13/20
    assert make_policy(CompressConfig(method="svd", energy=0.99)).choose(unit, cand).dense


def test_unit_parameter_model_and_limits():
    single = Unit((TargetInfo("a", (8, 8)),))
    assert single.limit == 3 and single.params(3) == 48 and single.dense_params == 64
    pair = Unit((TargetInfo("a", (8, 8)), TargetInfo("b", (8, 8))))
    assert pair.params(2) == 64 and pair.limit == 3 and pair.uniform_rank(0.5) == 2


# ------------------------------------------------------------------------------------- spectral path


def test_spectral_candidate_truncates_before_mapping_back():
    """Any rank of one decomposition equals decomposing at that rank directly (bit for bit): the plan can
    decompose once at its bound and truncate afterwards."""
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = torch.randn(50, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spec, cfg = get_method("whiten"), get_method("whiten").make_config({"svd_dtype": "float64"})
    from rankcut.methods import Item

    info = TargetInfo("w", (20, 12))
    once = spec.decompose([Item(info, W, G.mT @ G)], cfg, 7)
    assert isinstance(once, SpectralCandidate) and once.max_rank == 7
    for r in (1, 3, 7):
        direct = spec.decompose([Item(info, W, G.mT @ G)], cfg, r)
        for a, b in zip(once.factors(r), direct.factors(r)):
            assert torch.equal(a, b)
    compact = once.compact()
    for r in (1, 3, 7):
        for a, b in zip(compact.factors(r), once.factors(r)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="outside 1..7"):
        once.factors(8)
