"""Quality evaluation: perplexity on text, offline zero-shot tasks and encoder embedding fidelity."""

from rankcut.evaluate.fidelity import embedding_fidelity, sentence_embeddings
from rankcut.evaluate.perplexity import evaluate, perplexity
from rankcut.evaluate.tasks import evaluate_tasks

__all__ = ["embedding_fidelity", "evaluate", "evaluate_tasks", "perplexity", "sentence_embeddings"]
