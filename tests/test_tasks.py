"""Offline zero-shot tasks: the record builders on the real files in ../shared/data, lm-evaluation-harness
scoring them (checked against a hand computation with the model), and ``rankcut eval --tasks``."""

from __future__ import annotations

import bz2
import functools
import json
import math
import statistics
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from rankcut.cli import main
from rankcut.evaluate.tasks import TASKS, evaluate_tasks
from rankcut.evaluate.taskdata import parse_arc, read_docs, split_hellaswag_context
from tiny_models import llama, save_tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------ records of the real files

COUNTS = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "lambada": 5153}
CHOICES = {"piqa": {2}, "winogrande": {2}, "hellaswag": {4}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "lambada": {1}}


def choices_and_gold(task: str, doc: dict) -> tuple[list[str], int]:
    """The answer texts of a record and the gold index (LAMBADA: its last word, index 0)."""
    if task == "piqa":
        return [doc["sol1"], doc["sol2"]], doc["label"]
    if task in ("arc_easy", "arc_challenge"):
        return doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
    if task == "hellaswag":
        return doc["endings"], int(doc["label"])
    if task == "winogrande":
        return [doc["option1"], doc["option2"]], int(doc["answer"]) - 1
    return [doc["text"].rsplit(" ", 1)[1]], 0


@pytest.fixture(scope="module")
def real_dir():
    return shared_path()


@functools.cache
def _real_docs(task: str) -> list[dict]:
    return read_docs(task, shared_path())


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_real_records_counts_and_golds(real_dir, task):
    docs = _real_docs(task)
    assert len(docs) == COUNTS[task]  # the data README's figures
    parsed = [choices_and_gold(task, doc) for doc in docs]
    assert {len(choices) for choices, _ in parsed} <= CHOICES[task]
    assert all(0 <= gold < len(choices) for choices, gold in parsed)
    assert all(c.strip() for choices, _ in parsed for c in choices)
    if task != "lambada":  # golds are spread over the choices, not stuck at 0
        assert len({gold for _, gold in parsed}) >= 2
    assert read_docs(task, real_dir, limit=7) == docs[:7]  # --limit keeps the first N


def test_real_records_spot_checks(real_dir):
    piqa = read_docs("piqa", real_dir, 1)[0]
    assert piqa["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert piqa["sol1"].startswith("Provide the guinea pig with a cage full") and piqa["label"] == 0

    arc = read_docs("arc_easy", real_dir, 1)[0]
    assert arc["question"] == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert arc["choices"]["text"] == ["Sunlight is the source of energy for nearly all ecosystems.",
                                      "Most ecosystems are found on land instead of in water.",
                                      "Carbon dioxide is more available than other gases.",
                                      "The producers in all ecosystems are plants."]
    assert arc["answerKey"] == "A"

    hs = read_docs("hellaswag", real_dir, 1)[0]
    assert hs["endings"][3] == "starts pulling up roofing on a roof." and hs["label"] == "3"

    wg = read_docs("winogrande", real_dir, 1)[0]
    assert wg == {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                  "option1": "Sarah", "option2": "Maria", "answer": "2"}

    lam = read_docs("lambada", real_dir, 1)[0]["text"]
    assert lam.endswith("I don't care about signs")


def test_parse_arc_and_hellaswag_context():
    record = {"instruction": "Please choose the correct answer to the question: Is 2 > 1?\n\nAnswer1: yes, it is. "
                             "Answer2: no Answer3: Answer4 maybe\n\nAnswer format: answer1/answer2/answer3",
              "answer": "answer3"}
    assert parse_arc(record) == ("Is 2 > 1?", ["yes, it is.", "no", "Answer4 maybe"], 2)
    assert split_hellaswag_context("Label: A man sits. the lady") == ("Label", "A man sits.", "the lady")
    assert split_hellaswag_context("Health: How to rest. Sleep well.") == ("Health", "How to rest. Sleep well.", "")
    with pytest.raises(ValueError, match="activity"):
        split_hellaswag_context("no label here")
    with pytest.raises(ValueError, match="out of range"):
        parse_arc({**record, "answer": "answer4"})


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
        read_docs("mmlu", tmp_path)
    with pytest.raises(ValueError, match="missing"):
        read_docs("piqa", tmp_path)
    (tmp_path / "arc" / "ARC-Easy").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"test\.json is missing .*holds \[\]"):
        read_docs("arc_easy", tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        read_docs("piqa", tmp_path / "nope")
    with pytest.raises(ValueError, match="limit"):
        read_docs("piqa", tmp_path, limit=0)
    # evaluate_tasks refuses before any lm-eval work
    model, tok = llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown task.*boolq.*available: piqa"):
        evaluate_tasks(model, tok, ["piqa", "boolq"], tmp_path)
    with pytest.raises(ValueError, match="give data_dir"):
        evaluate_tasks(model, tok, ["piqa"], None)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_tasks(model, None, ["piqa"], tmp_path)
    with pytest.raises(ValueError, match="model is on cpu, not on cuda"):
        evaluate_tasks(model, tok, ["piqa"], tmp_path, device="cuda")


def test_missing_files_stop_evaluate_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = llama(), tiny_tokenizer()
    data = make_data_dir(tmp_path / "data", n=2)
    (data / "winogrande" / "dev-labels.lst").unlink()
    with pytest.raises(ValueError, match=r"dev-labels\.lst is missing"):
        evaluate_tasks(model, tok, ["piqa", "winogrande"], data, progress=False)
    with pytest.raises(ValueError, match="not a directory"):
        evaluate_tasks(model, tok, ["piqa"], tmp_path / "nope", progress=False)
    with pytest.raises(ValueError, match="limit"):
        evaluate_tasks(model, tok, ["piqa"], data, limit=0, progress=False)


# ------------------------------------------------------------------ lm-eval's requests from the records


def test_lm_eval_builds_the_documented_prompts_from_the_records(real_dir):
    """lm-eval's own task configs, fed the local records: the (context, continuation) pairs it scores."""
    pytest.importorskip("lm_eval")
    from rankcut.evaluate.harness import _local_task_files, _offline_task_manager

    with tempfile.TemporaryDirectory() as tmp:
        specs = _local_task_files(list(TASKS), real_dir, 1, Path(tmp))
        loaded = _offline_task_manager().load(list(specs.values()))["tasks"]
        pairs = {}
        for task, spec in specs.items():
            built = loaded[Path(spec).stem]
            built.build_all_requests(limit=1)
            pairs[task] = [instance.args for instance in built.instances]
    piqa = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert [ctx for ctx, _ in pairs["piqa"]] == [piqa, piqa]
    assert pairs["piqa"][0][1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding")
    assert pairs["arc_easy"][0] == ("Question: Which statement best explains why photosynthesis is the foundation "
                                    "of most food webs?\nAnswer:",
                                    " Sunlight is the source of energy for nearly all ecosystems.")
    assert len(pairs["arc_easy"]) == 4
    # HellaSwag: lm-eval capitalises ctx_b, which the reader split off ("he")
    assert pairs["hellaswag"][3] == ("Roof shingle removal: A man is sitting on a roof. He",
                                     " starts pulling up roofing on a roof.")
    # WinoGrande partial evaluation: one context per option, the rest of the sentence the shared target
    sentence = "Sarah was a much better surgeon than Maria so "
    assert pairs["winogrande"] == [(sentence + "Sarah", " always got the easier cases."),
                                   (sentence + "Maria", " always got the easier cases.")]
    (context, target), = pairs["lambada"]
    assert target == " signs" and context.endswith("I don't care about")


# -------------------------------------------------------- lm-eval's figures against a hand computation


@pytest.fixture(scope="module")
def codellama(real_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_dir / "testbed" / "codellama-16m"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def hand_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log-probability of ``continuation`` after ``context`` and whether it is the greedy one, with the
    model called directly: the continuation's tokens are those of context+continuation after the context's."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    rows = logp[len(ctx) - 1 : -1]
    targets = torch.tensor(whole[len(ctx) :])
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


def hand_scores(model, tok, task: str, docs: list[dict]) -> dict:
    """acc (+ acc_norm: sums over the choice's characters) / LAMBADA's greedy acc and perplexity, by hand,
    with lm-eval's prompt formats (``lm_eval/tasks/{piqa,winogrande,lambada}``)."""
    acc, acc_norm, lls = [], [], []
    for doc in docs:
        choices, gold = choices_and_gold(task, doc)
        if task == "piqa":
            sums = [hand_loglikelihood(model, tok, f"Question: {doc['goal']}\nAnswer:", " " + c)[0] for c in choices]
        elif task == "winogrande":
            cut = doc["sentence"].index("_")
            rest = " " + doc["sentence"][cut + 1 :].strip()
            sums = [hand_loglikelihood(model, tok, doc["sentence"][:cut] + c, rest)[0] for c in choices]
        else:  # lambada
            ll, greedy = hand_loglikelihood(model, tok, doc["text"].rsplit(" ", 1)[0], " " + choices[0])
            lls.append(ll)
            acc.append(float(greedy))
            continue
        acc.append(float(max(range(len(sums)), key=sums.__getitem__) == gold))
        normed = [s / len(c) for s, c in zip(sums, choices)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    out = {"acc": statistics.mean(acc), "acc_stderr": statistics.stdev(acc) / math.sqrt(len(acc))}
    if task == "piqa":
        out.update(acc_norm=statistics.mean(acc_norm), acc_norm_stderr=statistics.stdev(acc_norm) / math.sqrt(len(acc)))
    if task == "lambada":
        out["perplexity"] = math.exp(-statistics.mean(lls))
    return out


def test_scores_equal_a_hand_computation_on_the_real_files(real_dir, codellama):
    """evaluate_tasks (lm-eval) on the real files gives what the model's own log-probabilities give."""
    pytest.importorskip("lm_eval")
    model, tok = codellama
    tasks, limit = ["piqa", "winogrande", "lambada"], 8
    got = evaluate_tasks(model, tok, tasks, real_dir, limit=limit, batch_size=4, progress=False)
    for task in tasks:
        expected = hand_scores(model, tok, task, read_docs(task, real_dir, limit))
        assert list(got[task]) == [*expected, "n"] and got[task]["n"] == limit, task
        for metric, value in expected.items():
            assert got[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-12), (task, metric)
    assert 0 < got["piqa"]["acc"] < 1 and 0 < got["winogrande"]["acc"] < 1  # the comparisons discriminate
    assert 1 < got["lambada"]["perplexity"] < 1e7


# ----------------------------------------------------------------- the report: keys, order, quiet runs


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


# the keys rankcut eval reports, in its table's order
KEYS = {"winogrande": ["acc", "acc_stderr", "n"], "lambada": ["acc", "acc_stderr", "perplexity", "n"]}
MC_KEYS = ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"]


def test_report_keys_order_and_quiet_run(tmp_path, capfd):
    pytest.importorskip("lm_eval")
    data = make_data_dir(tmp_path / "data", n=3)
    model, tok = llama(), tiny_tokenizer()
    model.train()
    order = ["lambada", "winogrande", "piqa", "hellaswag", "arc_challenge", "arc_easy", "piqa"]
    capfd.readouterr()
    result = evaluate_tasks(model, tok, order, data, progress=False)
    out, err = capfd.readouterr()
    assert list(result) == order[:-1]  # the order asked for, a repeat once
    for task, row in result.items():
        assert list(row) == KEYS.get(task, MC_KEYS), task
        assert row["n"] == 3 and all(isinstance(v, float) for k, v in row.items() if k != "n")
        assert 0 <= row["acc"] <= 1
    assert result["lambada"]["perplexity"] > 1
    assert model.training  # HFLM's eval() undone
    assert out == ""
    # lm-eval's bars are off; LAMBADA's perplexity stderr still draws a one-step bootstrap bar
    assert "Running loglikelihood" not in err and "Tokenizing" not in err and "examples/s" not in err
    one = evaluate_tasks(model, tok, ["piqa"], data, limit=1, progress=False)["piqa"]
    assert one["n"] == 1 and math.isnan(one["acc_stderr"]) and math.isnan(one["acc_norm_stderr"])


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks_cli")
    return {"model": save_tiny(root / "llama", "llama"), "data": make_data_dir(root / "data", n=5), "root": root}


def test_cli_eval_tasks_writes_json(cli_files, capsys):
    pytest.importorskip("lm_eval")
    out = cli_files["root"] / "eval.json"
    code = main(["eval", str(cli_files["model"]), "--tasks", ",".join(TASKS), "--data-dir", str(cli_files["data"]),
                 "--limit", "3", "--baseline", str(cli_files["model"]), "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    assert list(data["tasks"]) == list(TASKS) and data["perplexity"] == {}
    assert all(r["n"] == 3 for r in data["tasks"].values())
    assert {task: list(row) for task, row in data["tasks"].items()} == {t: KEYS.get(t, MC_KEYS) for t in TASKS}
    assert data["baseline"]["tasks"] == data["tasks"]  # same model twice
    assert "compressed" in printed and "hellaswag" in printed and "+0.00pt" in printed
    assert "lambada          perplexity" in printed


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


def test_cli_harness_flag_gives_the_same_figures(cli_files, capsys):
    """``--harness`` (lm-eval's raw report) and the default (evaluate_tasks) agree on what both report."""
    pytest.importorskip("lm_eval")
    common = ["eval", str(cli_files["model"]), "--tasks", ",".join(TASKS), "--data-dir", str(cli_files["data"]),
              "--limit", "3", "--dtype", "float32", "--quiet"]
    ours, theirs = cli_files["root"] / "ours.json", cli_files["root"] / "theirs.json"
    assert main([*common, "--json", str(ours)]) == 0
    assert main([*common, "--harness", "--json", str(theirs)]) == 0
    a, b = json.loads(ours.read_text())["tasks"], json.loads(theirs.read_text())["tasks"]
    for task in TASKS:
        for metric, value in a[task].items():
            assert b[task][metric] == pytest.approx(value, rel=1e-9), (task, metric)


def test_cli_missing_task_file(cli_files, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    code = main(["eval", str(cli_files["model"]), "--tasks", "piqa", "--data-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "valid.jsonl is missing" in err, err


# ------------------------------------------------- lm-eval on Hub task names (its whole index: slow)


@pytest.mark.slow
def test_cli_unknown_harness_task(cli_files, capsys):
    pytest.importorskip("lm_eval")
    code = main(["eval", str(cli_files["model"]), "--tasks", "no_such_task", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "knows no task no_such_task" in err, err


@pytest.mark.slow
def test_unreachable_hub_is_a_clear_error(monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from rankcut.evaluate.harness import evaluate_harness

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(ValueError, match="could not fetch task data .* --data-dir"):
        evaluate_harness(llama(), tiny_tokenizer(), ["piqa"], limit=2)


@pytest.mark.slow
def test_harness_errors(tmp_path):
    pytest.importorskip("lm_eval")
    from rankcut.evaluate.harness import evaluate_harness

    model, tok = llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match="knows no task no_such_task"):
        evaluate_harness(model, tok, ["no_such_task"])
    with pytest.raises(ValueError, match="unknown offline task.* mmlu"):
        evaluate_harness(model, tok, ["mmlu"], tmp_path)
    with pytest.raises(ValueError, match="piqa.*missing"):
        evaluate_harness(model, tok, ["piqa"], tmp_path)
    with pytest.raises(ValueError, match="limit"):
        evaluate_harness(model, tok, ["piqa"], tmp_path, limit=0)
