"""The command line on tiny saved models and text files: every subcommand's happy path and errors, what it
prints, and the behaviours a new user found (dtype of the checkpoint, labels, messages in the CLI's words,
interruptions, --quiet, --help)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rankcut
from rankcut import report
from rankcut.cli import CLIError, build_parser, cli_message, main
from rankcut.cli.flags import parse_override
from tiny_models import forward, sample_text, save_tiny, token_windows

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


def ranks(path) -> dict[str, int]:
    return {name: entry["rank"] for name, entry in json.loads((path / "rankcut.json").read_text())["targets"].items()}


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
    assert record["config"]["method"] == "whiten" and record["config"]["keep"] == 0.5
    assert record["config"]["calib_samples"] == 4 and record["config"]["seq_len"] == 16
    assert record["calibration"]["source"] == "calib"
    assert len(record["targets"]) == 14
    summary = json.loads((files["root"] / "summary.json").read_text())
    assert {"summary", "config", "argv", "environment", "checkpoint"} <= set(summary)
    assert summary["summary"]["keep_targets"] <= 0.5
    assert summary["checkpoint"]["bytes"] == (checkpoint / "model.safetensors").stat().st_size
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
    assert data["params"] < data["baseline"]["params"] and data["baseline"]["label"] == "dense"
    assert "dense" in printed and "compressed" in printed and "heldout" in printed
    assert f"parameters: dense {data['baseline']['params']:,}, compressed {data['params']:,}" in printed
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
    got = ranks(out)
    assert got["model.layers.0.mlp.down_proj"] == 2 and got["model.layers.1.mlp.down_proj"] == 2
    assert "model.layers.0.mlp.up_proj" not in got and "model.layers.0.mlp.up_proj" in record["dense"]
    assert not any("layers.1.self_attn" in n for n in got)
    assert record["config"]["overrides"] == {"re:down_proj": {"rank": 2}, "model.layers.0.mlp.up_proj": {"dense": True}}

    out2 = tmp_path / "o2"
    code = main(["compress", str(files["model"]), "--method", "asvd", "--include", "re:q_proj$", "--include",
                 "model.layers.0.mlp.gate_proj", "--calib", str(files["calib"]), "--full-model", "--alpha", "0.25",
                 *FAST, "-o", str(out2)])
    assert code == 0
    assert sorted(ranks(out2)) == ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.q_proj",
                                   "model.layers.1.self_attn.q_proj"]
    options = json.loads((out2 / "rankcut.json").read_text())["config"]["options"]
    assert options["alpha"] == 0.25 and options["solver"] == "exact"


def test_overwrite_replaces_checkpoint(files, tmp_path):
    out = tmp_path / "o"
    base = ["compress", str(files["model"]), "--method", "svd", *FAST, "-o", str(out)]
    assert main([*base, "--rank", "3"]) == 0
    assert main([*base, "--rank", "2", "--overwrite"]) == 0
    assert set(ranks(out).values()) == {2}
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


def test_gpt2_conv1d_values_through_the_cli(tmp_path):
    """GPT-2's Conv1D layers (weight stored in x out): the CLI's checkpoint computes exactly what compress_ in
    Python computes with the same settings, and with svd its factors are the truncated SVD of the dense W."""
    import transformers

    from rankcut.modules import low_rank_modules

    path = save_tiny(tmp_path / "gpt2", "gpt2")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(400, seed=1))
    out = tmp_path / "whiten"
    assert main(["compress", str(path), "--method", "whiten", "--keep", "0.5", "--calib", str(calib), *FAST,
                 "-o", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = rankcut.CompressConfig(method="whiten", keep=0.5, calib_samples=4, seq_len=16, batch_size=4)
    rankcut.compress_(model, config, calib=str(calib), tokenizer=tok, device="cpu", progress=False)
    ids = token_windows(3)
    assert torch.equal(forward(rankcut.load(out), ids), forward(model, ids))

    rank = 4
    out = tmp_path / "svd"
    assert main(["compress", str(path), "--method", "svd", "--rank", str(rank), "--quiet", "-o", str(out)]) == 0
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = low_rank_modules(rankcut.load(out))
    assert len(layers) == 8 and any(n.endswith("attn.c_attn") for n in layers)
    for name, layer in layers.items():
        conv = dense.get_submodule(name)
        assert type(conv).__name__ == "Conv1D"
        W = conv.weight.detach().double().T  # Conv1D stores (in, out); the layer computes x W^T + b
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        got = layer.U.weight.double() @ layer.V.weight.double()
        torch.testing.assert_close(got, (U[:, :rank] * S[:rank]) @ Vh[:rank], rtol=0, atol=1e-5)
        # Eckart–Young: what the factors leave out is exactly the dropped singular values' energy
        got = got.detach()
        assert float(((W - got) ** 2).sum()) == pytest.approx(float((S[rank:] ** 2).sum()), rel=1e-4)
        assert torch.equal(layer.U.bias, conv.bias)


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


def test_every_flag_has_help_with_its_default():
    """Item 13: walk every subcommand; each flag says what it does and, unless it is off/empty by default, its
    default."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"compress", "eval", "analyze", "sensitivity", "search", "sweep", "recover", "bench",
                                "generate"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), where
            off = action.default is None or action.default is False or action.default == []
            if action.option_strings and not off:
                assert "default" in action.help, where
    help_of = {a.dest: a.help for a in sub.choices["recover"]._actions}
    assert "(default: 16)" in help_of["lora_rank"] and "(default: 5 %% of --steps)" in help_of["warmup_steps"]
    assert "0.8,0.85,0.9,0.95,0.99" in {a.dest: a.help for a in sub.choices["analyze"]._actions}["thresholds"]
    compress = {a.dest: a.help for a in sub.choices["compress"]._actions}
    assert "seed" in compress["seed"] and "(default: 0)" in compress["seed"]
    assert "forward pass" in compress["batch_size"] and "float64" in compress["svd_dtype"]
    assert "asvd" in compress["alpha"] and "(default: 0.5)" in compress["alpha"]


def test_method_option_flags_come_from_the_config_dataclasses():
    import dataclasses

    from rankcut.methods import available_methods, get_method

    compress = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["compress"]
    by_dest = {a.dest: a for a in compress._actions}
    for method in available_methods():
        for f in dataclasses.fields(get_method(method).config_cls):
            action = by_dest[f.name]
            assert action.default is None and action.option_strings == ["--" + f.name.replace("_", "-")]
            assert action.type is type(f.default)


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
    "option of another method": (["--method", "whiten", "--alpha", "0.3"], "--alpha is an option of asvd, not of whiten"),
    "missing calib for whiten": (["--method", "whiten"], "needs --calib"),
    "missing calib for asvd": (["--method", "asvd"], "needs --calib"),
    "calib file missing": (["--method", "whiten", "--calib", "{root}/nope.txt"], "--calib {root}/nope.txt: no such file"),
    "calib too short": (["--method", "whiten", "--calib", "{short}"], "too short"),
    "calib is binary": (["--method", "whiten", "--calib", "{model}/model.safetensors"], "not a text file"),
    "bad override": (["--method", "svd", "--override", "re:q_proj=keep:zero"], "--override"),
    "override out of range": (["--method", "svd", "--override", "re:q_proj=keep:2"], "keep"),
    "bad regex": (["--method", "svd", "--include", "re:(unclosed"], "regular expression"),
    "no targets": (["--method", "svd", "--include", "re:nothing_matches"], "no target layers"),
    "calib samples 0": (["--method", "svd", "--calib-samples", "0"], "--calib-samples: calib_samples must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_compress_input(case, files, tmp_path, capsys):
    extra, match = BAD[case]
    extra = [a.format(root=files["root"], short=files["short"], model=files["model"]) for a in extra]
    match = match.format(root=files["root"])
    out = tmp_path / "out"
    run_error(capsys, ["compress", str(files["model"]), *FAST, *extra, "-o", str(out)], match)
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
    err = run_error(capsys, argv, "pass --overwrite")
    assert "overwrite=True" not in err
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
    err = run_error(capsys, ["compress", str(path), "--method", "whiten", "--calib", str(files["calib"]), *FAST,
                             "-o", str(out)], "tokenizer")
    assert "tokenizer=" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--keep", "abc"], ["--keep", "0.5", "--rank", "3"], ["--dtype", "int8"],
                                  ["--save-dtype", "int8"]])
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
    run_error(capsys, ["eval", str(checkpoint), "--ppl", str(tmp_path / "nope.txt"), "--quiet"], "--ppl")
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


def test_binary_ppl_file_is_an_error(files, checkpoint, tmp_path, capsys):
    """New-user item 2: a binary --ppl file (the checkpoint's own .safetensors) is an error, not decoded with
    replacement characters and evaluated; so is a file that is not UTF-8."""
    json_out = tmp_path / "r.json"
    run_error(capsys, ["eval", str(checkpoint), "--ppl", str(checkpoint / "model.safetensors"), "--json",
                       str(json_out), "--quiet"], "is not a text file (it holds NUL bytes")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    run_error(capsys, ["eval", str(checkpoint), "--ppl", str(latin), "--quiet"], "is not UTF-8 text (invalid byte at offset 3)")
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


# ------------------------------------------------------------------------- found by a new user (issue #10)


def test_compress_keeps_the_source_dtype(tmp_path, capsys):
    """Item 1: on a CPU the work runs in float32, but the checkpoint stores the source's dtype (float16 here)
    unless --save-dtype says otherwise; the summary ends with both sizes."""
    from safetensors import safe_open

    source = save_tiny(tmp_path / "fp16", "llama", dtype=torch.float16)
    assert rankcut.hf.stored_dtype(str(source)) == torch.float16
    sizes = {}
    for save_dtype, want in (("source", torch.float16), ("float32", torch.float32)):
        out = tmp_path / save_dtype
        capsys.readouterr()
        assert main(["compress", str(source), "--method", "svd", "--keep", "0.5", "--save-dtype", save_dtype,
                     "--quiet", "-o", str(out)]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        name = str(want).removeprefix("torch.")
        assert re.fullmatch(rf"checkpoint: [\d.]+ k?B \(source model [\d.]+ k?B; {name}.*\)", last), last
        with safe_open(str(out / "model.safetensors"), "pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {want}
        assert json.loads((out / "config.json").read_text())["base_config"]["dtype"] == name
        assert next(rankcut.load(out).parameters()).dtype == want
        sizes[save_dtype] = (out / "model.safetensors").stat().st_size
    assert sizes["float32"] > 1.9 * sizes["source"]
    assert "the source stores float16" in last


def test_size_line_of_a_hub_model_is_an_estimate():
    assert report.size_line(27_600_000, 31_473_456, "float16") == "checkpoint: 27.6 MB (source model 31.5 MB; float16)"
    line = report.size_line(27_600_000, 31_467_264, "float16", "float16", estimated_from=15_733_632)
    assert "~31.5 MB estimated: 15,733,632 parameters in float16" in line


def test_quiet_silences_the_speed_warning_which_prints_once(files, tmp_path, monkeypatch, caplog):
    """Item 3: compress_'s decode-speed warning is a prediction for an H200, logged once per process and said
    to be one; --quiet silences it."""
    from rankcut import cost

    monkeypatch.setattr(cost, "_warned", [False])
    argv = ["compress", str(files["model"]), "--method", "svd", "--keep", "0.5"]
    assert main([*argv, "--quiet", "-o", str(tmp_path / "a")]) == 0
    assert not [r for r in caplog.records if r.name == "rankcut.cost"]
    assert logging.getLogger("rankcut.cost").level == logging.NOTSET  # restored after the run
    monkeypatch.setattr(cost, "_warned", [False])  # the quiet run used this process's one warning
    assert main([*argv, "-o", str(tmp_path / "b")]) == 0
    assert main([*argv, "-o", str(tmp_path / "c")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "rankcut.cost"]
    assert len(warned) == 1 and "H200" in warned[0] and "not a measurement of this CPU" in warned[0]


def test_eval_labels_progress_and_announces_the_windows(files, checkpoint, capsys):
    """Item 4: the two progress bars say which model they measure; one line per text says how many windows
    it holds and, on the CPU, estimates the time from one timed batch."""
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--ppl", str(files["heldout"]), "--baseline", str(files["model"]),
                 "--seq-len", SEQ, "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert "ppl heldout (compressed)" in err and "ppl heldout (dense)" in err
    lines = [line for line in out.splitlines() if line.startswith("ppl heldout (")]
    assert len(lines) == 2 and all(re.search(r": [\d,]+ tokens = \d+ windows of 16 tokens, all evaluated", l) for l in lines)
    assert all("on this CPU (an estimate from one timed batch of 2 windows)" in l for l in lines)


def test_windows_line_warns_about_long_cpu_runs():
    line = report.windows_line("python_heldout", "compressed", 1713 * 512 + 7, 512, 1713, 190.0, 8, "cpu")
    assert line.startswith("ppl python_heldout (compressed): 877,063 tokens = 1,713 windows of 512 tokens, all evaluated")
    assert "about 3 min on this CPU" in line and "warning: 1,713 windows" in line and "--max-windows" in line
    assert "warning" not in report.windows_line("t", "dense", 1713 * 512, 512, 24, None, 8, "cpu")
    assert "the first 24 evaluated" in report.windows_line("t", "dense", 1713 * 512, 512, 24)


def test_compressed_baseline_is_named_not_called_dense(files, checkpoint, tmp_path, capsys):
    """Item 6: a baseline that is itself a rankcut checkpoint is labelled with its name, never "dense"."""
    other = files["root"] / "ckpt80"
    if not other.exists():
        assert main(["compress", str(files["model"]), "--method", "whiten", "--keep", "0.8", "--calib",
                     str(files["calib"]), *FAST, "-o", str(other)]) == 0
    md, js = tmp_path / "e.md", tmp_path / "e.json"
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--ppl", str(files["heldout"]), "--baseline", str(other), "--seq-len", SEQ,
                 "--max-windows", "4", "--markdown", str(md), "--json", str(js), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dense" not in out and "dense" not in md.read_text()
    assert re.search(r"^text\s+ckpt80\s+compressed\s+change$", out, flags=re.M), out
    data = json.loads(js.read_text())
    ratio = data["params"] / data["baseline"]["params"]
    assert (f"parameters: ckpt80 {data['baseline']['params']:,}, compressed {data['params']:,} ({ratio:.4f} of ckpt80); "
            f"ckpt80 itself keeps {data['baseline']['keep_model']:.4f} of its source model") in out
    assert data["baseline"]["label"] == "ckpt80" and "| text | ckpt80 | compressed | change |" in md.read_text()


def test_messages_speak_the_cli():
    """Item 8: API wording naming Python keywords becomes the flags, in one place (cli_message)."""
    flags = {"overwrite": "--overwrite", "restart": "--restart", "dense": "--dense", "max_windows": "--max-windows",
             "alpha": "--alpha", "calib": "--calib"}
    assert cli_message("output o exists; pass overwrite=True to replace it", flags) == \
        "output o exists; pass --overwrite to replace it"
    assert cli_message("folder w holds a run (differing: config); pass restart (--restart) to discard it", flags) == \
        "folder w holds a run (differing: config); pass --restart to discard it"
    assert cli_message("distillation (distill > 0) needs the dense model as teacher (dense=...): the dense model is "
                       "the teacher", flags).startswith("--distill needs --dense MODEL")
    assert cli_message("method 'whiten' needs calibration data (calib=...)", flags) == "method 'whiten' needs --calib TEXT"
    assert cli_message("max_windows must be >= 1, got 0", flags) == "--max-windows: max_windows must be >= 1, got 0"
    assert cli_message("option(s) alpha apply to none of the methods svd", flags) == \
        "option(s) --alpha apply to none of the methods svd"
    assert cli_message("a file at /x/max_windows must stay", {}) == "a file at /x/max_windows must stay"


def test_recover_messages_speak_the_cli(files, checkpoint, tmp_path, capsys):
    """Item 8, recover: a work folder of other settings asks for --restart; a missing teacher for --dense."""
    work = tmp_path / "work"
    common = ["recover", str(checkpoint), "--data", str(files["calib"]), "--steps", "2", "--lora-rank", "2",
              "--seq-len", SEQ, "--batch-size", "4", "--device", "cpu", "--work-dir", str(work), "--quiet"]
    assert main([*common, "--keep-work", "-o", str(tmp_path / "a")]) == 0
    assert work.exists()
    err = run_error(capsys, [*common, "--lr", "1e-3", "-o", str(tmp_path / "b")], "pass --restart to discard it")
    assert "restart (--restart)" not in err and not (tmp_path / "b").exists()
    assert main([*common, "--lr", "1e-3", "--restart", "-o", str(tmp_path / "b")]) == 0
    err = run_error(capsys, [*common, "--distill", "0.5", "-o", str(tmp_path / "c")], "--distill needs --dense MODEL")
    assert "dense=" not in err


def test_interrupt_during_startup_is_one_line(monkeypatch, capsys):
    """Item 9: Ctrl-C while the subcommands are imported (main's first step) is one line and exit code 130."""
    import importlib.abc

    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rankcut.cli.bench":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "rankcut.cli.bench", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    capsys.readouterr()
    assert main(["--version"]) == 130
    err = capsys.readouterr().err
    assert err == "rankcut: interrupted; nothing was saved\n"


def test_interrupt_while_working_starts_its_own_line(files, tmp_path, monkeypatch, capsys):
    """Item 9/11: Ctrl-C in the middle of a progress bar: the bar is closed first, the message is one line of
    its own, nothing is written, exit code 130."""
    from tqdm.auto import tqdm

    def interrupted(*args, **kwargs):
        bar = tqdm(total=10, desc="working")
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr("rankcut.hf.load_any", interrupted)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["compress", str(files["model"]), "--method", "svd", "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert "working" in err and "\nrankcut: interrupted; nothing was saved\n" in err
    assert err.count("rankcut:") == 1 and not out.exists()


def test_cli_package_imports_nothing_heavy():
    """Item 9: importing the command line after rankcut adds only itself and standard-library modules; the
    subcommands are imported inside main's error handling."""
    code = ("import sys, rankcut; before = set(sys.modules); import rankcut.cli; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    new = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert "rankcut.cli" in new
    assert all(m == "rankcut.cli" or m.split(".")[0] in sys.stdlib_module_names for m in new), new


def test_eval_warns_when_a_text_is_the_calibration_text(files, checkpoint, capsys):
    """Item 10: evaluating a checkpoint on its own calibration file is flagged."""
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--ppl", str(files["calib"]), "--ppl", str(files["heldout"]),
                 "--seq-len", SEQ, "--max-windows", "2", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(files["calib"]) in warnings[0] and "calibration text" in warnings[0]


def test_quiet_hides_the_loading_bar(files, capsys):
    """Item 11: transformers' "Loading weights" bar shows without --quiet and not with it (and is back after)."""
    from transformers.utils import logging as hf_logging

    argv = ["eval", str(files["model"]), "--ppl", str(files["heldout"]), "--seq-len", SEQ, "--max-windows", "2"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Loading weights" in capsys.readouterr().err
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()
