"""Encoder embedding fidelity: ``rankcut.evaluate.fidelity`` and ``rankcut eval --fidelity``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rankcut.cli import main
from rankcut.evaluate.fidelity import embedding_fidelity, read_sentences, sentence_embeddings
from tiny_models import bert, sample_text, save_tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [" ".join(sample_text(n, seed=s).split()) for n, s in [(6, 1), (12, 2), (4, 3), (9, 4), (15, 5), (7, 6), (10, 7), (5, 8)]]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_identical_models_are_perfectly_faithful(tok):
    model = bert()
    got = embedding_fidelity(model, copy.deepcopy(model), tok, SENTENCES, batch_size=3)
    assert got["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert got["min_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert got["nn_agreement"] == 1.0
    assert got["n"] == len(SENTENCES)


def test_embeddings_unit_norm_and_padding_invariant(tok):
    model = bert()
    long, short = sample_text(30, seed=11), sample_text(3, seed=12)
    assert len(tok(long)["input_ids"]) > 2 * len(tok(short)["input_ids"])  # the short one gets padded
    together = sentence_embeddings(model, tok, [long, short], batch_size=2)
    assert together.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(2))
    alone = torch.cat([sentence_embeddings(model, tok, [s]) for s in (long, short)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_perturbed_model_is_less_faithful(tok):
    dense = bert()
    model = copy.deepcopy(dense)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight.add_(0.5 * torch.randn_like(layer.intermediate.dense.weight))
    got = embedding_fidelity(model, dense, tok, SENTENCES)
    assert got["mean_cosine"] < 0.999
    assert got["min_cosine"] <= got["mean_cosine"] < 1.0
    assert 0.0 <= got["nn_agreement"] <= 1.0


def test_read_sentences_skips_blank_and_heading_lines(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(" \n = Title = \n\n First line . \n = = Section = = \n Second line . \nThird\n")
    assert read_sentences(path) == ["First line .", "Second line .", "Third"]
    assert read_sentences(path, max_sentences=2) == ["First line .", "Second line ."]
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="at least 2"):
        read_sentences(tmp_path / "one.txt")


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    dense = save_tiny(root / "bert", "bert")
    compressed = root / "bert-svd"
    assert main(["compress", str(dense), "--method", "svd", "--keep", "0.5", "-o", str(compressed), "--quiet"]) == 0
    text = root / "heldout.txt"
    text.write_text(" = Heading = \n\n" + "\n".join(SENTENCES) + "\n")
    return {"root": root, "dense": dense, "compressed": compressed, "text": text}


def test_cli_fidelity_json_and_markdown(encoder_files, capsys):
    f = encoder_files
    out_json, out_md = f["root"] / "eval.json", f["root"] / "eval.md"
    rc = main(["eval", str(f["compressed"]), "--baseline", str(f["dense"]), "--fidelity", str(f["text"]),
               "--max-sentences", "6", "--json", str(out_json), "--markdown", str(out_md), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| heldout | mean_cosine | 1.0000 |" in printed
    data = json.loads(out_json.read_text())
    fid = data["fidelity"]["heldout"]
    assert fid["n"] == 6
    assert 0.0 < fid["mean_cosine"] < 1.0 and fid["min_cosine"] <= fid["mean_cosine"]
    assert 0.0 <= fid["nn_agreement"] <= 1.0
    assert "_embeddings" not in data and "_embeddings" not in data["baseline"]
    md = out_md.read_text()
    assert "## Embedding fidelity" in md and "| heldout | nn_agreement |" in md
    assert f"{fid['mean_cosine']:.4f}" in md


def test_cli_dense_model_against_itself(encoder_files):
    f = encoder_files
    out_json = f["root"] / "self.json"
    assert main(["eval", str(f["dense"]), "--baseline", str(f["dense"]), "--fidelity", str(f["text"]),
                 "--json", str(out_json), "--quiet"]) == 0
    fid = json.loads(out_json.read_text())["fidelity"]["heldout"]
    assert fid["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and fid["nn_agreement"] == 1.0
    assert fid["n"] == len(SENTENCES)


def test_cli_markdown_perplexity_table(tmp_path):
    model = save_tiny(tmp_path / "llama", "llama")
    text = tmp_path / "heldout.txt"
    text.write_text(sample_text(300, seed=2))
    out_md = tmp_path / "ppl.md"
    assert main(["eval", str(model), "--baseline", str(model), "--ppl", str(text), "--seq-len", "16",
                 "--max-windows", "4", "--markdown", str(out_md), "--quiet"]) == 0
    md = out_md.read_text()
    assert "## Perplexity" in md and "| text | dense | compressed | change |" in md and "+0.00%" in md


@pytest.mark.parametrize("argv, message", [
    (["--fidelity", "TEXT"], "--baseline"),
    (["--baseline", "DENSE", "--fidelity", "missing.txt"], "no such file"),
    (["--baseline", "DENSE", "--fidelity", "TEXT", "--max-sentences", "1"], "--max-sentences"),
])
def test_cli_fidelity_errors(encoder_files, capsys, argv, message):
    f = encoder_files
    argv = [str(f["text"]) if a == "TEXT" else str(f["dense"]) if a == "DENSE" else a for a in argv]
    assert main(["eval", str(f["compressed"]), *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "rankcut: error:" in err and message in err
