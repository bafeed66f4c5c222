"""Read the offline zero-shot task files into the records the Hugging Face Hub datasets hold.

The data directory is laid out like ``../shared/data`` (see its README): ``piqa/``, ``arc/ARC-Easy/``,
``arc/ARC-Challenge/``, ``winogrande/``, ``hellaswag/``, ``lambada/``. Each reader returns one dict per item
with the fields of the Hub dataset that lm-evaluation-harness' task of the same name reads; lm-eval scores
these records with its own task configurations (:mod:`rankcut.evaluate.harness`, which
:func:`rankcut.evaluate.tasks.evaluate_tasks` calls):

- piqa (``baber/piqa``): ``goal, sol1, sol2, label``.
- arc_easy / arc_challenge (``allenai/ai2_arc``): ``id, question, choices{text, label}, answerKey``.
  The local files are an instruction-style rewrite without the original choice letters; letters are
  assigned A, B, C… in order (the letters never reach the prompt).
- winogrande (``allenai/winogrande``): ``sentence, option1, option2, answer`` ("1"/"2").
- hellaswag (``Rowan/hellaswag``): ``activity_label, ctx_a, ctx_b, endings, label``. The local text form
  keeps only ``activity_label + ": " + ctx_a + " " + ctx_b``; the split is inferred: ``ctx_b`` is the
  trailing fragment after the last ". " when it starts lowercase and is unfinished (how HellaSwag's
  ``ctx_b`` looks), else empty. This is the one approximation against the Hub data.
- lambada (``EleutherAI/lambada_openai``): ``text``.
"""

from __future__ import annotations

import bz2
import json
import string
from pathlib import Path


def _need(path: Path) -> Path:
    if not path.exists():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        where = f"{path.parent} holds {present}" if path.parent.is_dir() else f"{path.parent} does not exist"
        raise ValueError(f"task file {path} is missing ({where})")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with open(_need(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_labels(path: Path, count: int) -> list[int]:
    labels = [int(line) for line in _need(path).read_text().split()]
    if len(labels) != count:
        raise ValueError(f"{path} has {len(labels)} labels for {count} items")
    return labels


def read_piqa(data_dir: Path) -> list[dict]:
    """``piqa/valid.jsonl`` + ``piqa/valid-labels.lst``."""
    rows = _read_jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = _read_labels(data_dir / "piqa" / "valid-labels.lst", len(rows))
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label} for r, label in zip(rows, labels)]


_ARC_PREFIX = "Please choose the correct answer to the question: "


def parse_arc(record: dict) -> tuple[str, list[str], int]:
    """Question, choice texts and gold index from one record of the instruction-style ARC rewrite.

    The instruction reads ``PREFIX question\\n\\nAnswer1: text Answer2: text ...\\n\\nAnswer format:
    answer1/answer2/...``; ``answer`` is ``"answerK"``.
    """
    text = record["instruction"]
    if not text.startswith(_ARC_PREFIX):
        raise ValueError(f"unexpected ARC instruction: {text[:80]!r}")
    body, _, fmt = text[len(_ARC_PREFIX):].rpartition("\n\nAnswer format: ")
    count = len(fmt.strip().split("/"))
    question, sep, options = body.rpartition("\n\nAnswer1: ")
    if not sep or count < 2:
        raise ValueError(f"cannot parse ARC choices in {text[:80]!r}")
    choices, rest = [], options
    for k in range(2, count + 1):
        head, sep, rest = rest.partition(f" Answer{k}: ")
        if not sep:
            raise ValueError(f"ARC item lacks Answer{k}: {text[:80]!r}")
        choices.append(head)
    choices.append(rest)
    gold = int(record["answer"].removeprefix("answer")) - 1
    if not 0 <= gold < len(choices):
        raise ValueError(f"ARC answer {record['answer']!r} out of range for {len(choices)} choices")
    return question, choices, gold


def read_arc(data_dir: Path, subset: str) -> list[dict]:
    """``arc/{ARC-Easy,ARC-Challenge}/test.json``."""
    with open(_need(data_dir / "arc" / subset / "test.json"), encoding="utf-8") as f:
        records = json.load(f)
    docs = []
    for k, record in enumerate(records):
        question, choices, gold = parse_arc(record)
        letters = list(string.ascii_uppercase[: len(choices)])
        docs.append({"id": f"{subset}-{k}", "question": question, "choices": {"text": choices, "label": letters},
                     "answerKey": letters[gold]})
    return docs


def split_hellaswag_context(line: str) -> tuple[str, str, str]:
    """``(activity_label, ctx_a, ctx_b)`` from ``activity_label + ": " + ctx_a + " " + ctx_b`` (inferred)."""
    label, sep, ctx = line.partition(": ")
    if not sep:
        raise ValueError(f"hellaswag context lacks the 'activity: ' prefix: {line[:80]!r}")
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail and tail[0].islower() and not tail.rstrip().endswith((".", "!", "?")):
        return label, head + ".", tail
    return label, ctx, ""


def read_hellaswag(data_dir: Path) -> list[dict]:
    """``hellaswag/hellaswag_val_full.txt.bz2``: 6 lines per item (context, gold index, 4 endings)."""
    with bz2.open(_need(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag file has {len(lines)} lines, not a multiple of 6")
    docs = []
    for i in range(0, len(lines), 6):
        label, ctx_a, ctx_b = split_hellaswag_context(lines[i])
        docs.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "endings": lines[i + 2 : i + 6], "label": lines[i + 1].strip()})
    return docs


def read_winogrande(data_dir: Path) -> list[dict]:
    """``winogrande/dev.jsonl`` + ``dev-labels.lst`` (labels 1/2)."""
    rows = _read_jsonl(data_dir / "winogrande" / "dev.jsonl")
    labels = _read_labels(data_dir / "winogrande" / "dev-labels.lst", len(rows))
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(label)}
            for r, label in zip(rows, labels)]


def read_lambada(data_dir: Path) -> list[dict]:
    """``lambada/lambada_test.jsonl`` (the OpenAI version)."""
    return [{"text": r["text"]} for r in _read_jsonl(data_dir / "lambada" / "lambada_test.jsonl")]


READERS = {
    "piqa": read_piqa,
    "arc_easy": lambda d: read_arc(d, "ARC-Easy"),
    "arc_challenge": lambda d: read_arc(d, "ARC-Challenge"),
    "hellaswag": read_hellaswag,
    "winogrande": read_winogrande,
    "lambada": read_lambada,
}
# lm-evaluation-harness task names (lambada here is its lambada_openai)
HARNESS_NAMES = {"lambada": "lambada_openai"}


def read_docs(name: str, data_dir, limit: int | None = None) -> list[dict]:
    """Hub-schema records of task ``name`` from ``data_dir`` (the first ``limit`` only, when given).

    Raises:
        ValueError: an unknown task, a data directory or file that is missing, a bad limit.
    """
    if name not in READERS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(READERS)}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a directory")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    docs = READERS[name](data_dir)
    return docs[:limit] if limit is not None else docs
