"""Zero-shot multiple-choice tasks, offline, scored the way lm-evaluation-harness scores them.

Each task is read from a local data directory laid out like ``../shared/data`` (see its README):
``piqa/``, ``arc/ARC-Easy/``, ``arc/ARC-Challenge/``, ``winogrande/``, ``hellaswag/``, ``lambada/``.
A small loader per task turns the files into :class:`Item` s with lm-evaluation-harness' prompt format:

- piqa: ``"Question: {goal}\\nAnswer:"``, choices ``sol1``/``sol2`` (``piqa.yaml``).
- arc_easy / arc_challenge: ``"Question: {question}\\nAnswer:"``, choices the answer texts (``arc_easy.yaml``).
- hellaswag: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, choices the
  preprocessed endings (``hellaswag/utils.py``).
- winogrande: partial evaluation (Trinh & Le, 2018): one context per option, the sentence up to ``_``
  with the option filled in; the shared target is the rest of the sentence (``preprocess_winogrande.py``).
- lambada (``lambada_openai``): context = all but the last space-separated word, target = ``" " + last``;
  ``acc`` = the whole target is the greedy prediction, ``perplexity`` = exp(−mean target log-likelihood).

Scoring follows lm-eval's ``HFLM``: the continuation is ``" " + choice``; context and context+continuation
are tokenized without special tokens and split at the context's token length (trailing spaces of the
context move to the continuation; an empty context becomes the EOS token); the input is left-truncated
to the model's maximum length. ``acc`` = argmax of the summed log-probabilities, ``acc_norm`` = argmax of
the sums divided by the choice's length in characters.
"""

from __future__ import annotations

import bz2
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DELIMITER = " "  # lm-eval's default target_delimiter


@dataclass(frozen=True)
class Item:
    """One question: a context (or one context per choice, for WinoGrande), continuations and the gold index.

    ``continuations`` already carry the leading delimiter. With a tuple of contexts there is a single
    shared continuation, scored after each context.
    """

    context: str | tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def pairs(self) -> list[tuple[str, str]]:
        if isinstance(self.context, tuple):
            return [(ctx, self.continuations[0]) for ctx in self.context]
        return [(self.context, cont) for cont in self.continuations]

    @property
    def n_choices(self) -> int:
        return len(self.context) if isinstance(self.context, tuple) else len(self.continuations)


# ------------------------------------------------------------------------------------------- loaders


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


def load_piqa(data_dir: Path) -> list[Item]:
    """``piqa/valid.jsonl`` + ``piqa/valid-labels.lst``."""
    rows = _read_jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = _read_labels(data_dir / "piqa" / "valid-labels.lst", len(rows))
    return [
        Item(f"Question: {r['goal']}\nAnswer:", (DELIMITER + r["sol1"], DELIMITER + r["sol2"]), label)
        for r, label in zip(rows, labels)
    ]


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
    return question, choices, gold


def load_arc(data_dir: Path, subset: str) -> list[Item]:
    """``arc/{ARC-Easy,ARC-Challenge}/test.json``."""
    with open(_need(data_dir / "arc" / subset / "test.json"), encoding="utf-8") as f:
        records = json.load(f)
    items = []
    for record in records:
        question, choices, gold = parse_arc(record)
        items.append(Item(f"Question: {question}\nAnswer:", tuple(DELIMITER + c for c in choices), gold))
    return items


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow ``[title]`` markers become ". ", other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_context(line: str) -> str:
    """The text form stores ``activity_label + ": " + ctx_a + " " + ctx_b`` without lm-eval's
    ``ctx_b.capitalize()``; ctx_b is the trailing sentence fragment (after the last ". "), which starts
    lowercase. Capitalize that fragment the way lm-eval does (approximation: the split point is inferred)."""
    head, sep, tail = line.rpartition(". ")
    if sep and tail and tail[0].islower() and not tail.rstrip().endswith((".", "!", "?")):
        line = head + sep + tail.capitalize()
    return hellaswag_preprocess(line)


def load_hellaswag(data_dir: Path) -> list[Item]:
    """``hellaswag/hellaswag_val_full.txt.bz2``: 6 lines per item (context, gold index, 4 endings)."""
    with bz2.open(_need(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag file has {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        ctx, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2 : i + 6]
        items.append(Item(hellaswag_context(ctx), tuple(DELIMITER + hellaswag_preprocess(e) for e in endings), gold))
    return items


def load_winogrande(data_dir: Path) -> list[Item]:
    """``winogrande/dev.jsonl`` + ``dev-labels.lst`` (labels 1/2), with lm-eval's partial evaluation."""
    rows = _read_jsonl(data_dir / "winogrande" / "dev.jsonl")
    labels = _read_labels(data_dir / "winogrande" / "dev-labels.lst", len(rows))
    items = []
    for r, label in zip(rows, labels):
        cut = r["sentence"].index("_")
        prefix, target = r["sentence"][:cut], r["sentence"][cut + 1 :].strip()
        items.append(Item((prefix + r["option1"], prefix + r["option2"]), (DELIMITER + target,), label - 1))
    return items


def load_lambada(data_dir: Path) -> list[Item]:
    """``lambada/lambada_test.jsonl`` (OpenAI version): context and the last word as the single target."""
    items = []
    for r in _read_jsonl(data_dir / "lambada" / "lambada_test.jsonl"):
        words = r["text"].split(" ")
        items.append(Item(" ".join(words[:-1]), (DELIMITER + words[-1],), 0))
    return items


TASKS = {
    "piqa": load_piqa,
    "arc_easy": lambda d: load_arc(d, "ARC-Easy"),
    "arc_challenge": lambda d: load_arc(d, "ARC-Challenge"),
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "lambada": load_lambada,
}
# metrics each task reports, as lm-eval reports them
METRICS = {"winogrande": ("acc",), "lambada": ("acc", "perplexity")}
DEFAULT_METRICS = ("acc", "acc_norm")


def load_task(name: str, data_dir, limit: int | None = None) -> list[Item]:
    """Items of task ``name`` from ``data_dir`` (the first ``limit`` only, when given)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a directory")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    items = TASKS[name](data_dir)
    return items[:limit] if limit is not None else items


# ------------------------------------------------------------------------------------------- scoring


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation, split as lm-eval's ``HFLM._encode_pair`` does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx) :]
    if not ctx:
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


def _max_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    device=None,
    desc: str = "loglikelihood",
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): sum of the continuation tokens' log-probabilities, and whether
    every continuation token is the greedy (argmax) prediction."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = _max_length(model)
    requests = []
    for ctx, cont in pairs:
        c, t = encode_pair(tokenizer, ctx, cont)
        if not t:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        t = t[-max_len:]
        requests.append(((c + t)[-(max_len + 1) :][:-1], t))
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))  # longest first: little padding
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=desc, disable=not progress):
                idx = order[start : start + batch_size]
                width = len(requests[idx[0]][0])
                batch = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    inp = requests[i][0]
                    batch[row, : len(inp)] = torch.tensor(inp)  # right padding: causal, pads come after
                logits = model(input_ids=batch.to(device), use_cache=False).logits
                for row, i in enumerate(idx):
                    inp, cont = requests[i]
                    pos = slice(len(inp) - len(cont), len(inp))
                    logp = F.log_softmax(logits[row, pos].float(), dim=-1).cpu()
                    target = torch.tensor(cont)
                    greedy = bool((logp.argmax(-1) == target).all())
                    results[i] = (float(logp.gather(1, target[:, None]).sum()), greedy)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def score_items(items: list[Item], lls: list[tuple[float, bool]], metrics=DEFAULT_METRICS) -> dict:
    """Aggregate per-choice log-likelihoods (in ``Item.pairs`` order) into lm-eval's metrics."""
    acc = acc_norm = 0
    total_ll = 0.0
    k = 0
    for item in items:
        scores = lls[k : k + item.n_choices]
        k += item.n_choices
        sums = [s for s, _ in scores]
        if "perplexity" in metrics:  # a single-target loglikelihood task
            total_ll += sums[0]
            acc += scores[0][1]
            continue
        acc += max(range(len(sums)), key=sums.__getitem__) == item.gold
        lengths = [len(cont) - len(DELIMITER) for _, cont in item.pairs()]
        normed = [s / max(n, 1) for s, n in zip(sums, lengths)]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    n = len(items)
    out = {"acc": acc / n}
    if "acc_norm" in metrics:
        out["acc_norm"] = acc_norm / n
    if "perplexity" in metrics:
        out["perplexity"] = math.exp(-total_ll / n)
    out["n"] = n
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir,
    limit: int | None = None,
    batch_size: int = 16,
    device=None,
    progress: bool = True,
) -> dict:
    """Zero-shot accuracy on offline tasks: ``{task: {"acc", "acc_norm" | "perplexity", "n"}}``.

    Raises:
        ValueError: an unknown task name, a missing data file, or a tokenizer-less model.
    """
    if tokenizer is None:
        raise ValueError("zero-shot tasks need a tokenizer")
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    loaded = {name: load_task(name, data_dir, limit) for name in tasks}  # fail on bad names/files first
    results = {}
    for name, items in loaded.items():
        pairs = [p for item in items for p in item.pairs()]
        lls = loglikelihoods(model, tokenizer, pairs, batch_size, device, desc=name, progress=progress)
        results[name] = score_items(items, lls, METRICS.get(name, DEFAULT_METRICS))
        log.info("%s: %s", name, results[name])
    return results
