"""Quality evaluation: perplexity on text, offline zero-shot tasks (and, later, encoder fidelity)."""

from rankcut.evaluate.perplexity import evaluate, perplexity
from rankcut.evaluate.tasks import evaluate_tasks

__all__ = ["evaluate", "evaluate_tasks", "perplexity"]
