"""Measured sensitivity (cache keys, stale caches, resume), the budgeted policies and the design-space search."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import rankcut
from rankcut import CompressConfig, compress_
from rankcut.search import SearchSettings, search, spread_layers, write_search
from rankcut.sensitivity import (
    SensitivitySettings,
    check_matches,
    load_sensitivity,
    measure_sensitivity,
    model_digest,
    scoring_windows,
)
from tiny_models import llama, save_tiny, sample_text, tiny_tokenizer, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = token_windows(24, seed=7)
CONFIG = CompressConfig(method="whiten", calib_samples=8, seq_len=16, batch_size=8)
SETTINGS = SensitivitySettings(fractions=(0.25, 0.5, 1.0), windows=6, batch_size=6)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "s"
    return out, measure_sensitivity(llama(), None, CALIB, CONFIG, SETTINGS, output=out, progress=False)


def test_curves_are_the_kl_of_truncating_each_target_alone(measured):
    out, result = measured
    assert len(result.curves) == 14 and result.times["complete"]
    name = "model.layers.1.mlp.up_proj"
    curve = result.curves[name]
    assert curve["ranks"] == sorted(curve["ranks"]) and all(s >= -1e-9 for s in curve["scores"])
    # recompute one point by hand: truncate that target alone, KL(dense || truncated) on the scoring windows
    model = llama()
    windows = scoring_windows(CALIB, None, CONFIG, 16, 6, 1)
    with torch.no_grad():
        dense = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
    single = CompressConfig(method="whiten", calib_samples=8, seq_len=16, batch_size=8,
                            overrides={name: {"rank": curve["ranks"][0]}, "re:.": {"dense": True}})
    compress_(model, single, calib=CALIB, progress=False)
    with torch.no_grad():
        trunc = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
    kl = float((dense.exp() * (dense - trunc)).sum() / (windows.shape[0] * (windows.shape[1] - 1)))
    assert curve["scores"][0] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert (out / "sensitivity.json").is_file()


def test_scoring_windows_avoid_the_calibration_windows():
    tok = tiny_tokenizer()
    text = sample_text(3000, seed=4)
    cfg = CompressConfig(method="whiten", calib_samples=4, seq_len=16, sampling="first")
    scoring = scoring_windows([text], tok, cfg, 16, 5, 1)
    calib = rankcut.data.calibration_windows([text], tok, 4, 16, 0, "first")
    assert not any(torch.equal(s, c) for s in scoring for c in calib)


def test_a_cache_is_reused_only_for_the_same_model_data_and_settings(measured, caplog):
    out, result = measured
    with caplog.at_level("WARNING"):
        again = measure_sensitivity(llama(), None, CALIB, CONFIG, SETTINGS, output=out, progress=False)
    assert again.key == result.key and "using the cached sensitivity" in caplog.text
    changes = [
        (llama(seed=1), CALIB, CONFIG, SETTINGS, "the model's weights"),
        (llama(), token_windows(24, seed=8), CONFIG, SETTINGS, "calibration windows"),
        (llama(), CALIB, dataclasses.replace(CONFIG, options={"damping": 1e-3}), SETTINGS, "options"),
        (llama(), CALIB, dataclasses.replace(CONFIG, calib_samples=7), SETTINGS, "calib_samples"),
        (llama(), CALIB, CONFIG, dataclasses.replace(SETTINGS, score="loss"), "score"),
        (llama(), CALIB, CONFIG, dataclasses.replace(SETTINGS, fractions=(0.5, 1.0)), "fractions"),
        (llama(), CALIB, CONFIG, dataclasses.replace(SETTINGS, windows=5), "windows"),
    ]
    keys = {result.key}
    for model, calib, cfg, settings, what in changes:
        with pytest.raises(ValueError, match=rf"holds a sensitivity measurement of something else \(.*{what}"):
            measure_sensitivity(model, None, calib, cfg, settings, output=out, progress=False)
        keys.add(measure_sensitivity(model, None, calib, cfg, settings, progress=False).key)
    assert len(keys) == len(changes) + 1  # every setting changes the key
    assert load_sensitivity(out).key == result.key  # the stale requests wrote nothing


def test_an_interrupted_measurement_resumes(measured, tmp_path, monkeypatch):
    _, full = measured
    import rankcut.sensitivity as sens

    calls = {"n": 0}
    original = sens._score

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(sens, "_score", failing)
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(llama(), None, CALIB, CONFIG, SETTINGS, output=tmp_path / "r", progress=False)
    partial = json.loads((tmp_path / "r" / "sensitivity.json").read_text())
    assert 0 < len(partial["curves"]) < 14 and not partial["times"].get("complete")
    with pytest.raises(ValueError, match="unfinished"):
        load_sensitivity(tmp_path / "r")
    monkeypatch.setattr(sens, "_score", original)
    done = measure_sensitivity(llama(), None, CALIB, CONFIG, SETTINGS, output=tmp_path / "r", progress=False)
    assert done.curves == full.curves


def test_sensitivity_policy_meets_the_budget_and_checks_its_measurement(measured):
    _, result = measured
    for keep in (0.8, 0.6, 0.45):
        model = llama()
        cfg = CompressConfig(method="whiten", allocation="sensitivity", keep=keep, calib_samples=8, seq_len=16,
                             batch_size=8, policy_options={"key": result.key, "rank_multiple": 1})
        summary = compress_(model, cfg, calib=CALIB, context={"sensitivity": result}, progress=False)
        assert summary.keep_targets <= keep + 1e-12
        smallest_step = min(m + n for m, n in (r.shape for r in summary.rows))
        assert keep - summary.keep_targets < smallest_step / summary.target_params_before  # the budget is spent
        assert all(r.rank is None or r.rank < r.shape[0] * r.shape[1] / sum(r.shape) for r in summary.rows)
    with pytest.raises(ValueError, match="needs a sensitivity measurement"):
        compress_(llama(), CompressConfig(method="whiten", allocation="sensitivity", calib_samples=8, seq_len=16),
                  calib=CALIB, progress=False)
    with pytest.raises(ValueError, match="asks for sensitivity measurement"):
        compress_(llama(), CompressConfig(method="whiten", allocation="sensitivity", calib_samples=8, seq_len=16,
                                          policy_options={"key": "0" * 64}),
                  calib=CALIB, context={"sensitivity": result}, progress=False)
    with pytest.raises(ValueError, match="another model"):
        check_matches(result, llama(seed=3), CONFIG)
    with pytest.raises(ValueError, match="calib_samples"):
        check_matches(result, llama(), dataclasses.replace(CONFIG, calib_samples=5))


def test_a_budget_no_allocation_can_meet_is_a_clear_error():
    with pytest.raises(ValueError, match=r"allocation spectrum: keep 0.001 budget cannot be met: the smallest allocation"):
        compress_(llama(), CompressConfig(method="svd", allocation="spectrum", keep=0.001), progress=False)
    # tiny matrices are launch-bound: the cost model predicts no speedup at all, so no plan reaches 1.5x
    with pytest.raises(ValueError, match=r"speedup 1.5 budget cannot be met: .*predicted seconds per token"):
        compress_(llama(), CompressConfig(method="svd", allocation="spectrum", speedup=1.5), progress=False)
    with pytest.raises(ValueError, match="speedup must be a number > 1"):
        CompressConfig(allocation="spectrum", speedup=0.9)
    with pytest.raises(ValueError, match="speedup budget needs a global allocation"):
        CompressConfig(allocation="uniform", speedup=1.2)


def test_speedup_budget_on_a_large_shape_is_met_by_the_cost_model():
    """Budget in predicted decode time: on 7B-sized matrices the plan's predicted time meets the target."""
    from rankcut import cost
    from rankcut.policies.spectrum import Spectrum
    from rankcut.units import Candidate, TargetInfo, Unit

    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (4096, 11008)] * 2
    units = [Unit((TargetInfo(f"t{i}", s),)) for i, s in enumerate(shapes)]
    cands = {u: Candidate(u, u.limit, torch.linspace(1, 0.01, u.limit, dtype=torch.float64) ** 2,
                          float((torch.linspace(1, 0.01, u.limit, dtype=torch.float64) ** 4).sum() * 1.01))
             for u in units}
    cfg = CompressConfig(method="svd", allocation="spectrum", speedup=1.3)
    policy = Spectrum(cfg, {"fixed_decode_seconds": 1e-4})
    plan = policy.plan(cands, {})
    t = sum(cost.dense_time(*u.targets[0].shape) if d.rank is None else cost.lowrank_time(*u.targets[0].shape, d.rank)
            for u, d in plan.items())
    dense = sum(cost.dense_time(*s) for s in shapes)
    assert (dense + 1e-4) / (t + 1e-4) >= 1.3 - 1e-9
    assert all(d.rank is None or d.rank % 8 == 0 for d in plan.values())  # kernel-aware rounding


# ----------------------------------------------------------------------------------------------- search


def test_spread_layers():
    assert spread_layers(2, 11, 1) == [11] and spread_layers(2, 11, 2) == [2, 11]
    assert spread_layers(1, 5, 3) == [1, 3, 5] and spread_layers(1, 5, 5) == [1, 2, 3, 4, 5]


def test_search_returns_a_verified_front_and_a_plan_compress_reproduces(tmp_path):
    tok = tiny_tokenizer()
    text = sample_text(4000, seed=2)
    dev = [sample_text(1500, seed=9)]
    model = llama()
    cfg = CompressConfig(method="whiten", calib_samples=8, seq_len=16, batch_size=8)
    settings = SearchSettings(tau=0.05, dev_windows=8, keeps=(0.9, 0.7), verify=2)
    result = search(model, tok, [text], dev, cfg, settings, progress=False, store_dtype=torch.float16)
    files = write_search(result, tmp_path / "s")
    best = result["configurations"][result["best"]]
    assert best["verified"]["feasible"] and best["verified"]["increase"] <= 0.05
    front = [result["configurations"][i] for i in result["front"]]
    assert all(a["predicted"]["edp"] <= b["predicted"]["edp"] and a["increase"] > b["increase"]
               for a, b in zip(front, front[1:]))
    assert {c["family"] for c in result["configurations"]} >= {"seed-recipe", "structured", "allocated (spectrum)"}
    assert all(p.exists() for p in files)
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert plan["model"] == model_digest(model)
    # compress --plan reproduces the verified figure exactly (same statistics, same ranks, same evaluation)
    again = llama()
    compress_(again, CompressConfig(method="whiten", calib_samples=8, seq_len=16, batch_size=8, allocation="plan",
                                    policy_options={"ranks": plan["ranks"]}), calib=[text], tokenizer=tok, progress=False)
    if rankcut.modules.rankcut_modules(again):  # through a float16 checkpoint, as verified
        again = rankcut.load(rankcut.save(again, tmp_path / "ck", dtype="float16"), dtype=torch.float32)
    else:
        for param in again.parameters():
            param.data = param.data.half().float()
    ppl = rankcut.perplexity(again, tok, dev, 16, 8, 8, progress=False)
    assert ppl == best["verified"]["dev_ppl"]


def test_search_bad_input():
    with pytest.raises(ValueError, match="tau must be a number > 0"):
        SearchSettings(tau=0)
    with pytest.raises(ValueError, match="tau must be a number > 0"):
        SearchSettings(tau=-0.1)
    with pytest.raises(ValueError, match="unknown objective"):
        SearchSettings(objective="speed")


def test_cli_sensitivity_then_compress_and_plan_errors(tmp_path, capsys):
    from rankcut.cli import main

    model_dir = save_tiny(tmp_path / "m", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(4000, seed=3))
    common = ["--calib", str(calib), "--calib-samples", "8", "--seq-len", "16", "--quiet"]
    sens = tmp_path / "sens"
    assert main(["sensitivity", str(model_dir), *common, "--score-windows", "4", "--fractions", "0.5,1",
                 "-o", str(sens)]) == 0
    assert (sens / "sensitivity_heatmap.png").is_file() and (sens / "sensitivity_curves.png").is_file()
    out = tmp_path / "c"
    assert main(["compress", str(model_dir), *common, "--allocation", "sensitivity", "--sensitivity", str(sens),
                 "--keep", "0.6", "-o", str(out)]) == 0
    record = json.loads((out / "rankcut.json").read_text())
    assert record["config"]["allocation"] == "sensitivity" and record["config"]["policy_options"]["key"]
    capsys.readouterr()
    assert main(["compress", str(model_dir), *common, "--allocation", "sensitivity", "--sensitivity", str(sens),
                 "--calib-samples", "7", "-o", str(tmp_path / "x")]) == 2
    assert "other settings: calib_samples" in capsys.readouterr().err and not (tmp_path / "x").exists()
    other = save_tiny(tmp_path / "other", "llama", seed=5)
    plan = tmp_path / "plan.json"
    names = list(rankcut.find_targets(llama()))
    plan.write_text(json.dumps({"ranks": {n: 4 for n in names}, "model": model_digest(llama())}))
    assert main(["compress", str(other), *common, "--plan", str(plan), "-o", str(tmp_path / "y")]) == 2
    assert "plan was made for another model" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["compress", str(model_dir), *common, "--plan", str(plan), "-o", str(tmp_path / "z")]) == 0
    assert set(json.loads((tmp_path / "z" / "rankcut.json").read_text())["targets"]) == set(names)
    assert main(["search", str(model_dir), *common, "--dev", str(calib), "--tau", "0", "-o", str(tmp_path / "s")]) == 2
    assert "tau must be a number > 0" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_spectrum_prior_scales_the_spectral_shape_by_the_measured_point():
    """cost(r) = λ ρ(r) with ρ the relative truncation loss and λ = KL(r0)/ρ(r0): the curve passes through the
    measured point and has the spectrum's shape everywhere else."""
    from rankcut.policies.sensitivity import spectral_scale
    from rankcut.units import Candidate, TargetInfo, Unit

    unit = Unit((TargetInfo("t", (40, 60)),))
    S = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    cand = Candidate(unit, 5, S, float((S ** 2).sum()))
    rel = lambda r: cand.truncation_loss(r) / cand.total  # noqa: E731
    lam = spectral_scale([0.3], [2], cand)
    assert lam * rel(2) == pytest.approx(0.3)
    two = spectral_scale([0.3, 0.12], [2, 3], cand)  # two points: the geometric mean of the two ratios
    assert two == pytest.approx(((0.3 / rel(2)) * (0.12 / rel(3))) ** 0.5)
    assert spectral_scale([0.0], [2], cand) == 0.0


def test_prior_none_needs_a_measured_curve(measured):
    _, result = measured  # three fractions: a curve
    CompressConfig(method="whiten", allocation="sensitivity", calib_samples=8, seq_len=16,
                   policy_options={"prior": "none"})
    single = measure_sensitivity(llama(), None, CALIB, CONFIG, dataclasses.replace(SETTINGS, fractions=(0.5,)),
                                 progress=False)
    with pytest.raises(ValueError, match="prior 'none' uses the measured curve alone"):
        compress_(llama(), CompressConfig(method="whiten", allocation="sensitivity", calib_samples=8, seq_len=16,
                                          policy_options={"prior": "none"}),
                  calib=CALIB, context={"sensitivity": single}, progress=False)
    with pytest.raises(ValueError, match="prior must be one of spectrum, none"):
        CompressConfig(method="whiten", allocation="sensitivity", policy_options={"prior": "flat"})


def test_fisher_score_predicts_the_measured_kl():
    """The second-order prediction is close to the measured single-target KL where the truncation is small."""
    kl = measure_sensitivity(llama(), None, token_windows(60, seed=3), CONFIG,
                             dataclasses.replace(SETTINGS, windows=40, fractions=(0.5, 1.0), rank_multiple=1),
                             progress=False)
    fisher = measure_sensitivity(llama(), None, token_windows(60, seed=3), CONFIG,
                                 dataclasses.replace(SETTINGS, windows=40, score="fisher", rank_multiple=1),
                                 progress=False)
    pairs = [(s, fisher.cost(n, r)) for n, c in kl.curves.items() for r, s in zip(c["ranks"], c["scores"]) if s > 1e-5]
    assert len(pairs) >= 5
    ratios = sorted(f / s for s, f in pairs)
    assert 0.3 < ratios[len(ratios) // 2] < 3  # the median prediction is within a factor 3 of the measurement
    assert all(len(c["ranks"]) == c["limit"] for c in fisher.curves.values())  # every rank scored
