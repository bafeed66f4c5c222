"""Offline zero-shot tasks: loaders on the real files in ../shared/data, lm-eval-style scoring identities,
and ``rankcut eval --tasks``."""

from __future__ import annotations

import bz2
import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import shared_path
from rankcut.cli import main
from rankcut.evaluate.tasks import (
    TASKS,
    Item,
    encode_pair,
    evaluate_tasks,
    hellaswag_preprocess,
    load_task,
    loglikelihoods,
    score_items,
)
from rankcut.evaluate.taskdata import parse_arc, read_docs, split_hellaswag_context
from tiny_models import llama, save_tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------ loaders on the real files

COUNTS = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "lambada": 5153}
CHOICES = {"piqa": {2}, "winogrande": {2}, "hellaswag": {4}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "lambada": {1}}


@pytest.fixture(scope="module")
def real_dir():
    return shared_path()


@functools.cache
def _real_items(task: str) -> list[Item]:
    return load_task(task, shared_path())


@pytest.fixture
def real(real_dir):
    """Items of a real task, loaded once per session (HellaSwag alone is 10,042 items)."""
    return _real_items


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_real_loader_counts_and_golds(real_dir, real, task):
    items = real(task)
    assert len(items) == COUNTS[task]  # the README's figures
    assert {item.n_choices for item in items} <= CHOICES[task]
    assert all(0 <= item.gold < item.n_choices for item in items)
    for item in items:
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)
    if task != "lambada":  # golds are spread over the choices, not stuck at 0
        assert len({item.gold for item in items}) >= 2
    if task != "hellaswag":  # --limit keeps the first N items
        assert load_task(task, real_dir, limit=7) == items[:7]


def test_real_spot_checks(real):
    piqa = real("piqa")[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.continuations[0].startswith(" Provide the guinea pig with a cage full") and piqa.gold == 0

    arc = real("arc_easy")[0]
    assert arc.context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                           "food webs?\nAnswer:")
    assert arc.continuations == (" Sunlight is the source of energy for nearly all ecosystems.",
                                 " Most ecosystems are found on land instead of in water.",
                                 " Carbon dioxide is more available than other gases.",
                                 " The producers in all ecosystems are plants.")
    assert arc.gold == 0
    assert real("arc_challenge")[0].gold == 2

    hs = real("hellaswag")[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval's ctx_b.capitalize()
    assert hs.continuations[3] == " starts pulling up roofing on a roof." and hs.gold == 3

    wg = real("winogrande")[0]
    assert wg.context == ("Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) and wg.gold == 1
    assert wg.pairs()[1] == (wg.context[1], wg.continuations[0])

    lam = real("lambada")[0]
    assert lam.continuations == (" signs",) and lam.context.endswith("I don't care about")


def test_parse_arc_and_hellaswag_context():
    record = {"instruction": "Please choose the correct answer to the question: Is 2 > 1?\n\nAnswer1: yes, it is. "
                             "Answer2: no Answer3: Answer4 maybe\n\nAnswer format: answer1/answer2/answer3",
              "answer": "answer3"}
    assert parse_arc(record) == ("Is 2 > 1?", ["yes, it is.", "no", "Answer4 maybe"], 2)
    assert split_hellaswag_context("Label: A man sits. the lady") == ("Label", "A man sits.", "the lady")
    assert split_hellaswag_context("Health: How to rest. Sleep well.") == ("Health", "How to rest. Sleep well.", "")
    assert hellaswag_preprocess("X: a [title] b  c [step] d") == "X: a. b c d"
    with pytest.raises(ValueError, match="activity"):
        split_hellaswag_context("no label here")


def test_real_docs_have_the_hub_schema(real_dir):
    """The records carry the fields lm-eval's task configs read, with the Hub's types."""
    arc = read_docs("arc_challenge", real_dir, 3)
    assert set(arc[0]) == {"id", "question", "choices", "answerKey"}
    assert arc[0]["choices"]["label"][:3] == ["A", "B", "C"] and arc[0]["answerKey"] == "C"
    hs = read_docs("hellaswag", real_dir, 1)[0]
    assert (hs["activity_label"], hs["ctx_a"], hs["ctx_b"], hs["label"]) == (
        "Roof shingle removal", "A man is sitting on a roof.", "he", "3")
    assert read_docs("winogrande", real_dir, 1)[0]["answer"] == "2"
    assert read_docs("piqa", real_dir, 1)[0]["label"] == 0


def test_unknown_task_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="available: piqa"):
        load_task("mmlu", tmp_path)
    with pytest.raises(ValueError, match="missing"):
        load_task("piqa", tmp_path)
    (tmp_path / "arc" / "ARC-Easy").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"test\.json is missing .*holds \[\]"):
        load_task("arc_easy", tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_task("piqa", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_tasks(nn.Linear(1, 1), object(), ["piqa", "boolq"], tmp_path)


# --------------------------------------------------------------------------- synthetic data directory


def make_data_dir(root, n: int = 4):
    """Every task's files in the real formats; the gold choice is always the one made of 'x'."""
    (root / "piqa").mkdir(parents=True)
    rows = [{"goal": f"goal {i}", "sol1": "xxxx" if i % 2 == 0 else "qqqq", "sol2": "qqqq" if i % 2 == 0 else "xxxx"} for i in range(n)]
    (root / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    for sub in ("ARC-Easy", "ARC-Challenge"):
        (root / "arc" / sub).mkdir(parents=True)
        recs = [{"instruction": "Please choose the correct answer to the question: q?\n\nAnswer1: qq Answer2: xx "
                                "Answer3: qq\n\nAnswer format: answer1/answer2/answer3", "input": "",
                 "output": "the correct answer is answer2", "answer": "answer2"} for _ in range(n)]
        (root / "arc" / sub / "test.json").write_text(json.dumps(recs))
    (root / "winogrande").mkdir()
    rows = [{"qID": str(i), "sentence": "I saw _ there.", "option1": "xx", "option2": "qq", "answer": "1"} for i in range(n)]
    (root / "winogrande" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "winogrande" / "dev-labels.lst").write_text("1\n" * n)
    (root / "hellaswag").mkdir()
    text = "".join("Act: it went. the man\n2\nqq\nq\nxxx\nqqq\n" for _ in range(n))
    (root / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(text.encode()))
    (root / "lambada").mkdir()
    (root / "lambada" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": f"a b {i} x"}) + "\n" for i in range(n)))
    return root


# ------------------------------------------------------------------------------ scoring: fake models


class CharTokenizer:
    """One token per ASCII character, no special tokens: token counts are character counts."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class TableLM(nn.Module):
    """A causal "LM" whose next-token logits depend only on the current token: ``table[token]``."""

    def __init__(self, table: torch.Tensor, max_len: int = 64):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=max_len)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def biased(token: str, bias: float = 8.0) -> TableLM:
    """Every position prefers ``token``; all other tokens are equally likely."""
    table = torch.zeros(128, 128)
    table[:, ord(token)] = bias
    return TableLM(table)


def test_model_that_prefers_the_gold_choice_gets_acc_1(tmp_path):
    data = make_data_dir(tmp_path / "data", n=6)
    model = biased("x")
    result = evaluate_tasks(model, CharTokenizer(), ["piqa", "arc_easy", "arc_challenge", "winogrande"], data, progress=False)
    for task in ("piqa", "arc_easy", "arc_challenge"):
        assert result[task] == {"acc": 1.0, "acc_stderr": 0.0, "acc_norm": 1.0, "acc_norm_stderr": 0.0, "n": 6}
    assert result["winogrande"] == {"acc": 1.0, "acc_stderr": 0.0, "n": 6}
    limited = evaluate_tasks(model, CharTokenizer(), ["piqa"], data, limit=2, progress=False)
    assert limited["piqa"]["n"] == 2
    # preferring 'q' instead turns every answer wrong
    assert evaluate_tasks(biased("q"), CharTokenizer(), ["piqa"], data, progress=False)["piqa"]["acc"] == 0.0


def test_acc_norm_divides_by_choice_characters():
    """'x' is cheap (log p ≈ -0.04) and every other char costs ≈ -8: the long choice has the lower sum but
    the higher per-character score."""
    model, tok = biased("x"), CharTokenizer()
    short, long = " q", " " + "x" * 20 + "q"
    items = [Item("ctx", (short, long), 1), Item("ctx", (short, long), 0)]
    lls = loglikelihoods(model, tok, [p for it in items for p in it.pairs()], progress=False)
    assert lls[0][0] > lls[1][0]
    result = score_items(items, lls)
    # standard error of a mean of [1, 0]: sample std sqrt(0.5) / sqrt(2) = 0.5
    assert result == {"acc": 0.5, "acc_stderr": 0.5, "acc_norm": 0.5, "acc_norm_stderr": 0.5, "n": 2}
    one = score_items(items[:1], lls[:2])
    assert (one["acc"], one["acc_norm"], one["n"]) == (0.0, 1.0, 1) and math.isnan(one["acc_stderr"])


def test_lambada_greedy_accuracy_and_perplexity(tmp_path):
    """After any non-space the table LM prefers ' ', after ' ' it prefers 'x': ' x' is greedy, ' xy' is not."""
    table = torch.zeros(128, 128)
    table[:, ord(" ")] = 5.0
    table[ord(" ")] = 0.0
    table[ord(" "), ord("x")] = 5.0
    model, tok = TableLM(table), CharTokenizer()
    items = [Item("a b c", (" x",), 0), Item("a b c", (" xy",), 0)]
    lls = loglikelihoods(model, tok, [p for it in items for p in it.pairs()], progress=False)
    assert [g for _, g in lls] == [True, False]
    logp = torch.log_softmax(table, dim=-1)
    first = (logp[ord("c"), ord(" ")] + logp[ord(" "), ord("x")]).item()
    assert lls[0][0] == pytest.approx(first, abs=1e-5)
    assert lls[1][0] == pytest.approx(first + logp[ord("x"), ord("y")].item(), abs=1e-5)
    result = score_items(items, lls, ("acc", "perplexity"))
    assert result["acc"] == 0.5 and result["n"] == 2
    assert result["perplexity"] == pytest.approx(math.exp(-(lls[0][0] + lls[1][0]) / 2))
    data = make_data_dir(tmp_path / "data", n=3)  # "a b {i} x": context ends in a digit, target " x": greedy
    assert evaluate_tasks(model, tok, ["lambada"], data, progress=False)["lambada"]["acc"] == 1.0


def test_long_context_is_left_truncated_to_the_model_length():
    model, tok = biased("x"), CharTokenizer()  # max length 64
    long = [("q" * 500, " xx"), ("q" * 500, " " + "x" * 100)]
    lls = loglikelihoods(model, tok, long, progress=False)
    logp = torch.log_softmax(model.table[0], dim=-1)
    assert lls[0][0] == pytest.approx((logp[ord(" ")] + 2 * logp[ord("x")]).item(), abs=1e-5)
    assert math.isfinite(lls[1][0])  # a continuation longer than the window keeps its last 64 tokens


# ------------------------------------------------------------------------- scoring: a real tiny model


@pytest.fixture(scope="module")
def tiny():
    return llama(), tiny_tokenizer()


PAIRS = [
    ("def add(a, b):", " return a + b"),
    ("class Point:", " pass"),
    ("the quick brown fox ", "jumps"),  # trailing space moves to the continuation
    ("x", " = 1\nprint(x)\n"),
    ("", "import os"),  # empty context: the EOS token stands in
]


def test_loglikelihood_equals_independent_log_softmax_sum(tiny):
    model, tok = tiny
    got = loglikelihoods(model, tok, PAIRS, batch_size=2, progress=False)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        ctx_ids = tok.encode(ctx.rstrip(), add_special_tokens=False) or [tok.eos_token_id]
        whole = tok.encode(ctx + cont, add_special_tokens=False)
        if not ctx.strip():
            whole = [tok.eos_token_id] + whole
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(ctx_ids)
        targets = ids[0, start:]
        expected = logp[start - 1 : -1].gather(1, targets[:, None]).sum().item()
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logp[start - 1 : -1].argmax(-1) == targets).all())
    # batching and padding do not change the figures
    one = loglikelihoods(model, tok, PAIRS, batch_size=1, progress=False)
    assert [a for a, _ in one] == pytest.approx([a for a, _ in got], abs=1e-4)


def test_encode_pair_splits_at_the_context_length(tiny):
    _, tok = tiny
    assert encode_pair(tok, "abc  ", "def") == encode_pair(tok, "abc", "  def")
    ctx, cont = encode_pair(tok, "def add(a, b):", " return a + b")
    assert ctx + cont == tok.encode("def add(a, b): return a + b", add_special_tokens=False)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks_cli")
    return {"model": save_tiny(root / "llama", "llama"), "data": make_data_dir(root / "data", n=5), "root": root}


def test_cli_eval_tasks_writes_json(cli_files, capsys):
    out = cli_files["root"] / "eval.json"
    code = main(["eval", str(cli_files["model"]), "--tasks", ",".join(TASKS), "--data-dir", str(cli_files["data"]),
                 "--limit", "3", "--baseline", str(cli_files["model"]), "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == set(TASKS) and data["perplexity"] == {}
    assert all(r["n"] == 3 for r in data["tasks"].values())
    assert set(data["tasks"]["lambada"]) == {"acc", "acc_stderr", "perplexity", "n"}
    assert data["baseline"]["tasks"] == data["tasks"]  # same model twice
    assert "compressed" in printed and "hellaswag" in printed and "+0.00pt" in printed


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--tasks", "piqa,boolq", "--data-dir", "."], "unknown offline task(s) boolq"),
        (["--tasks", " , ", "--data-dir", "."], "no task named"),
        (["--harness"], "--tasks"),
        (["--tasks", "piqa", "--data-dir", "/nonexistent/dir"], "not a directory"),
        (["--tasks", "piqa", "--data-dir", ".", "--limit", "0"], "--limit"),
        (["--data-dir", "."], "--tasks"),
    ],
)
def test_cli_task_errors(cli_files, capsys, extra, match):
    code = main(["eval", str(cli_files["model"]), *extra, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "rankcut: error:" in err and match in err, err


def test_cli_harness_scores_like_the_builtin_scorer(cli_files, capsys):
    """``--harness`` runs lm-eval on the same files; on the synthetic tasks it must agree with rankcut."""
    pytest.importorskip("lm_eval")
    common = ["eval", str(cli_files["model"]), "--tasks", ",".join(TASKS), "--data-dir", str(cli_files["data"]),
              "--limit", "3", "--dtype", "float32", "--quiet"]
    ours, theirs = cli_files["root"] / "ours.json", cli_files["root"] / "theirs.json"
    assert main([*common, "--json", str(ours)]) == 0
    assert main([*common, "--harness", "--json", str(theirs)]) == 0
    a, b = json.loads(ours.read_text())["tasks"], json.loads(theirs.read_text())["tasks"]
    for task in TASKS:
        for metric, value in a[task].items():
            assert b[task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
        assert {m for m in b[task] if not m.endswith("_stderr")} == {m for m in a[task] if not m.endswith("_stderr")}


def test_cli_unknown_harness_task(cli_files, capsys):
    pytest.importorskip("lm_eval")
    code = main(["eval", str(cli_files["model"]), "--tasks", "no_such_task", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "knows no task no_such_task" in err, err


def test_unreachable_hub_is_a_clear_error(codellama, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from rankcut.evaluate.harness import evaluate_harness

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(ValueError, match="could not fetch task data .* --data-dir"):
        evaluate_harness(*codellama, ["piqa"], limit=2)


def test_cli_missing_task_file(cli_files, tmp_path, capsys):
    code = main(["eval", str(cli_files["model"]), "--tasks", "piqa", "--data-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "valid.jsonl is missing" in err, err


# ------------------------------------------------------------------- agreement with lm-evaluation-harness


@pytest.fixture(scope="module")
def codellama(real_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_dir / "testbed" / "codellama-16m"
    # float32: the checkpoint is bf16, and lm-eval takes log-softmax in the logits' dtype where rankcut
    # upcasts first; in float32 the two agree to the last bit
    return AutoModelForCausalLM.from_pretrained(path).eval().float(), AutoTokenizer.from_pretrained(path)


def test_offline_scores_equal_lm_eval_on_the_real_files(real_dir, codellama):
    """lm-eval's own task configs, fed the same local records, score a real model as rankcut does."""
    pytest.importorskip("lm_eval")
    from rankcut.evaluate.harness import evaluate_harness

    model, tok = codellama
    tasks = list(TASKS)
    ours = evaluate_tasks(model, tok, tasks, real_dir, limit=12, batch_size=8, progress=False)
    theirs = evaluate_harness(model, tok, tasks, real_dir, limit=12, batch_size=8)
    assert set(theirs) == set(tasks)
    for task in tasks:
        assert theirs[task]["n"] == ours[task]["n"] == 12
        for metric, value in ours[task].items():
            if metric == "n":
                continue
            assert theirs[task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    assert 1 < ours["lambada"]["perplexity"] < 1e6  # a continuous check on the summed log-likelihoods


def test_harness_errors(tmp_path, codellama):
    pytest.importorskip("lm_eval")
    from rankcut.evaluate.harness import evaluate_harness

    model, tok = codellama
    with pytest.raises(ValueError, match="knows no task no_such_task"):
        evaluate_harness(model, tok, ["no_such_task"])
    with pytest.raises(ValueError, match="unknown offline task.* mmlu"):
        evaluate_harness(model, tok, ["mmlu"], tmp_path)
    with pytest.raises(ValueError, match="piqa.*missing"):
        evaluate_harness(model, tok, ["piqa"], tmp_path)
    with pytest.raises(ValueError, match="limit"):
        evaluate_harness(model, tok, ["piqa"], tmp_path, limit=0)
