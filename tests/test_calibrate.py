"""Calibration statistics: accumulators, shared-input discovery by hooks, hook removal, bad activations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankcut.calibrate import StatAccumulator, StatsCollector

PROPS = settings(max_examples=25, deadline=None)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@PROPS
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 5)), min_size=1, max_size=4),
    st.integers(1, 7),
    st.integers(0, 10_000),
)
def test_accumulator_matches_direct_statistics(batches, n, seed):
    gram, absmean = StatAccumulator("gram"), StatAccumulator("absmean")
    seen = []
    for i, (batch, seq) in enumerate(batches):
        x = _randn(batch, seq, n, seed=seed + i)  # float32 activations, as in a model
        gram.update(x)
        absmean.update(x)
        seen.append(x.reshape(-1, n))
    X = torch.cat(seen).to(torch.float64)
    G = gram.value()
    assert G.dtype == torch.float64 and G.shape == (n, n)
    torch.testing.assert_close(G, X.T @ X, rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)
    A = absmean.value()
    assert A.dtype == torch.float64 and A.shape == (n,)
    torch.testing.assert_close(A, X.abs().mean(0), rtol=1e-12, atol=1e-14)
    assert gram.count == absmean.count == X.shape[0]


def test_accumulator_absmean_known_values():
    acc = StatAccumulator("absmean")
    acc.update(torch.tensor([[[1.0, -2.0], [3.0, 0.0]]]))  # (1, 2, 2)
    acc.update(torch.tensor([[[-5.0, 2.0]]]))  # (1, 1, 2)
    # mean over all three tokens, not the mean of per-batch means
    torch.testing.assert_close(acc.value(), torch.tensor([3.0, 4.0 / 3.0], dtype=torch.float64))
    gram = StatAccumulator("gram")
    gram.update(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert torch.equal(gram.value(), torch.tensor([[10.0, -1.0], [-1.0, 5.0]], dtype=torch.float64))


def test_accumulator_errors():
    with pytest.raises(ValueError, match=r"unknown statistic 'hessian'"):
        StatAccumulator("hessian")
    with pytest.raises(RuntimeError, match=r"no calibration data"):
        StatAccumulator("gram").value()
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 3, 4)
        x[1, 2, 0] = bad
        with pytest.raises(ValueError, match=r"inf/NaN"):
            StatAccumulator("gram").update(x)


class TinyAttention(nn.Module):
    """q/k/v read the same normalised input; o reads a different tensor (the mixed values)."""

    def __init__(self, n: int = 6, d: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.q, self.k, self.v = nn.Linear(n, d), nn.Linear(n, d), nn.Linear(n, d)
        self.o = nn.Linear(d, n)
        self.unused = nn.Linear(n, n)
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        z = torch.tanh(q * k) + v
        self.captured.append((h.detach().clone(), z.detach().clone()))
        return x + self.o(z)


def _names(model: TinyAttention) -> dict[str, nn.Module]:
    return {"q": model.q, "k": model.k, "v": model.v, "o": model.o, "unused": model.unused}


@pytest.mark.parametrize("kind", ["gram", "absmean"])
def test_collector_groups_and_values(kind):
    torch.manual_seed(0)
    model = TinyAttention()
    modules = _names(model)
    inputs = [_randn(2, 5, 6, seed=i) for i in range(3)]
    with torch.no_grad(), StatsCollector(modules, kind) as collector:
        for x in inputs:
            model(x)
    groups = sorted(sorted(g) for g in collector.groups)
    assert groups == [["k", "q", "v"], ["o"]]
    assert collector.leader == {"q": "q", "k": "q", "v": "q", "o": "o"}
    assert set(collector.accumulators) == {"q", "o"}  # one accumulator per distinct input

    H = torch.cat([h.reshape(-1, 6) for h, _ in model.captured]).double()
    Z = torch.cat([z.reshape(-1, 4) for _, z in model.captured]).double()
    if kind == "gram":
        expected_h, expected_z = H.T @ H, Z.T @ Z
    else:
        expected_h, expected_z = H.abs().mean(0), Z.abs().mean(0)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(collector.stat(name), expected_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(collector.stat("o"), expected_z, rtol=1e-12, atol=1e-12)
    # the shared input was accumulated once, not three times
    assert collector.accumulators["q"].count == H.shape[0] == 30
    with pytest.raises(RuntimeError, match=r"never reached unused"):
        collector.stat("unused")


def test_collector_removes_hooks_on_exit():
    model = TinyAttention()
    modules = _names(model)
    before = {name: len(m._forward_pre_hooks) for name, m in modules.items()}
    collector = StatsCollector(modules, "gram")
    with collector:
        assert all(len(m._forward_pre_hooks) == before[name] + 1 for name, m in modules.items())
        with torch.no_grad():
            model(_randn(1, 4, 6, seed=1))
    assert {name: len(m._forward_pre_hooks) for name, m in modules.items()} == before
    frozen = collector.stat("q").clone()
    with torch.no_grad():
        model(_randn(1, 4, 6, seed=2))  # after exit: nothing is accumulated any more
    assert torch.equal(collector.stat("q"), frozen)


def test_collector_removes_hooks_when_forward_raises():
    model = TinyAttention()
    modules = _names(model)
    x = _randn(1, 3, 6, seed=3)
    with torch.no_grad(), StatsCollector(modules, "gram"):
        model(x)
    bad = x.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"inf/NaN"):
        with torch.no_grad(), StatsCollector(modules, "gram"):
            model(bad)
    assert all(len(m._forward_pre_hooks) == 0 for m in modules.values())


def test_collector_non_finite_activation_inside_model():
    model = TinyAttention()
    with torch.no_grad():
        model.v.weight[0, 0] = float("inf")  # o's input becomes non-finite, q/k/v's stays finite
    with pytest.raises(ValueError, match=r"inf/NaN"):
        with torch.no_grad(), StatsCollector(_names(model), "absmean"):
            model(_randn(1, 3, 6, seed=4))


def test_collector_distinct_but_equal_inputs_are_not_shared():
    # grouping is by tensor identity: two layers fed equal values from different tensors keep their own stats
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    x = _randn(4, 3, seed=5)
    with torch.no_grad(), StatsCollector({"a": a, "b": b}, "gram") as collector:
        a(x)
        b(x.clone())
        a(2 * x)
        b(x)
    assert sorted(sorted(g) for g in collector.groups) == [["a"], ["b"]]
    X = x.double()
    torch.testing.assert_close(collector.stat("a"), 5 * X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(collector.stat("b"), 2 * X.T @ X, rtol=1e-12, atol=1e-12)
