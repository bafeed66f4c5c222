"""rankcut: low-rank compression of pretrained transformers, measured honestly.

Public API::

    import rankcut
    summary = rankcut.compress_(model, rankcut.CompressConfig(method="whiten", keep=0.8), calib=texts, tokenizer=tok)
    rankcut.save(model, "out/", tokenizer=tok)
    model = rankcut.load("out/")                                    # or, after import rankcut:
    model = transformers.AutoModelForCausalLM.from_pretrained("out/")
    rankcut.perplexity(model, tok, "heldout.txt")
    rankcut.recover_(model, tok, "tune.txt", rankcut.RecoverConfig(steps=1000), eval_text="heldout.txt")
    report = rankcut.analyze(model, calib=texts, tokenizer=tok)   # spectra, energy ranks, speedup bounds
"""

__version__ = "0.1.0"

from rankcut.analyze import AnalysisReport, analyze  # noqa: E402
from rankcut.compress import compress_  # noqa: E402
from rankcut.config import CompressConfig, RecoverConfig  # noqa: E402
from rankcut.evaluate import evaluate, perplexity  # noqa: E402
from rankcut.io import CheckpointError, load, register_with_transformers, save  # noqa: E402
from rankcut.layers import LowRankLinear  # noqa: E402
from rankcut.methods import available_methods, register as register_method  # noqa: E402
from rankcut.recover import RecoveryResult, recover_  # noqa: E402
from rankcut.summary import CompressionSummary  # noqa: E402
from rankcut.sweep import sweep  # noqa: E402
from rankcut.targets import find_targets  # noqa: E402

register_with_transformers()

__all__ = [
    "AnalysisReport",
    "CheckpointError",
    "CompressConfig",
    "CompressionSummary",
    "LowRankLinear",
    "RecoverConfig",
    "RecoveryResult",
    "analyze",
    "available_methods",
    "compress_",
    "evaluate",
    "find_targets",
    "load",
    "perplexity",
    "recover_",
    "register_method",
    "save",
    "sweep",
]
