"""Quality evaluation: perplexity on text (and, later, zero-shot tasks and encoder fidelity)."""

from rankcut.evaluate.perplexity import evaluate, perplexity

__all__ = ["evaluate", "perplexity"]
