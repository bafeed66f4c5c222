"""Streaming compression (rankcut.streaming): bit-identical to compress_ then save, resumable at block
granularity, refusing what it cannot do, and with a peak host memory that does not grow with depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import rankcut
from rankcut import CheckpointError, CompressConfig, compress_, compress_streaming
from rankcut.io import PROGRESS, weight_files
from rankcut.streaming import StreamedBlocks
from tiny_models import ARCHS, forward, sample_text, tiny_tokenizer, token_windows

from conftest import shared_path

CALIB = token_windows(8)
IDS = token_windows(2, seed=5)
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def deep(arch: str, layers: int, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny ``arch`` model with ``layers`` blocks (the tiny factories fix two)."""
    config = ARCHS[arch].build().config
    config.update({"n_layer" if arch == "gpt2" else "num_hidden_layers": layers})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def source(path: Path, arch: str = "llama", layers: int = 4, dtype: torch.dtype | None = None, seed: int = 0,
           shard: str = "40KB") -> Path:
    """A Hugging Face directory, saved sharded (``shard`` per file) with the tiny tokenizer."""
    model = deep(arch, layers, seed)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(path)
    return path


def in_memory(src: Path, out: Path, config: CompressConfig, calib=CALIB, save_dtype=None):
    """compress_ then save, as the non-streaming path does."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    compress_(model, config, calib=calib, tokenizer=tok, device="cpu", progress=False)
    stored = rankcut.hf.stored_dtype(str(src)) or torch.float32  # what the CLI's --save-dtype source stores
    rankcut.save(model, out, tokenizer=tok, dtype=save_dtype or stored)
    return model


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in weight_files(path):
        out.update(load_file(str(path / name)))
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bit-identical tensors; identical records but for the files (the shard layout) and the timings; identical
    config, generation config and tokenizer files."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), name
    ra, rb = (json.loads((p / "rankcut.json").read_text()) for p in (a, b))
    assert {k for k in ra if ra[k] != rb[k]} <= {"files", "summary"}
    assert {k for k in ra["summary"] if ra["summary"][k] != rb["summary"][k]} <= {"times"}
    assert ra["targets"] == rb["targets"] and ra["dense"] == rb["dense"] and ra["tied"] == rb["tied"]
    side = {p.name for p in a.iterdir() if not p.name.endswith((".safetensors", ".index.json", "rankcut.json"))}
    assert side == {p.name for p in b.iterdir() if not p.name.endswith((".safetensors", ".index.json", "rankcut.json"))}
    for name in side:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


CONFIG = CompressConfig(keep=0.5, calib_samples=8, batch_size=4)


# ------------------------------------------------------------------------------------------ bit identity


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_streaming_equals_compress_then_save(arch, tmp_path):
    """Sharded source; GPT-2 (Conv1D, tied head), OPT (tied head), GPT-NeoX (a renamed head in the file)."""
    layers = 2 if arch == "gpt2" else 3
    src = source(tmp_path / "src", arch, layers=layers)
    assert len(weight_files(src)) > 1
    model = in_memory(src, tmp_path / "memory", CONFIG)
    summary = compress_streaming(src, tmp_path / "stream", CONFIG, calib=CALIB, progress=False)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "memory")
    assert len(weight_files(tmp_path / "stream")) == layers + 1  # one shard per block, one for the rest
    assert summary.keep_targets == pytest.approx(rankcut.load(tmp_path / "memory").rankcut_record.keep_targets)
    expected = forward(model, IDS)
    assert torch.equal(forward(rankcut.load(tmp_path / "stream"), IDS), expected)
    assert torch.equal(forward(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream"), IDS), expected)


@pytest.mark.parametrize("case", ["half source, text calibration", "sequential", "data-free svd"])
def test_streaming_equals_compress_then_save_settings(case, tmp_path):
    if case == "half source, text calibration":
        src = source(tmp_path / "src", dtype=torch.float16)
        config, calib = CompressConfig(keep=0.6, calib_samples=4, seq_len=16, sampling="first"), [sample_text(600)]
    elif case == "sequential":
        src, config, calib = source(tmp_path / "src"), CompressConfig(keep=0.5, calib_samples=8, sequential=True), CALIB
    else:
        src, config, calib = source(tmp_path / "src"), CompressConfig(method="svd", energy=0.9), None
    in_memory(src, tmp_path / "memory", config, calib)
    compress_streaming(src, tmp_path / "stream", config, calib=calib, progress=False)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "memory")
    if case.startswith("half"):
        assert {t.dtype for t in tensors(tmp_path / "stream").values()} == {torch.float16}


@pytest.mark.parametrize("name", ["codellama-16m", "codegpt2-23m"])
def test_streaming_equals_compress_then_save_on_the_testbed(name, tmp_path):
    """The real models (float16 on disk, computed in float32, stored in float16): about 13 s per path each."""
    src = shared_path("testbed", name)
    calib = shared_path("testbed", "calib", "python_calib.txt")
    config = CompressConfig(method="whiten", keep=0.8, calib_samples=8, seq_len=128, sampling="first")
    in_memory(src, tmp_path / "memory", config, str(calib), save_dtype=torch.float16)
    compress_streaming(src, tmp_path / "stream", config, calib=str(calib), progress=False)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "memory")


# ----------------------------------------------------------------------------------------------- resume


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(monkeypatch, stage: str, block: int) -> None:
    """Ctrl-C in StreamedBlocks.load of ``block`` (before it is calibrated) or after its unload (written)."""
    original = getattr(StreamedBlocks, stage)

    def patched(self, index, *args):
        if stage == "load" and index == block:
            raise Interrupt
        out = original(self, index, *args)
        if stage == "unload" and index == block:
            raise Interrupt
        return out

    monkeypatch.setattr(StreamedBlocks, stage, patched)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("stage", ["unload", "load"])
def test_resume_continues_at_the_first_unfinished_block(sequential, stage, tmp_path, monkeypatch):
    src = source(tmp_path / "src", layers=4)
    config = CompressConfig(keep=0.5, calib_samples=8, batch_size=4, sequential=sequential)
    in_memory(src, tmp_path / "memory", config)
    out = tmp_path / "stream"
    with monkeypatch.context() as m:
        interrupt_after(m, stage, 1 if stage == "unload" else 2)
        with pytest.raises(Interrupt):
            compress_streaming(src, out, config, calib=CALIB, progress=False)
    progress = json.loads((out / PROGRESS).read_text())
    assert [d["block"] for d in progress["done"]] == [0, 1]
    assert (progress["activations"] is not None) == sequential
    with pytest.raises(CheckpointError, match="unfinished streaming compression"):
        rankcut.load(out)

    visited = []
    original = rankcut.pipeline.Compression.visit
    monkeypatch.setattr(rankcut.pipeline.Compression, "visit",
                        lambda self, block, targets, stats: (visited.append(block), original(self, block, targets, stats)))
    compress_streaming(src, out, config, calib=CALIB, progress=False)
    assert visited == [2, 3]  # the finished blocks are not calibrated or decomposed again
    assert not (out / PROGRESS).exists() and not (out / "rankcut-activations").exists()
    assert_same_checkpoint(out, tmp_path / "memory")


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    src = source(tmp_path / "src", layers=3)
    out = tmp_path / "stream"
    with monkeypatch.context() as m:
        interrupt_after(m, "unload", 0)
        with pytest.raises(Interrupt):
            compress_streaming(src, out, CONFIG, calib=CALIB, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(config keep: 0.5 there, 0.6 here\).*resume=False"):
        compress_streaming(src, out, CompressConfig(keep=0.6, calib_samples=8, batch_size=4), calib=CALIB,
                           progress=False)
    with pytest.raises(ValueError, match="calibration windows: text 8x16 .* there, text 8x16 .* here"):
        compress_streaming(src, out, CONFIG, calib=token_windows(8, seed=9), progress=False)
    with pytest.raises(ValueError, match="storage dtype: float32 there, float16 here"):
        compress_streaming(src, out, CONFIG, calib=CALIB, save_dtype="float16", progress=False)
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for name, what in (("model.layers.0.mlp.up_proj.weight", "the weights of block 0 in .* differ from those it "
                        "compressed"), ("model.embed_tokens.weight", "source model: the tensors outside the blocks")):
        file = src / index[name]  # another model of the same shapes: same sizes, same headers
        with safe_open(str(file), "pt") as handle:
            state, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
        state[name] = state[name] + 1
        save_file(state, str(file), metadata=metadata)
        with pytest.raises(ValueError, match=what):
            compress_streaming(src, out, CONFIG, calib=CALIB, progress=False)
    assert json.loads((out / PROGRESS).read_text())["done"]  # refusing changed nothing
    compress_streaming(src, out, CONFIG, calib=CALIB, resume=False, progress=False)  # starts over
    in_memory(src, tmp_path / "memory", CONFIG)
    assert_same_checkpoint(out, tmp_path / "memory")


def test_source_digest_is_model_digest(tmp_path):
    """A plan from rankcut search names the weights it was made for; the streaming CLI checks it block by block."""
    from rankcut.sensitivity import model_digest
    from rankcut.streaming import SourceModel, source_digest

    for arch in ("llama", "gpt2"):
        src = source(tmp_path / arch, arch, layers=2, dtype=torch.float16)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        assert source_digest(SourceModel(src, torch.float32)) == model_digest(loaded)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist .*a Hub id\\? .*download it first"):
        compress_streaming("org/model", tmp_path / "out", CONFIG, calib=CALIB)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        compress_streaming(tmp_path / "file", tmp_path / "out", CONFIG, calib=CALIB)
    with pytest.raises(ValueError, match="no config.json"):
        compress_streaming(tmp_path, tmp_path / "out", CONFIG, calib=CALIB)
    model = deep("llama", 2)
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle weights .*not safetensors"):
        compress_streaming(tmp_path / "bin", tmp_path / "out", CONFIG, calib=CALIB)
    src = source(tmp_path / "src", layers=2)
    compress_streaming(src, tmp_path / "ckpt", CONFIG, calib=CALIB, progress=False)
    with pytest.raises(ValueError, match="is a rankcut checkpoint"):
        compress_streaming(tmp_path / "ckpt", tmp_path / "out", CONFIG, calib=CALIB)
    assert not (tmp_path / "out").exists()


def test_output_rules(tmp_path):
    src = source(tmp_path / "src", layers=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        compress_streaming(src, tmp_path / "data", CONFIG, calib=CALIB, overwrite=True, progress=False)
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    compress_streaming(src, out, CONFIG, calib=CALIB, progress=False)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        compress_streaming(src, out, CONFIG, calib=CALIB, progress=False)
    compress_streaming(src, out, CompressConfig(keep=0.3, calib_samples=8), calib=CALIB, overwrite=True, progress=False)
    assert rankcut.load(out).rankcut_record.config["keep"] == 0.3


@pytest.mark.parametrize("config, match", [
    (CompressConfig(keep=0.5, calib_samples=8, allocation="spectrum"), "plans every target at once"),
    (CompressConfig(keep=0.5, calib_samples=8, layerwise=False), "layerwise=False"),
    (CompressConfig(keep=0.5, calib_samples=8, factor_dtype="int8"), "factor_dtype"),
    (CompressConfig(method="tucker", keep=0.5, calib_samples=8, options={"group": "layers"}), "several blocks"),
    (CompressConfig(keep=0.5, calib_samples=8, include=["lm_head"]), "inside the transformer blocks"),
])
def test_settings_streaming_cannot_do_are_refused_before_writing(config, match, tmp_path):
    src = source(tmp_path / "src", layers=2)
    with pytest.raises(ValueError, match=match):
        compress_streaming(src, tmp_path / "out", config, calib=CALIB, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- CLI


def cli(*argv) -> int:
    from rankcut.cli import main

    return main([str(a) for a in argv])


def test_cli_streaming(tmp_path, capsys, monkeypatch, caplog):
    src = source(tmp_path / "src", layers=3)
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(2000))
    common = ["--calib", calib, "--calib-samples", 4, "--seq-len", 16, "--keep", 0.6, "--quiet"]
    assert cli("compress", src, "-o", tmp_path / "memory", *common) == 0
    with monkeypatch.context() as m:
        interrupt_after(m, "unload", 0)
        assert cli("compress", src, "-o", tmp_path / "stream", "--streaming", *common) == 130
    err = capsys.readouterr().err
    assert f"interrupted; the blocks finished so far are in {tmp_path / 'stream'}: run the same command again" in err
    assert cli("compress", src, "-o", tmp_path / "stream", "--streaming", "--keep", 0.5, *common[:-3], "--quiet") == 2
    assert "other settings (config keep: 0.6 there, 0.5 here)" in capsys.readouterr().err
    assert cli("compress", src, "-o", tmp_path / "stream", "--streaming", *common) == 0
    printed = capsys.readouterr()
    assert "resuming the streaming compression" in caplog.text and "at block 1 of 3" in caplog.text
    assert "saved" in printed.out and "checkpoint:" in printed.out
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "memory")
    assert cli("compress", src, "-o", tmp_path / "stream", "--streaming", *common) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    record = rankcut.io.read_record(tmp_path / "stream")
    plan = {"ranks": {**record.ranks, **{name: None for name in record.dense}}, "model": "0" * 64}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert cli("compress", src, "-o", tmp_path / "planned", "--streaming", "--plan", tmp_path / "plan.json",
               *common[:-3], "--quiet") == 2
    assert "the plan was made for another model" in capsys.readouterr().err
    from rankcut.sensitivity import model_digest

    plan["model"] = model_digest(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert cli("compress", src, "-o", tmp_path / "planned", "--streaming", "--plan", tmp_path / "plan.json",
               *common[:-3], "--quiet") == 0
    assert rankcut.io.read_record(tmp_path / "planned").ranks == record.ranks
    assert cli("compress", "org/model", "-o", tmp_path / "x", "--streaming", *common) == 2
    assert "download it first" in capsys.readouterr().err
    assert cli("compress", src, "-o", tmp_path / "x", "--streaming", "--full-model", *common) == 2
    assert "--full-model" in capsys.readouterr().err
    assert cli("compress", src, "-o", tmp_path / "x", "--restart", *common) == 2
    assert "--restart applies to --streaming" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ memory


def test_peak_host_memory_does_not_grow_with_depth(tmp_path):
    """benchmarks/streaming_7b.py, small: 4 and 16 blocks of hidden 768 (25 MB of float32 weights each); the
    streaming peak RSS stays flat while the in-memory one grows with the weights."""
    shape = ["--hidden", 768, "--intermediate", 2048, "--heads", 12, "--kv-heads", 4, "--vocab", 256,
             "--dtype", "float16", "--shard-mb", 64, "--method", "asvd", "--rank", 8, "--solver", "randomized",
             "--calib-samples", 4, "--seq-len", 32, "--batch-size", 4, "--device", "cpu"]
    runs = {}
    def command(layers):
        return [str(a) for a in [sys.executable, ROOT / "benchmarks" / "streaming_7b.py", "--workdir",
                                 tmp_path / str(layers), "--layers", layers, *shape, "--json",
                                 tmp_path / f"{layers}.json", *(["--check"] if layers == 4 else [])]]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {layers: subprocess.Popen(command(layers), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env)
             for layers in (4, 16)}  # both at once: the child processes spend most of their time importing
    for layers, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        report = json.loads((tmp_path / f"{layers}.json").read_text())
        if layers == 4:  # the script's own check (bit identity itself is tested above)
            assert report["check"]["bit_identical"] and report["check"]["same_record_targets"], report["check"]
        runs[layers] = {r["mode"]: r["peak_rss_bytes"] for r in report["results"]}
    print({layers: {mode: f"{rss / 2**20:.0f} MiB" for mode, rss in r.items()} for layers, r in runs.items()})
    block = 25 << 20
    grew_memory = runs[16]["memory"] - runs[4]["memory"]
    grew_stream = runs[16]["streaming"] - runs[4]["streaming"]
    assert grew_memory > 8 * block, runs  # 12 more blocks held (and saved) by the in-memory path
    assert grew_stream < 2 * block, runs
    assert runs[16]["streaming"] < runs[16]["memory"] - 8 * block, runs
