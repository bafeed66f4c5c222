"""``rankcut analyze``: energy ranks against known spectra, the parameter/speedup formulas, the report, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import rankcut
from rankcut.analyze import check_thresholds, kept_params, spectrum_entry, speedup_bound
from rankcut.methods.whiten import whiten
from rankcut.cli import main
from tiny_models import llama, sample_text, save_tiny, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def matrix_with_spectrum(s: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    return orthogonal(m, gen)[:, :k] @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ orthogonal(n, gen)[:, :k].T


def hand_energy_rank(s: list[float], t: float) -> int:
    total = sum(x * x for x in s)
    acc = 0.0
    for i, x in enumerate(s, 1):
        acc += x * x
        if acc >= t * total * (1 - 1e-12):
            return i
    return len(s)


def test_energy_ranks_match_known_spectrum():
    m, n = 40, 30  # break-even 17.14: ranks 1..17 factorise, 18+ stay dense
    s = [10.0, 8.0, 5.0, 4.0, 3.0, 2.0, 1.5] + [1.0] * 8 + [0.5] * 15
    W = matrix_with_spectrum(s, m, n)
    thresholds = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
    entry = spectrum_entry(torch.linalg.svdvals(W), m, n, thresholds)
    assert torch.allclose(torch.tensor(entry["singular_values"], dtype=torch.float64), torch.tensor(s, dtype=torch.float64), atol=1e-10)
    got = {t: entry["thresholds"][str(t)]["rank"] for t in thresholds}
    expected = {t: hand_energy_rank(s, t) for t in thresholds}
    assert got == expected
    # by hand: Σσ² = 232; r=2 holds 164/232 = 0.707 ≥ 0.5, r=3 holds 189/232 = 0.815 ≥ 0.8
    assert expected[0.5] == 2 and expected[0.8] == 3
    assert expected[0.9] < 17.14 < expected[0.99]  # both sides of break-even are exercised
    for t in thresholds:
        level = entry["thresholds"][str(t)]
        assert level["dense"] == (expected[t] >= m * n / (m + n))


def test_kept_params_and_speedup_bound_formulas():
    # 4096×4096 at r=512: 512·8192 parameters, bound mn/(r(m+n)) = 4.0 (DESIGN.md §5)
    assert kept_params(4096, 4096, 512) == 512 * 8192
    assert speedup_bound(4096, 4096, 512) == pytest.approx(4.0)
    assert speedup_bound(11008, 4096, 1024) == pytest.approx(11008 * 4096 / (1024 * 15104))
    # GPT-2 768×768: break-even 384; rank 383 still pays, 384 does not
    assert kept_params(768, 768, 383) == 383 * 1536 and speedup_bound(768, 768, 383) > 1
    assert kept_params(768, 768, 384) == 768 * 768 and speedup_bound(768, 768, 384) == 1.0
    assert kept_params(768, 3072, 700) == 768 * 3072 and speedup_bound(768, 3072, 700) == 1.0


def test_ranks_at_or_above_break_even_are_dense():
    m = n = 8  # break-even 4
    W = matrix_with_spectrum([1.0] * 8, m, n, seed=3)  # flat spectrum: 0.5 needs 4, 0.9 needs 8
    entry = spectrum_entry(torch.linalg.svdvals(W), m, n, (0.25, 0.375, 0.5, 0.9))
    ranks = {t: lv["rank"] for t, lv in entry["thresholds"].items()}
    assert ranks == {"0.25": 2, "0.375": 3, "0.5": 4, "0.9": 8}
    for t in ("0.5", "0.9"):
        lv = entry["thresholds"][t]
        assert lv["dense"] and lv["kept_params"] == m * n and lv["keep"] == 1.0 and lv["speedup_bound"] <= 1
    lv = entry["thresholds"]["0.375"]
    assert not lv["dense"] and lv["kept_params"] == 3 * 16 and lv["speedup_bound"] == pytest.approx(64 / 48)


def test_activation_aware_spectrum_is_that_of_W_times_L():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    L_true = torch.tril(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    L_true.diagonal().abs_().add_(0.5)  # a valid Cholesky factor: positive diagonal
    gram = L_true @ L_true.T
    expected = torch.linalg.svdvals(W @ L_true)
    got = torch.linalg.svdvals(whiten(W, gram).A)
    assert torch.allclose(got, expected, rtol=1e-9)
    assert not torch.allclose(got, torch.linalg.svdvals(W), rtol=1e-2)  # whitening changes the spectrum


@pytest.mark.parametrize("bad", [[0.0], [1.5], [-0.1], [], [float("nan")]])
def test_bad_thresholds_are_an_error(bad):
    with pytest.raises(ValueError, match="threshold"):
        check_thresholds(bad)
    with pytest.raises(ValueError, match="threshold"):
        rankcut.analyze(llama(), thresholds=bad, progress=False)


def test_report_on_tiny_llama_covers_every_target():
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = rankcut.analyze(model, calib=token_windows(4), calib_samples=4, seq_len=16, progress=False)
    targets = rankcut.find_targets(model)
    assert set(report.targets) == set(targets) and len(targets) == 14
    assert report.kinds == ["weight", "whiten"]
    for name, t in report.targets.items():
        W = rankcut.modules.dense_weight(targets[name]).detach().double()
        assert t["shape"] == list(W.shape)
        assert torch.allclose(torch.tensor(t["weight"]["singular_values"], dtype=torch.float64), torch.linalg.svdvals(W), rtol=1e-9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing modified
    data = report.to_dict()
    json.dumps(data)
    rows = data["summary"]["weight"]
    assert [r["threshold"] for r in rows] == [0.8, 0.85, 0.9, 0.95, 0.99]
    assert all(0 < r["keep_targets"] <= 1 and r["speedup_bound_targets"] >= 1 for r in rows)
    assert [r["keep_targets"] for r in rows] == sorted(r["keep_targets"] for r in rows)  # more energy, more kept


def test_analyze_uses_the_methods_own_matrix_and_the_pipelines_statistics():
    """Any registered data-aware method reaches analyze: its spectra are those of the method's preconditioned
    matrix built from the dense statistics the compression pipeline computes (``dense_stats``)."""
    from rankcut.compress import dense_stats
    from rankcut.data import calibration_windows
    from rankcut.methods import get_method

    model = llama()
    windows = calibration_windows(token_windows(4), None, 4, 16)
    targets = rankcut.find_targets(model)
    for method, kind in (("whiten", "gram"), ("asvd", "absmean")):
        report = rankcut.analyze(model, calib=token_windows(4), calib_samples=4, seq_len=16, method=method,
                                 progress=False)
        assert report.kinds == ["weight", method] and report.to_dict()["method"] == method
        stats = dense_stats(model, kind, windows, progress=False)
        spec = get_method(method)
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            W = rankcut.modules.dense_weight(targets[name]).detach().double()
            A = spec.precondition(W, stats[name], spec.make_config(None)).A
            got = torch.tensor(report.targets[name][method]["singular_values"], dtype=torch.float64)
            assert torch.equal(got, torch.linalg.svdvals(A))
    with pytest.raises(ValueError, match="unknown method"):
        rankcut.analyze(model, method="nope", progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    model = save_tiny(root / "llama", "llama")
    calib = root / "calib.txt"
    calib.write_text(sample_text(400, seed=1))
    return root, model, calib


def test_cli_writes_report_and_plots(saved, capsys):
    root, model, calib = saved
    out = root / "report"
    argv = ["analyze", str(model), "-o", str(out), "--calib", str(calib), "--calib-samples", "4", "--seq-len", "16",
            "--thresholds", "0.9,0.5", "--quiet"]
    assert main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["thresholds"] == [0.5, 0.9] and len(data["targets"]) == 14
    assert {"rankcut", "torch", "transformers"} <= set(data["environment"])
    assert data["settings"]["seed"] == 0 and data["settings"]["device"] == "cpu" and "analyze" in data["command"]
    assert all("whiten" in t for t in data["targets"].values())
    md = (out / "report.md").read_text()
    assert "| energy |" in md and "W·L" in md and "| 0.50 |" in md
    for png in ("spectra.png", "energy_ranks.png", "cumulative_energy.png"):
        raw = (out / png).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1024, png
    # the output exists now: refused without --overwrite, replaced with it
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "rankcut: error:" in err and "exists" in err
    assert main([*argv[:-1], "--thresholds", "0.8", "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["thresholds"] == [0.8]


def test_cli_bad_thresholds_and_unrelated_dir(saved, capsys):
    root, model, _ = saved
    for bad in ("1.2", "0", "abc"):
        capsys.readouterr()
        assert main(["analyze", str(model), "-o", str(root / "never"), "--thresholds", bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "rankcut: error:" in err and "threshold" in err.lower(), err
        assert not (root / "never").exists()
    other = root / "unrelated"
    other.mkdir()
    (other / "keep.txt").write_text("data")
    assert main(["analyze", str(model), "-o", str(other), "--overwrite", "--quiet"]) == 2
    assert (other / "keep.txt").exists()
