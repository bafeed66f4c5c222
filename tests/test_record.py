"""The typed record, the module-type registry, format-1 checkpoints, sharded and re-typed saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import rankcut
from rankcut import CompressConfig, LowRankLinear, compress_
from rankcut.io import INDEX, CheckpointError, checkpoint_bytes, weight_files
from rankcut.modules import module_type, module_types, register_module_type
from rankcut.record import Record
from tiny_models import ARCHS, forward, save_tiny, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
IDS = token_windows(2, seed=99)


@pytest.mark.parametrize("name", ["llama_whiten", "gpt2_asvd"])
def test_format_1_checkpoint_still_loads(name):
    """Checkpoints written before the reshaping (format 1, committed as fixtures by the code of that time)
    load through both paths with the logits they had then, bit for bit."""
    path = FIXTURES / name
    assert json.loads((path / "rankcut.json").read_text())["format_version"] == 1
    expected = load_file(str(path / "expected_logits.safetensors"))
    for model in (rankcut.load(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert torch.equal(forward(model, expected["input_ids"]), expected["logits"])
        record = model.rankcut_record
        assert isinstance(record, Record) and record.format_version == 2
        assert record.method == {"llama_whiten": "whiten", "gpt2_asvd": "asvd"}[name]
        assert all(e["type"] == "lowrank" for e in record.targets.values())
        assert record.ranks == {n: m.rank for n, m in rankcut.modules.low_rank_modules(model).items()}
    if name == "llama_whiten":
        assert "model.layers.1.mlp.down_proj" in record.dense
        assert CompressConfig.from_dict(record.config).options.damping == 1e-6


def test_format_1_checkpoint_resaves_as_format_2(tmp_path):
    model = rankcut.load(FIXTURES / "llama_whiten")
    path = rankcut.save(model, tmp_path / "v2")
    assert json.loads((path / "rankcut.json").read_text())["format_version"] == 2
    expected = load_file(str(FIXTURES / "llama_whiten" / "expected_logits.safetensors"))
    assert torch.equal(forward(rankcut.load(path), expected["input_ids"]), expected["logits"])


def test_record_json_round_trip_and_errors():
    record = Record(config=CompressConfig().to_dict(), targets={"a.b": {"type": "lowrank", "rank": 3}},
                    architecture="LlamaForCausalLM")
    again = Record.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and again.ranks == {"a.b": 3}
    data = record.to_json()
    for broken, match in [({**data, "format_version": 3}, "format 3"), ({**data, "colour": 1}, "unknown field"),
                          ({**data, "targets": {"x": {"rank": 2}}}, "needs a module type"), ([1], "JSON object")]:
        with pytest.raises(rankcut.record.RecordError, match=match):
            Record.from_json(broken)


class ScaledLowRank(LowRankLinear):
    """A toy module type: a low-rank layer with an output scale, registered by the test (no change to io)."""

    record_type = "_test_scaled"

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None, scale=1.0):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale

    def record_entry(self):
        return {**super().record_entry(), "scale": self.scale}

    @classmethod
    def from_record(cls, entry, dense, device="meta"):
        out_f, in_f = rankcut.modules.dense_shape(dense)
        return cls(in_f, out_f, entry["rank"], bias=dense.bias is not None, device=device, scale=entry["scale"])


def test_a_new_module_type_loads_without_touching_io(tmp_path):
    register_module_type(ScaledLowRank)
    assert "_test_scaled" in module_types() and module_type("_test_scaled") is ScaledLowRank
    model = ARCHS["llama"].build()
    compress_(model, CompressConfig(method="svd", keep=0.5), progress=False)
    name = "model.layers.0.mlp.up_proj"
    old = model.get_submodule(name)
    new = ScaledLowRank(old.in_features, old.out_features, old.rank, bias=False, scale=0.5)
    new.load_state_dict(old.state_dict())
    rankcut.targets.replace_module(model, name, new)
    path = rankcut.save(model, tmp_path / "ckpt")
    entry = json.loads((path / "rankcut.json").read_text())["targets"][name]
    assert entry["type"] == "_test_scaled" and entry["scale"] == 0.5
    for loaded in (rankcut.load(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert isinstance(loaded.get_submodule(name), ScaledLowRank) and loaded.get_submodule(name).scale == 0.5
        assert torch.equal(forward(loaded, IDS), forward(model, IDS))
    with pytest.raises(ValueError, match="already registered"):
        register_module_type(type("Other", (ScaledLowRank,), {"record_type": "lowrank"}))


def _compressed():
    model = ARCHS["llama"].build()
    compress_(model, CompressConfig(method="whiten", keep=0.5, calib_samples=8), calib=token_windows(8), progress=False)
    return model


def test_sharded_save_covers_every_shard(tmp_path):
    model = _compressed()
    path = rankcut.save(model, tmp_path / "sharded", max_shard_size=20_000)
    shards = weight_files(path)
    assert len(shards) > 2 and (path / INDEX).is_file() and not (path / "model.safetensors").exists()
    record = json.loads((path / "rankcut.json").read_text())
    assert set(record["files"]) == {*shards, INDEX}  # the digests cover every shard and the index
    for loaded in (rankcut.load(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert torch.equal(forward(loaded, IDS), forward(model, IDS))
    assert checkpoint_bytes(path) == sum((path / s).stat().st_size for s in shards)
    data = bytearray((path / shards[1]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / shards[1]).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shards[1]} is corrupted: SHA-256"):
        rankcut.load(path)
    (path / shards[0]).unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[0]} is missing"):
        rankcut.load(path)


def test_save_in_another_dtype_leaves_the_model_alone(tmp_path):
    model = _compressed()
    before = forward(model, IDS)
    path = rankcut.save(model, tmp_path / "half", dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float32} and torch.equal(forward(model, IDS), before)
    stored = load_file(str(path / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    record = json.loads((path / "rankcut.json").read_text())
    assert {e["dtype"] for e in record["targets"].values()} == {"float16"}
    assert json.loads((path / "config.json").read_text())["base_config"]["dtype"] == "float16"
    loaded = rankcut.load(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    torch.testing.assert_close(forward(loaded, IDS).float(), before, rtol=2e-2, atol=2e-2)


def test_load_on_a_plain_model_directory_says_what_it_is(tmp_path):
    plain = save_tiny(tmp_path / "plain", "llama")
    with pytest.raises(CheckpointError, match=r"is not a rankcut checkpoint \(no rankcut.json\): it looks like a "
                                              r"Hugging Face model directory"):
        rankcut.load(plain)


def test_fused_model_saves_and_reloads(tmp_path):
    """Fused layers share storage with their group's buffers; saving copies it (safetensors refuses shared
    memory), and the checkpoint is the same as the unfused one's."""
    model = _compressed()
    reference = forward(model, IDS)
    assert rankcut.prepare_for_inference(model) > 0
    path = rankcut.save(model, tmp_path / "fused")
    assert torch.equal(forward(rankcut.load(path), IDS), reference)
    loaded = rankcut.load(path, fuse=True)
    assert rankcut.fuse.is_fused(loaded)
    torch.testing.assert_close(forward(loaded, IDS), reference, rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, nn.Module)
