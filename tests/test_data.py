"""Text sources and token windows: sampling, reading, tokenizing, naming."""

from __future__ import annotations

import pytest
import torch

from rankcut.data import calibration_windows, read_text, sample_windows, source_name, token_stream, tokenize


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per character (its code point)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True, verbose=True):
        self.calls.append({"add_special_tokens": add_special_tokens, "verbose": verbose})
        ids = [ord(c) for c in text]
        if add_special_tokens:
            ids = [0, *ids]
        return {"input_ids": ids}


def _codes(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in text], dtype=torch.long)


def _word_tokenizer():
    """A real fast tokenizer built in memory with the ``tokenizers`` library (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "def": 2, "return": 3, "x": 4, "y": 5, "(": 6, ")": 7, ":": 8, "+": 9}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="[BOS]")


# ---------------------------------------------------------------------------------------- sample_windows


def test_sample_windows_shape_and_alignment():
    ids = torch.arange(103)
    w = sample_windows(ids, seq_len=10, n=4, seed=0)
    assert w.shape == (4, 10) and w.dtype == ids.dtype
    for row in w:
        start = int(row[0])
        assert start % 10 == 0  # aligned to window boundaries
        assert torch.equal(row, torch.arange(start, start + 10))  # contiguous tokens of the stream
        assert start + 10 <= 100  # the 3-token remainder is never used
    starts = w[:, 0].tolist()
    assert starts == sorted(starts) and len(set(starts)) == 4  # distinct, hence non-overlapping; in stream order


def test_sample_windows_all_windows():
    ids = torch.arange(50)
    w = sample_windows(ids, seq_len=10, n=5, seed=3)
    assert torch.equal(w, ids.view(5, 10))


def test_sample_windows_deterministic_per_seed():
    ids = torch.arange(10_000)
    a = sample_windows(ids, 16, 8, seed=11)
    b = sample_windows(ids, 16, 8, seed=11)
    c = sample_windows(ids, 16, 8, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_windows_is_a_copy():
    ids = torch.arange(40)
    w = sample_windows(ids, 10, 2, sampling="first")
    w[0, 0] = -1
    assert ids[0] == 0


def test_sample_windows_first():
    ids = torch.arange(95)
    w = sample_windows(ids, seq_len=10, n=3, sampling="first", seed=99)
    assert torch.equal(w, torch.arange(30).view(3, 10))


def test_sample_windows_too_short_message():
    ids = torch.arange(35)
    with pytest.raises(ValueError) as info:
        sample_windows(ids, seq_len=10, n=5)
    message = str(info.value)
    assert "35 tokens make 3 window(s) of 10 tokens" in message
    assert "but 5 were requested" in message
    assert message.startswith("calibration text too short")
    with pytest.raises(ValueError, match=r"^evaluation text too short: 9 tokens make 0 window"):
        sample_windows(torch.arange(9), seq_len=10, n=1, what="evaluation")


def test_sample_windows_unknown_sampling():
    with pytest.raises(ValueError, match=r"unknown sampling 'middle'"):
        sample_windows(torch.arange(100), 10, 2, sampling="middle")


# --------------------------------------------------------------------------------------------- read_text


def test_read_text_file_as_is(tmp_path):
    text = "line one\n\nline two\n\n\n\tindented  \n"
    path = tmp_path / "sample.txt"
    path.write_bytes(text.encode("utf-8"))
    assert read_text(path) == text  # no re-joining, no stripping
    assert read_text(str(path)) == text


def test_read_text_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError) as info:
        read_text(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "not an existing file nor a known dataset" in message
    assert "wikitext2" in message  # lists the dataset names it would accept


@pytest.mark.parametrize("content", ["", "   \n\n\t  \n"])
def test_read_text_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"is empty"):
        read_text(path)


def test_read_text_directory_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"not an existing file"):
        read_text(tmp_path)


# ------------------------------------------------------------------------------------------ token_stream


def test_token_stream_from_list_joins_with_blank_line():
    tok = CharTokenizer()
    ids = token_stream(["ab", "c", "de"], tok)
    assert torch.equal(ids, _codes("ab\n\nc\n\nde"))
    assert ids.dtype == torch.long and ids.ndim == 1
    assert tok.calls[-1]["add_special_tokens"] is False  # no BOS in the middle of a stream


def test_token_stream_from_path(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text("x = 1\n\n\ny = 2\n")
    ids = token_stream(path, CharTokenizer())
    assert torch.equal(ids, _codes("x = 1\n\n\ny = 2\n"))  # the file's newlines untouched


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_token_stream_from_tensor(dtype):
    t = torch.arange(12, dtype=dtype).view(3, 4)
    ids = token_stream(t, tokenizer=None)
    assert ids.dtype == torch.long
    assert torch.equal(ids, torch.arange(12))


def test_token_stream_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must hold integers"):
        token_stream(torch.zeros(4), None)
    with pytest.raises(ValueError, match=r"tokenizer is needed"):
        token_stream(["text"], None)
    with pytest.raises(ValueError, match=r"non-empty list of strings"):
        token_stream([], CharTokenizer())
    with pytest.raises(ValueError, match=r"non-empty list of strings"):
        token_stream(["a", 3], CharTokenizer())
    with pytest.raises(ValueError, match=r"unsupported text source of type int"):
        token_stream(42, CharTokenizer())
    with pytest.raises(ValueError, match=r"not an existing file"):
        token_stream(tmp_path / "absent.txt", CharTokenizer())


def test_token_stream_with_real_fast_tokenizer(tmp_path):
    tok = _word_tokenizer()
    ids = token_stream(["def x ( y ) :", "return x + y"], tok)
    # WordLevel: one id per whitespace-separated word, no [BOS] added
    assert ids.tolist() == [2, 4, 6, 5, 7, 8, 3, 4, 9, 5]
    path = tmp_path / "t.txt"
    path.write_text("return y\nqwerty")
    assert token_stream(path, tok).tolist() == [3, 5, 0]
    assert torch.equal(tokenize(tok, "x y"), torch.tensor([4, 5]))


# ------------------------------------------------------------------------------------ calibration_windows


def test_calibration_windows_from_2d_tensor():
    calib = torch.arange(60, dtype=torch.int32).view(6, 10)
    w = calibration_windows(calib, None, n=3, seq_len=10, seed=1)
    assert w.shape == (3, 10) and w.dtype == torch.long
    rows = (w[:, 0] // 10).tolist()
    assert rows == sorted(rows) and len(set(rows)) == 3
    for row, r in zip(w, rows):
        assert torch.equal(row, torch.arange(r * 10, r * 10 + 10))
    assert torch.equal(w, calibration_windows(calib, None, n=3, seq_len=10, seed=1))
    first = calibration_windows(calib, None, n=2, seq_len=10, sampling="first")
    assert torch.equal(first, torch.arange(20).view(2, 10))
    # a window length other than seq_len is taken as given
    assert calibration_windows(calib.view(3, 20), None, n=3, seq_len=7).shape == (3, 20)


def test_calibration_windows_2d_tensor_too_few_rows():
    with pytest.raises(ValueError, match=r"calibration tensor has 2 windows, 5 requested"):
        calibration_windows(torch.zeros(2, 8, dtype=torch.long), None, n=5, seq_len=8)


def test_calibration_windows_from_text():
    text = "abcdefghij" * 10  # 100 characters -> 100 tokens
    w = calibration_windows([text], CharTokenizer(), n=4, seq_len=25, seed=0)
    assert torch.equal(w, _codes(text).view(4, 25))
    w1 = calibration_windows([text], CharTokenizer(), n=2, seq_len=20, sampling="first")
    assert torch.equal(w1, _codes(text[:40]).view(2, 20))
    with pytest.raises(ValueError, match=r"100 tokens make 3 window\(s\) of 30 tokens, but 4 were requested"):
        calibration_windows([text], CharTokenizer(), n=4, seq_len=30)


def test_calibration_windows_from_1d_tensor():
    w = calibration_windows(torch.arange(40), None, n=2, seq_len=10, seed=5)
    assert w.shape == (2, 10)
    assert all(int(row[0]) % 10 == 0 for row in w)


# ------------------------------------------------------------------------------------------- source_name


def test_source_name(tmp_path):
    path = tmp_path / "python_calib.txt"
    path.write_text("x")
    assert source_name(path) == "python_calib"
    assert source_name(str(path)) == "python_calib"
    assert source_name("wikitext2") == "wikitext2"
    assert source_name(str(tmp_path / "missing.txt")) == str(tmp_path / "missing.txt")
    assert source_name(["a", "b"]) == "text"
    assert source_name(torch.arange(3)) == "text"


def test_hub_dataset_failure_is_a_clear_value_error(monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    seen = {}

    def unreachable(**kwargs):
        seen.update(kwargs)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=r"could not load dataset 'wikitext2' \(Salesforce/wikitext, split train\)"):
        read_text("wikitext2", split="train")
    assert seen == {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "train"}
    with pytest.raises(ValueError, match="c4"):
        read_text("c4", split="test")
    assert seen["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
