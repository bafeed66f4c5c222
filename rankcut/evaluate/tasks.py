"""Zero-shot multiple-choice tasks, offline, scored the way lm-evaluation-harness scores them.

Each task's local files are read by :mod:`rankcut.evaluate.taskdata` into the records of the Hub dataset
lm-evaluation-harness uses; one builder per task turns a record into an :class:`Item` with lm-eval's
prompt format (``lm_eval/tasks/...``):

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

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rankcut.evaluate.taskdata import read_docs

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


# ------------------------------------------------------------------------------------------- items


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow ``[title]`` markers become ". ", other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(doc: dict) -> Item:
    return Item(f"Question: {doc['goal']}\nAnswer:", (DELIMITER + doc["sol1"], DELIMITER + doc["sol2"]), int(doc["label"]))


def _arc(doc: dict) -> Item:
    choices = doc["choices"]
    return Item(f"Question: {doc['question']}\nAnswer:", tuple(DELIMITER + c for c in choices["text"]),
                choices["label"].index(doc["answerKey"]))


def _hellaswag(doc: dict) -> Item:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + context)
    return Item(query, tuple(DELIMITER + hellaswag_preprocess(e) for e in doc["endings"]), int(doc["label"]))


def _winogrande(doc: dict) -> Item:
    cut = doc["sentence"].index("_")
    prefix, target = doc["sentence"][:cut], doc["sentence"][cut + 1 :].strip()
    return Item((prefix + doc["option1"], prefix + doc["option2"]), (DELIMITER + target,), int(doc["answer"]) - 1)


def _lambada(doc: dict) -> Item:
    words = doc["text"].split(" ")
    return Item(" ".join(words[:-1]), (DELIMITER + words[-1],), 0)


ITEM_BUILDERS = {
    "piqa": _piqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "lambada": _lambada,
}
TASKS = tuple(ITEM_BUILDERS)
# metrics each task reports, as lm-eval reports them
METRICS = {"winogrande": ("acc",), "lambada": ("acc", "perplexity")}
DEFAULT_METRICS = ("acc", "acc_norm")


def load_task(name: str, data_dir, limit: int | None = None) -> list[Item]:
    """Items of task ``name`` from ``data_dir`` (the first ``limit`` only, when given)."""
    return [ITEM_BUILDERS[name](doc) for doc in read_docs(name, data_dir, limit)]


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


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / √n), as lm-eval reports ``*_stderr``."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_items(items: list[Item], lls: list[tuple[float, bool]], metrics=DEFAULT_METRICS) -> dict:
    """Aggregate per-choice log-likelihoods (in ``Item.pairs`` order) into lm-eval's metrics, with the
    standard errors of the accuracies."""
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    total_ll = 0.0
    k = 0
    for item in items:
        scores = lls[k : k + item.n_choices]
        k += item.n_choices
        sums = [s for s, _ in scores]
        if "perplexity" in metrics:  # a single-target loglikelihood task
            total_ll += sums[0]
            hits["acc"].append(float(scores[0][1]))
            continue
        hits["acc"].append(float(max(range(len(sums)), key=sums.__getitem__) == item.gold))
        lengths = [len(cont) - len(DELIMITER) for _, cont in item.pairs()]
        normed = [s / max(n, 1) for s, n in zip(sums, lengths)]
        hits["acc_norm"].append(float(max(range(len(normed)), key=normed.__getitem__) == item.gold))
    out = {}
    for metric in ("acc", "acc_norm"):
        if metric in metrics:
            out[metric], out[f"{metric}_stderr"] = _mean_and_stderr(hits[metric])
    if "perplexity" in metrics:
        out["perplexity"] = math.exp(-total_ll / len(items))
    out["n"] = len(items)
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
