"""rankcut: low-rank compression of pretrained transformers, measured honestly.

Public API::

    import rankcut
    summary = rankcut.compress_(model, rankcut.CompressConfig(method="whiten", keep=0.8), calib=texts, tokenizer=tok)
    rankcut.save(model, "out/", tokenizer=tok)
    model = rankcut.load("out/")                                    # or, after import rankcut:
    model = transformers.AutoModelForCausalLM.from_pretrained("out/")
    rankcut.compress_streaming("big-model/", "out/", config, calib=texts)   # larger than memory: block by block
    rankcut.perplexity(model, tok, "heldout.txt")
    rankcut.recover_(model, tok, "tune.txt", rankcut.RecoverConfig(steps=1000), eval_text="heldout.txt")
    report = rankcut.analyze(model, calib=texts, tokenizer=tok)   # spectra, energy ranks, speedup bounds
    out = rankcut.generate(model, tok, ["def add(a, b):"], max_new_tokens=32)   # out.texts, out.tokens_per_s
"""

__version__ = "0.1.0"


def _started_as_cli() -> bool:
    """Whether this process is the ``rankcut`` command (the script, or ``python -m rankcut``)."""
    import os
    import sys

    if os.path.basename(sys.argv[0] if sys.argv else "") == "rankcut":
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == "rankcut" for a, b in zip(argv, argv[1:]))


try:  # torch and transformers take seconds to import: Ctrl-C then is an interrupt like any other for the CLI
    from rankcut.analyze import AnalysisReport, analyze
    from rankcut.bench.generate import GenerationResult, generate
    from rankcut.compress import compress_
    from rankcut.config import CompressConfig, RecoverConfig
    from rankcut.evaluate import evaluate, perplexity
    from rankcut.fuse import prepare_for_inference, unfuse
    from rankcut.hf import register_with_transformers
    from rankcut.io import CheckpointError, load, save
    from rankcut.methods import available_methods, register as register_method
    from rankcut.methods.asvd import ASVDConfig
    from rankcut.methods.svd import SVDConfig
    from rankcut.methods.whiten import WhitenConfig
    from rankcut.modules import LowRankLinear
    from rankcut.policies import available_policies
    from rankcut.record import Record
    from rankcut.recover import RecoveryResult, recover_
    from rankcut.summary import CompressionSummary
    from rankcut.streaming import compress_streaming
    from rankcut.sweep import sweep
    from rankcut.targets import find_targets

    register_with_transformers()
except KeyboardInterrupt:
    if not _started_as_cli():
        raise
    import sys

    sys.stderr.write("rankcut: interrupted; nothing was saved\n")
    raise SystemExit(130) from None

__all__ = [
    "ASVDConfig",
    "AnalysisReport",
    "CheckpointError",
    "CompressConfig",
    "CompressionSummary",
    "GenerationResult",
    "LowRankLinear",
    "Record",
    "RecoverConfig",
    "RecoveryResult",
    "SVDConfig",
    "WhitenConfig",
    "analyze",
    "available_methods",
    "available_policies",
    "compress_",
    "compress_streaming",
    "evaluate",
    "find_targets",
    "generate",
    "load",
    "perplexity",
    "prepare_for_inference",
    "recover_",
    "register_method",
    "save",
    "sweep",
    "unfuse",
]
