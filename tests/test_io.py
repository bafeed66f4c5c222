"""Save / load of compressed checkpoints: round trips for every architecture, the Hugging Face adapter,
corruption, overwrite and atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import rankcut
from rankcut import CheckpointError, CompressConfig, LowRankLinear, compress_
from rankcut.io import FORMAT_VERSION
from tiny_models import ARCHS, forward, tiny_tokenizer, token_windows

CALIB = token_windows(8)
IDS = token_windows(2, seed=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def compressed(arch: str = "llama", method: str = "whiten", dtype: torch.dtype | None = None, **kw):
    model = ARCHS[arch].build()
    if dtype is not None:
        model.to(dtype)
    kw.setdefault("keep", 0.5)
    cfg = CompressConfig(method=method, calib_samples=8, batch_size=4, **kw)
    compress_(model, cfg, calib=None if method == "svd" else CALIB, progress=False)
    return model, cfg


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """A saved compressed tiny Llama with a tokenizer; tests that damage it copy it first."""
    model, cfg = compressed("llama", overrides={"model.layers.0.mlp.up_proj": {"dense": True}})
    path = rankcut.save(model, tmp_path_factory.mktemp("ckpt") / "llama", tokenizer=tiny_tokenizer())
    return path, model, cfg


def copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def ranks_of(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_every_architecture(arch, tmp_path):
    model, _ = compressed(arch)
    expected = forward(model, IDS)
    path = rankcut.save(model, tmp_path / arch)

    loaded = rankcut.load(path)
    assert type(loaded) is type(model)
    assert ranks_of(loaded) == ranks_of(model)
    assert torch.equal(forward(loaded, IDS), expected)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert not loaded.training

    auto = transformers.AutoModelForCausalLM if ARCHS[arch].causal else transformers.AutoModel
    hf = auto.from_pretrained(path)
    assert type(hf) is type(model)
    assert torch.equal(forward(hf, IDS), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_automodel_on_causal_checkpoint_gives_bare_decoder(arch, tmp_path):
    model, _ = compressed(arch, method="svd")
    path = rankcut.save(model, tmp_path / "ckpt")
    bare = transformers.AutoModel.from_pretrained(path)
    base = getattr(model, model.base_model_prefix)
    assert type(bare) is type(base)
    with torch.no_grad():
        want = base(input_ids=IDS).last_hidden_state
        got = bare(input_ids=IDS).last_hidden_state
    assert torch.equal(got, want)
    assert sum(isinstance(m, LowRankLinear) for m in bare.modules()) == ARCHS[arch].n_targets


def test_bert_masked_lm_round_trip(tmp_path):
    from tiny_models import bert_mlm

    model = bert_mlm()
    compress_(model, CompressConfig(method="asvd", keep=0.5, calib_samples=8), calib=CALIB, progress=False)
    path = rankcut.save(model, tmp_path / "mlm")
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(path)
    assert torch.equal(forward(mlm, IDS), forward(model, IDS))
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    # BertForMaskedLM has no pooler, a bare BertModel does: refusing beats a randomly initialised pooler
    with pytest.raises(CheckpointError, match="pooler"):
        transformers.AutoModel.from_pretrained(path)


def test_gpt2_tied_embeddings_preserved(tmp_path):
    model, _ = compressed("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    path = rankcut.save(model, tmp_path / "gpt2")
    manifest = json.loads((path / "rankcut.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    for loaded in (rankcut.load(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert torch.equal(forward(loaded, IDS), forward(model, IDS))


def test_tied_llama_round_trip(tmp_path):
    from tiny_models import llama

    model = llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compress_(model, CompressConfig(method="svd", keep=0.5), progress=False)
    path = rankcut.save(model, tmp_path / "tied")
    assert json.loads((path / "rankcut.json").read_text())["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(forward(loaded, IDS), forward(model, IDS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_preserved(dtype, tmp_path):
    # Built the way users get a half model (from_pretrained with a dtype), so that non-persistent buffers
    # such as rotary inv_freq stay float32 as transformers computes them; model.to(dtype) would round them.
    ARCHS["llama"].build().save_pretrained(tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype)
    compress_(model, CompressConfig(method="whiten", keep=0.5, calib_samples=8), calib=CALIB, progress=False)
    assert all(p.dtype == dtype for p in model.parameters())
    expected = forward(model, IDS)
    path = rankcut.save(model, tmp_path / "half")
    for loaded in (rankcut.load(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        assert torch.equal(forward(loaded, IDS), expected)
    as_float = rankcut.load(path, dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    via_hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert {p.dtype for p in via_hf.parameters()} == {torch.float32}


def test_record_contents_and_config_round_trip(llama_ckpt):
    path, model, cfg = llama_ckpt
    manifest = json.loads((path / "rankcut.json").read_text())
    for key in ("format_version", "rankcut_version", "architecture", "config", "targets", "files"):
        assert key in manifest, key
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["rankcut_version"] == rankcut.__version__
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["config"]["method"] == "whiten"
    ranks = ranks_of(model)
    assert {name: e["rank"] for name, e in manifest["targets"].items()} == ranks
    for name, entry in manifest["targets"].items():  # one module-type entry per target
        layer = model.get_submodule(name)
        assert entry == {"type": "lowrank", "rank": ranks[name], "shape": [layer.out_features, layer.in_features],
                         "dtype": "float32"}
    assert "model.layers.0.mlp.up_proj" not in manifest["targets"]
    assert "model.layers.0.mlp.up_proj" in manifest["dense"]
    assert CompressConfig.from_dict(manifest["config"]) == cfg
    assert manifest["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "rankcut" and config["base_config"]["model_type"] == "llama"
    loaded = rankcut.load(path)
    assert isinstance(loaded.rankcut_record, rankcut.Record)
    assert loaded.rankcut_record.to_json() == manifest  # the typed record round-trips through JSON
    assert rankcut.Record.from_json(json.loads(json.dumps(manifest))) == loaded.rankcut_record
    assert CompressConfig.from_dict(loaded.rankcut_record.config) == cfg
    assert isinstance(loaded.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_tokenizer_saved_and_reloads(llama_ckpt):
    path, _, _ = llama_ckpt
    original = tiny_tokenizer()
    reloaded = transformers.AutoTokenizer.from_pretrained(path)
    text = "def add(a, b):\n    return the fox"
    assert reloaded(text)["input_ids"] == original(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text


def test_reload_resave_round_trip(llama_ckpt, tmp_path):
    path, model, _ = llama_ckpt
    loaded = rankcut.load(path)
    again = rankcut.load(rankcut.save(loaded, tmp_path / "again"))
    assert torch.equal(forward(again, IDS), forward(model, IDS))


def test_saving_uncompressed_model_raises(tmp_path):
    with pytest.raises(ValueError, match="compress"):
        rankcut.save(ARCHS["llama"].build(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model = ARCHS["llama"].build()  # all targets stayed dense: nothing low-rank to save
    compress_(model, CompressConfig(method="svd", keep=None, rank=1000), progress=False)
    with pytest.raises(ValueError, match="low-rank"):
        rankcut.save(model, tmp_path / "y")
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------ corruption


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


CORRUPTIONS = {
    "missing weights": (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    "missing record": (lambda p: (p / "rankcut.json").unlink(), r"is not a rankcut checkpoint \(no rankcut.json\)"),
    "missing config": (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    "truncated weights": (lambda p: _truncate(p / "model.safetensors"), "truncated"),
    "flipped byte": (lambda p: _flip_byte(p / "model.safetensors"), "SHA-256"),
    "garbage record": (lambda p: (p / "rankcut.json").write_text("{not json"), "rankcut.json is corrupted"),
    "garbage config": (lambda p: (p / "config.json").write_text("\x00\x01garbage"), "config.json is corrupted"),
    "record not an object": (lambda p: (p / "rankcut.json").write_text("[1, 2]"), "rankcut.json is corrupted"),
    "record without targets": (
        lambda p: (p / "rankcut.json").write_text(
            json.dumps({k: v for k, v in json.loads((p / "rankcut.json").read_text()).items() if k != "targets"})
        ),
        "rankcut.json is corrupted: missing or invalid targets",
    ),
    "unknown module type": (
        lambda p: (p / "rankcut.json").write_text(json.dumps({**(r := json.loads((p / "rankcut.json").read_text())),
            "targets": {**r["targets"], "model.layers.0.self_attn.q_proj": {"type": "hologram", "rank": 2}}})),
        r"model.layers.0.self_attn.q_proj: unknown module type 'hologram'; this rankcut knows .*lowrank",
    ),
    "config not an object": (lambda p: (p / "config.json").write_text("null"), "not a rankcut wrapper config"),
    "newer format": (
        lambda p: (p / "rankcut.json").write_text(
            json.dumps({**json.loads((p / "rankcut.json").read_text()), "format_version": FORMAT_VERSION + 1})
        ),
        "format",
    ),
    "not a wrapper config": (
        lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llama"})),
        "not a rankcut wrapper config",
    ),
    "weights of another model": (None, "fit|shape|missing|unexpected"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint_raises_checkpoint_error(case, llama_ckpt, tmp_path):
    src, _, _ = llama_ckpt
    path = copy_ckpt(src, tmp_path / "broken")
    damage, match = CORRUPTIONS[case]
    if damage is None:  # a valid safetensors file of a differently compressed model, with a matching record
        other, _ = compressed("llama", method="svd", keep=0.3)
        other_path = rankcut.save(other, tmp_path / "other")
        os.replace(other_path / "model.safetensors", path / "model.safetensors")
        manifest = json.loads((path / "rankcut.json").read_text())
        manifest["files"] = json.loads((other_path / "rankcut.json").read_text())["files"]
        (path / "rankcut.json").write_text(json.dumps(manifest))
    else:
        damage(path)
    with pytest.raises(CheckpointError, match=match):
        rankcut.load(path)


def test_checkpoint_error_is_a_value_error_and_missing_dir(tmp_path):
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match="does not exist"):
        rankcut.load(tmp_path / "nowhere")


def test_flipped_byte_without_verification(llama_ckpt, tmp_path):
    """With verify=False the size check still runs; a flipped byte in the header still fails loudly."""
    path = copy_ckpt(llama_ckpt[0], tmp_path / "c")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[10] = ord("#")  # inside the JSON header
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        rankcut.load(path, verify=False)


def test_from_pretrained_on_damaged_checkpoint(llama_ckpt, tmp_path):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "c")
    _flip_byte(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    (path / "rankcut.json").unlink()
    with pytest.raises(CheckpointError):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_plain_transformers_refuses_checkpoint(llama_ckpt):
    """Without ``import rankcut``, transformers must fail, never build the model with random factors."""
    path, _, _ = llama_ckpt
    script = textwrap.dedent(
        f"""
        import sys, transformers
        assert "rankcut" not in sys.modules
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                auto.from_pretrained({str(path)!r})
            except Exception as err:
                print("ERROR", auto.__name__, type(err).__name__, str(err).replace(chr(10), " "))
            else:
                print("LOADED", auto.__name__)
                sys.exit(3)
        assert "rankcut" not in sys.modules
        sys.exit(1)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "LOADED" not in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stdout + result.stderr
    assert all("rankcut" in line for line in errors), errors


# -------------------------------------------------------------------------------- overwrite, atomicity


def test_overwrite_semantics(llama_ckpt, tmp_path):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "ckpt")
    before = (path / "model.safetensors").read_bytes()
    other, _ = compressed("llama", method="svd", keep=0.3)
    with pytest.raises(FileExistsError, match="overwrite"):
        rankcut.save(other, path)
    assert (path / "model.safetensors").read_bytes() == before
    rankcut.save(other, path, overwrite=True)
    assert ranks_of(rankcut.load(path)) == ranks_of(other)
    assert (path / "model.safetensors").read_bytes() != before
    assert not (path / "tokenizer.json").exists()  # the old checkpoint was replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old dirs left

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError):
        rankcut.save(other, empty)
    rankcut.save(other, empty, overwrite=True)
    assert rankcut.load(empty) is not None


def test_refuses_to_overwrite_unrelated_data(tmp_path):
    other, _ = compressed("llama", method="svd")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    (precious / "sub").mkdir()
    (precious / "sub" / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a rankcut checkpoint"):
        rankcut.save(other, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert (precious / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a rankcut checkpoint"):
        rankcut.save(other, afile, overwrite=True)
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "precious"]


class Boom(RuntimeError):
    pass


def _explode(*args, **kwargs):
    raise Boom("interrupted")


@pytest.mark.parametrize("where", ["_fsync_tree", "sha256_file", "RankcutConfig.save_pretrained"])
def test_interrupted_save_leaves_nothing(where, monkeypatch, tmp_path):
    import rankcut.io as rio

    model, _ = compressed("llama", method="svd")
    owner, _, attr = where.rpartition(".")
    monkeypatch.setattr(getattr(rio, owner) if owner else rio, attr, _explode)
    target = tmp_path / "out"
    with pytest.raises(Boom):
        rankcut.save(model, target, tokenizer=tiny_tokenizer())
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_checkpoint(llama_ckpt, monkeypatch, tmp_path):
    import rankcut.io as rio

    path = copy_ckpt(llama_ckpt[0], tmp_path / "ckpt")
    expected = forward(rankcut.load(path), IDS)
    other, _ = compressed("llama", method="svd", keep=0.3)
    monkeypatch.setattr(rio, "_fsync_tree", _explode)
    with pytest.raises(Boom):
        rankcut.save(other, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(forward(rankcut.load(path), IDS), expected)


def test_failed_final_rename_restores_old_checkpoint(llama_ckpt, monkeypatch, tmp_path):
    """If moving the new checkpoint into place fails after the old one was moved aside, the old one returns."""
    from pathlib import Path

    path = copy_ckpt(llama_ckpt[0], tmp_path / "ckpt")
    expected = forward(rankcut.load(path), IDS)
    other, _ = compressed("llama", method="svd", keep=0.3)
    real_rename = Path.rename

    def rename(self, target):
        if ".tmp-" in self.name:
            raise Boom("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Boom):
        rankcut.save(other, path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(forward(rankcut.load(path), IDS), expected)


def test_from_pretrained_passes_attn_implementation_and_warns_on_ignored(llama_ckpt, caplog):
    llama_ckpt = llama_ckpt[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with caplog.at_level("WARNING", logger="rankcut.io"):
        transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt, low_cpu_mem_usage=True)
    assert "ignores low_cpu_mem_usage" in caplog.text
