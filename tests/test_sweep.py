"""``rankcut sweep``: shared dense statistics, per-point equality with compress_, resumability, errors."""

from __future__ import annotations

import json
import math
import sys

import pytest

import rankcut
from rankcut.cli import main
from rankcut.hf import load_any as load_model
from tiny_models import sample_text, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--calib-samples", "4", "--seq-len", "16", "--eval-seq-len", "16", "--max-windows", "4", "--batch-size", "4",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny(root / "llama", "llama")
    calib = root / "calib.txt"
    calib.write_text(sample_text(400, seed=1))
    heldout = root / "heldout.txt"
    heldout.write_text(sample_text(300, seed=2))
    return {"root": root, "model": model, "calib": calib, "heldout": heldout}


def argv(files, out, methods="svd,whiten", keep="0.8,0.5"):
    return ["sweep", str(files["model"]), "--methods", methods, "--keep", keep, "--calib", str(files["calib"]),
            "--ppl", str(files["heldout"]), *FAST, "-o", str(out)]


def test_sweep_end_to_end_matches_compress_and_resumes(files, monkeypatch):
    out = files["root"] / "out"
    assert main(argv(files, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "quality_vs_keep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| whiten | 0.5 |" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(
        f"{m}_keep{k}.json" for m in ("svd", "whiten") for k in ("0.8", "0.5"))
    assert results["seed"] == 0 and results["device"] == "cpu" and "rankcut sweep" in results["command"]
    assert set(results["environment"]) >= {"rankcut", "torch", "transformers"}
    assert len(results["points"]) == 4 and len(results["computed"]) == 4
    name = "heldout"
    dense_model, tok = load_model(str(files["model"]), None)
    dense_ppl = rankcut.perplexity(dense_model, tok, str(files["heldout"]), 16, 4, 4, "cpu", False)
    assert math.isclose(results["dense"]["perplexity"][name], dense_ppl, rel_tol=1e-9)
    for point in results["points"]:
        model, tok = load_model(str(files["model"]), None)
        config = rankcut.CompressConfig(method=point["method"], keep=point["keep"], calib_samples=4, seq_len=16,
                                        batch_size=4)
        summary = rankcut.compress_(model, config, calib=str(files["calib"]), tokenizer=tok, device="cpu", progress=False)
        ppl = rankcut.perplexity(model, tok, str(files["heldout"]), 16, 4, 4, "cpu", False)
        assert math.isclose(point["perplexity"][name], ppl, rel_tol=1e-6), (point["method"], point["keep"])
        assert math.isclose(point["keep_model"], summary.keep_model, rel_tol=1e-12)
        assert point["perplexity"][name] != pytest.approx(dense_ppl)

    # resume: delete one point, re-run; only it is recomputed, and the statistics only for its method
    (out / "points" / "whiten_keep0.5.json").unlink()
    kinds = []
    sweep_mod = sys.modules["rankcut.sweep"]  # the attribute rankcut.sweep is the function
    real = sweep_mod.dense_stats
    monkeypatch.setattr(sweep_mod, "dense_stats", lambda model, kind, *a, **k: kinds.append(kind) or real(model, kind, *a, **k))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert main(argv(files, out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["computed"] == ["whiten_keep0.5"] and kinds == ["gram"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir() if p.name in before} == before
    assert [p["perplexity"] for p in again["points"]] == [p["perplexity"] for p in results["points"]]


def test_sweep_settings_change_needs_overwrite(files, capsys):
    out = files["root"] / "small"
    assert main(argv(files, out, methods="svd", keep="0.5")) == 0
    capsys.readouterr()
    changed = [*argv(files, out, methods="svd", keep="0.5"), "--seed", "3"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to discard it" in err and "overwrite=True" not in err
    assert "settings differ: " in err and "seed: 0 -> 3" in err  # what differs, in the message
    assert main([*changed, "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["seed"] == 3


@pytest.mark.parametrize(
    ("methods", "keep", "match"),
    [("svd", "0.5,1.5", "(0, 1]"), ("svd", "0", "(0, 1]"), ("bogus", "0.5", "unknown method"), ("svd", "a", "numbers")],
)
def test_sweep_bad_inputs(files, capsys, methods, keep, match):
    out = files["root"] / "bad"
    capsys.readouterr()
    assert main(argv(files, out, methods=methods, keep=keep)) == 2
    err = capsys.readouterr().err
    assert "rankcut: error:" in err and match in err and "Traceback" not in err
    assert not out.exists()


def test_sweep_passes_compression_flags_to_every_point(files):
    """Targets, overrides and α reach each point: it equals compress_ with the same settings."""
    out = files["root"] / "flags"
    extra = ["--include", "re:mlp", "--override", "re:down_proj=keep:0.9", "--alpha", "0.25", "--sampling", "first"]
    assert main([*argv(files, out, methods="asvd", keep="0.6"), *extra]) == 0
    point = json.loads((out / "results.json").read_text())["points"][0]
    assert point["config"]["include"] == ["re:mlp"] and point["config"]["options"]["alpha"] == 0.25
    model, tok = load_model(str(files["model"]), None)
    config = rankcut.CompressConfig(method="asvd", keep=0.6, calib_samples=4, seq_len=16, batch_size=4, options={"alpha": 0.25},
                                    include=["re:mlp"], overrides={"re:down_proj": {"keep": 0.9}}, sampling="first")
    summary = rankcut.compress_(model, config, calib=str(files["calib"]), tokenizer=tok, device="cpu", progress=False)
    assert point["summary"]["rows"] == json.loads(json.dumps(summary.to_dict()["rows"]))
    assert all("mlp" in r["name"] for r in point["summary"]["rows"])
    ppl = rankcut.perplexity(model, tok, str(files["heldout"]), 16, 4, 4, "cpu", False)
    assert math.isclose(point["perplexity"]["heldout"], ppl, rel_tol=1e-6)


def test_sweep_method_options_apply_to_the_methods_that_have_them(files, capsys):
    """--alpha reaches asvd only; an option no method of the grid has is an error before any work."""
    out = files["root"] / "alpha"
    assert main([*argv(files, out, methods="svd,asvd", keep="0.5"), "--alpha", "0.25"]) == 0
    configs = {p["method"]: p["config"]["options"] for p in json.loads((out / "results.json").read_text())["points"]}
    assert configs["asvd"]["alpha"] == 0.25 and "alpha" not in configs["svd"]
    capsys.readouterr()
    bad = files["root"] / "alpha_bad"
    assert main([*argv(files, bad, methods="svd,whiten", keep="0.5"), "--alpha", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "rankcut: error: option(s) --alpha apply to none of the methods svd, whiten" in err and not bad.exists()


def test_sweep_is_reproducible_from_its_recorded_command(files, tmp_path):
    """results.json records the command line; running it again (elsewhere) gives the same figures."""
    out = files["root"] / "repro"
    assert main(argv(files, out, methods="svd,whiten", keep="0.5")) == 0
    first = json.loads((out / "results.json").read_text())
    recorded = first["argv"]
    assert recorded[0] == "rankcut" and first["environment"]["rankcut"] == rankcut.__version__
    again = [tmp_path / "again" if a == str(out) else a for a in recorded[1:]]
    assert main([str(a) for a in again]) == 0
    second = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [p["perplexity"] for p in second["points"]] == [p["perplexity"] for p in first["points"]]
    assert second["settings"] == first["settings"]
