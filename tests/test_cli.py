"""The command line: ``rankcut compress`` / ``rankcut eval`` on tiny saved models and text files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import rankcut
from rankcut.cli import CLIError, main, parse_override
from tiny_models import sample_text, save_tiny

SEQ = "16"
FAST = ["--calib-samples", "4", "--seq-len", SEQ, "--batch-size", "4", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny Llama (+ tokenizer), calibration and held-out text files, shared by the module."""
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny(root / "llama", "llama")
    calib = root / "calib.txt"
    calib.write_text(sample_text(400, seed=1))
    heldout = root / "heldout.txt"
    heldout.write_text(sample_text(300, seed=2))
    short = root / "short.txt"
    short.write_text("the fox")
    return {"root": root, "model": model, "calib": calib, "heldout": heldout, "short": short}


@pytest.fixture(scope="module")
def checkpoint(files):
    out = files["root"] / "ckpt"
    code = main(["compress", str(files["model"]), "--method", "whiten", "--keep", "0.5", "--calib", str(files["calib"]),
                 *FAST, "-o", str(out), "--summary-json", str(files["root"] / "summary.json")])
    assert code == 0
    return out


def run_error(capsys, argv: list[str], match: str) -> str:
    """Run the CLI, expect exit code 2 and ``rankcut: error:`` plus ``match`` on stderr; return stderr."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "rankcut: error:" in err, err
    assert "Traceback" not in err
    assert match.lower() in err.lower(), err
    return err


# ---------------------------------------------------------------------------------------- happy paths


def test_compress_writes_a_loadable_checkpoint(files, checkpoint, capsys):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "rankcut.json", "tokenizer.json"} <= names
    record = json.loads((checkpoint / "rankcut.json").read_text())
    assert record["method"] == "whiten" and record["config"]["keep"] == 0.5
    assert record["config"]["calib_samples"] == 4 and record["config"]["seq_len"] == 16
    assert record["record"]["calibration"]["source"] == "calib"
    assert len(record["ranks"]) == 14
    summary = json.loads((files["root"] / "summary.json").read_text())
    assert {"summary", "config", "argv", "environment"} <= set(summary)
    assert summary["summary"]["keep_targets"] <= 0.5
    model = rankcut.load(checkpoint)
    assert sum(isinstance(m, rankcut.LowRankLinear) for m in model.modules()) == 14
    # nothing else (temp dirs) was left next to the output
    assert not [p for p in files["root"].iterdir() if p.name.startswith(".")]


def test_eval_with_baseline_and_json(files, checkpoint, capsys):
    out = files["root"] / "eval.json"
    capsys.readouterr()
    code = main(["eval", str(checkpoint), "--ppl", str(files["heldout"]), "--baseline", str(files["model"]),
                 "--seq-len", SEQ, "--max-windows", "8", "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    assert {"perplexity", "baseline", "params", "model", "environment"} <= set(data)
    assert set(data["perplexity"]) == {"heldout"}
    assert set(data["baseline"]["perplexity"]) == {"heldout"}
    ppl, dense = data["perplexity"]["heldout"], data["baseline"]["perplexity"]["heldout"]
    assert math.isfinite(ppl) and math.isfinite(dense) and ppl > 1 and dense > 1
    assert ppl != dense
    assert data["params"] < data["baseline"]["params"]
    assert "dense" in printed and "compressed" in printed and "heldout" in printed
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".eval")]


def test_eval_without_baseline_matches_python_api(files, checkpoint, capsys):
    out = files["root"] / "eval_plain.json"
    assert main(["eval", str(checkpoint), "--ppl", str(files["heldout"]), "--seq-len", SEQ, "--max-windows", "4",
                 "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert "baseline" not in data
    import transformers

    model = rankcut.load(checkpoint)
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    want = rankcut.perplexity(model, tok, str(files["heldout"]), seq_len=16, max_windows=4, progress=False)
    assert data["perplexity"]["heldout"] == pytest.approx(want, rel=1e-6)


def test_overrides_include_exclude_end_to_end(files, tmp_path):
    out = tmp_path / "o"
    code = main(["compress", str(files["model"]), "--method", "svd", "--keep", "0.5",
                 "--override", "re:down_proj=rank:2", "--override", "model.layers.0.mlp.up_proj=dense",
                 "--exclude", "re:layers\\.1\\.self_attn", *FAST, "-o", str(out)])
    assert code == 0
    record = json.loads((out / "rankcut.json").read_text())
    ranks = record["ranks"]
    assert ranks["model.layers.0.mlp.down_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 2
    assert "model.layers.0.mlp.up_proj" not in ranks and "model.layers.0.mlp.up_proj" in record["dense"]
    assert not any("layers.1.self_attn" in n for n in ranks)
    assert record["config"]["overrides"] == {"re:down_proj": {"rank": 2}, "model.layers.0.mlp.up_proj": {"dense": True}}

    out2 = tmp_path / "o2"
    code = main(["compress", str(files["model"]), "--method", "asvd", "--include", "re:q_proj$", "--include",
                 "model.layers.0.mlp.gate_proj", "--calib", str(files["calib"]), "--full-model", *FAST,
                 "-o", str(out2)])
    assert code == 0
    ranks = json.loads((out2 / "rankcut.json").read_text())["ranks"]
    assert sorted(ranks) == ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.q_proj",
                             "model.layers.1.self_attn.q_proj"]


def test_overwrite_replaces_checkpoint(files, tmp_path):
    out = tmp_path / "o"
    base = ["compress", str(files["model"]), "--method", "svd", *FAST, "-o", str(out)]
    assert main([*base, "--rank", "3"]) == 0
    assert main([*base, "--rank", "2", "--overwrite"]) == 0
    assert set(json.loads((out / "rankcut.json").read_text())["ranks"].values()) == {2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_compress_other_architectures(arch, tmp_path):
    model = save_tiny(tmp_path / arch, arch)
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(300, seed=3))
    out = tmp_path / "out"
    assert main(["compress", str(model), "--method", "whiten", "--energy", "0.9", "--calib", str(calib), *FAST,
                 "-o", str(out)]) == 0
    loaded = rankcut.load(out)
    assert type(loaded).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "BertModel")


def test_override_parsing():
    assert parse_override("re:down_proj=keep:0.9") == ("re:down_proj", {"keep": 0.9})
    assert parse_override("model.layers.0.mlp.up_proj=dense") == ("model.layers.0.mlp.up_proj", {"dense": True})
    assert parse_override("re:a=b=rank:64") == ("re:a=b", {"rank": 64})
    assert parse_override("x=energy:0.95") == ("x", {"energy": 0.95})
    for bad in ["nothing", "=keep:0.5", "x=keep:abc", "x=rank:2.5", "x=size:3", "x=keep"]:
        with pytest.raises(CLIError):
            parse_override(bad)


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "compress" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and rankcut.__version__ in capsys.readouterr().out


def test_real_subprocess_exit_code(tmp_path):
    """The installed entry point (or ``python -m rankcut.cli``) exits 2 with a one-line error."""
    script = shutil.which("rankcut")
    cmd = [script] if script else [sys.executable, "-m", "rankcut.cli"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*cmd, "compress", str(tmp_path / "missing"), "--method", "svd", "-o", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "rankcut: error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------ bad inputs

BAD = {
    "keep 0": (["--method", "svd", "--keep", "0"], "keep must be in (0, 1]"),
    "keep 1.5": (["--method", "svd", "--keep", "1.5"], "keep must be in (0, 1]"),
    "keep nan": (["--method", "svd", "--keep", "nan"], "keep"),
    "energy 0": (["--method", "svd", "--energy", "0"], "energy must be in (0, 1]"),
    "energy 2": (["--method", "svd", "--energy", "2"], "energy"),
    "rank 0": (["--method", "svd", "--rank", "0"], "rank must be >= 1"),
    "unknown method": (["--method", "qr"], "unknown method 'qr'"),
    "unknown solver": (["--method", "svd", "--solver", "lanczosx"], "unknown solver"),
    "missing calib for whiten": (["--method", "whiten"], "needs --calib"),
    "missing calib for asvd": (["--method", "asvd"], "needs --calib"),
    "calib file missing": (["--method", "whiten", "--calib", "{root}/nope.txt"], "no such file"),
    "calib too short": (["--method", "whiten", "--calib", "{short}"], "too short"),
    "bad override": (["--method", "svd", "--override", "re:q_proj=keep:zero"], "--override"),
    "override out of range": (["--method", "svd", "--override", "re:q_proj=keep:2"], "keep"),
    "bad regex": (["--method", "svd", "--include", "re:(unclosed"], "regular expression"),
    "no targets": (["--method", "svd", "--include", "re:nothing_matches"], "no target layers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_compress_input(case, files, tmp_path, capsys):
    extra, match = BAD[case]
    extra = [a.format(root=files["root"], short=files["short"]) for a in extra]
    out = tmp_path / "out"
    run_error(capsys, ["compress", str(files["model"]), *extra, *FAST, "-o", str(out)], match)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    run_error(capsys, ["compress", str(tmp_path / "no_model"), "--method", "svd", "-o", str(out)], "does not exist")
    (tmp_path / "empty_dir").mkdir()
    run_error(capsys, ["compress", str(tmp_path / "empty_dir"), "--method", "svd", "-o", str(out)], "no config.json")
    assert not out.exists()


def test_existing_output_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["compress", str(files["model"]), "--method", "svd", *FAST, "-o", str(out)]
    run_error(capsys, argv, "--overwrite")
    run_error(capsys, [*argv, "--overwrite"], "not a rankcut checkpoint")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_checkpoint_without_overwrite(files, checkpoint, tmp_path, capsys):
    out = shutil.copytree(checkpoint, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    run_error(capsys, ["compress", str(files["model"]), "--method", "svd", *FAST, "-o", str(out)], "exists")
    assert (out / "model.safetensors").read_bytes() == before


def test_non_finite_weights_in_saved_model(tmp_path, capsys):
    import transformers

    path = save_tiny(tmp_path / "nan_model", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    out = tmp_path / "out"
    run_error(capsys, ["compress", str(path), "--method", "svd", *FAST, "-o", str(out)],
              "model.layers.1.self_attn.v_proj")
    assert not out.exists()


def test_text_calibration_without_tokenizer(files, tmp_path, capsys):
    import transformers

    path = tmp_path / "no_tok"
    transformers.AutoModelForCausalLM.from_pretrained(files["model"]).save_pretrained(path)
    out = tmp_path / "out"
    run_error(capsys, ["compress", str(path), "--method", "whiten", "--calib", str(files["calib"]), *FAST,
                       "-o", str(out)], "tokenizer")
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--keep", "abc"], ["--keep", "0.5", "--rank", "3"], ["--dtype", "int8"]])
def test_argparse_errors_exit_2(argv, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", str(files["model"]), *argv, "-o", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "rankcut compress: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_eval_inputs(files, checkpoint, tmp_path, capsys):
    run_error(capsys, ["eval", str(checkpoint), "--quiet"], "nothing to evaluate")
    run_error(capsys, ["eval", str(checkpoint), "--ppl", str(files["short"]), "--seq-len", SEQ, "--quiet"],
              "fewer than one window")
    run_error(capsys, ["eval", str(checkpoint), "--ppl", str(tmp_path / "nope.txt"), "--quiet"], "not an existing file")
    run_error(capsys, ["eval", str(tmp_path / "no_ckpt"), "--ppl", str(files["heldout"]), "--quiet"], "does not exist")
    run_error(capsys, ["eval", str(checkpoint), "--ppl", str(files["heldout"]), "--max-windows", "0", "--quiet"],
              "--max-windows")
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    run_error(capsys, ["eval", str(broken), "--ppl", str(files["heldout"]), "--quiet"], "SHA-256")
    json_out = tmp_path / "r.json"
    run_error(capsys, ["eval", str(broken), "--ppl", str(files["heldout"]), "--json", str(json_out), "--quiet"],
              "corrupted")
    assert not json_out.exists()


def test_eval_of_encoder_is_a_clear_error(tmp_path, capsys):
    path = save_tiny(tmp_path / "bert", "bert")
    text = tmp_path / "t.txt"
    text.write_text(sample_text(200, seed=4))
    run_error(capsys, ["eval", str(path), "--ppl", str(text), "--seq-len", SEQ, "--quiet"], "causal")


def test_python_dash_m_runs_the_same_command_line():
    """``python -m rankcut`` is the ``rankcut`` script: same parser, same exit codes."""
    ok = subprocess.run([sys.executable, "-m", "rankcut", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == f"rankcut {rankcut.__version__}"
    bad = subprocess.run([sys.executable, "-m", "rankcut", "compress", "--keep", "0.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required: model, -o/--output" in bad.stderr
