"""``rankcut recover CHECKPOINT --data TEXT -o OUT``: :func:`rankcut.recover_` then :func:`rankcut.save`.

The training flags are the fields of :class:`rankcut.RecoverConfig` (name, type, default), with the help texts
below; ``--warmup`` is ``warmup_steps``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from rankcut import report
from rankcut.cli import CLIError, flags

FLAGS = {"warmup_steps": "--warmup"}


def _helps() -> dict[str, str]:
    from rankcut.config import INITS, MODES, PRECISIONS

    return {
        "mode": f"{' or '.join(MODES)}: factors = LoRA on U and V, merged back, ranks unchanged; grow = a residual "
                "adapter beside each layer, merged by concatenation, ranks + --lora-rank",
        "init": f"{' or '.join(INITS)}: zero = LoRA's default; residual = for grow the next residual directions "
                "(needs --dense), for factors PiSSA on each factor",
        "lora_rank": "adapter rank k",
        "lora_alpha": "adapter scale numerator (scale = alpha / rank)",
        "lora_dropout": "dropout on the adapter input",
        "steps": "optimizer steps",
        "seq_len": "tokens per training window",
        "batch_size": "windows per micro-batch",
        "grad_accum": "micro-batches per optimizer step",
        "lr": "peak learning rate (AdamW; linear warm-up, cosine decay to 10 %)",
        "warmup_steps": "warm-up steps",
        "weight_decay": "AdamW weight decay",
        "max_grad_norm": "gradient-norm clipping (0: off)",
        "seed": "seed of the adapter initialisation, the window order and dropout",
        "distill": "weight in [0, 1] of distillation from --dense (KL to its next-token distribution); the "
                   "next-token loss gets the rest",
        "precision": f"autocast: {', '.join(PRECISIONS)} (auto: bf16 on a CUDA GPU that has it, else fp32; fp16 needs "
                     "CUDA)",
        "gradient_checkpointing": "recompute activations in the backward pass: less memory, more time",
        "train_shared": "mode factors: also train the factors shared across layers (tucker group layers) directly",
        "eval_every": "perplexity of --eval every N steps",
        "eval_windows": "evaluate the first N windows of --eval",
        "save_every": "save the resumable training state every N steps",
    }


DEFAULT_TEXTS = {"lora_alpha": "the lora rank, i.e. scale 1", "warmup_steps": "5 % of --steps",
                 "eval_every": "10 times per run", "distill": "1 with --dense, else 0"}


def add_parser(sub) -> argparse.ArgumentParser:
    from rankcut.config import RecoverConfig

    r = sub.add_parser("recover", help="win back quality of a compressed checkpoint: LoRA fine-tune, merged back",
                       description="Fine-tune low-rank adapters on text you choose, merge them into the checkpoint "
                                   "and write a normal rankcut checkpoint.")
    r.add_argument("model", help="rankcut checkpoint directory (from rankcut compress)")
    r.add_argument("--data", action="append", required=True, metavar="TEXT",
                   help="tuning text file or dataset name (its train split); repeatable")
    r.add_argument("--eval", metavar="TEXT",
                   help="held-out text for perplexity before, during and after (never one of the tuning texts)")
    flags.add_fields(r, RecoverConfig, _helps(), flags=FLAGS, defaults={"distill": None}, default_texts=DEFAULT_TEXTS)
    r.add_argument("--dense", metavar="MODEL",
                   help="the dense model the checkpoint came from: the teacher of --distill, needed by --mode grow "
                        "--init residual")
    r.add_argument("--calib", metavar="TEXT", help=flags.helptext(
        "calibration text for the statistics of --mode grow --init residual", default_text="the first --data"))
    r.add_argument("--work-dir", help=flags.helptext("where the resumable training state lives",
                                                     default_text=".OUT.recover-work beside OUT"))
    r.add_argument("--restart", action="store_true", help="discard a saved training state instead of resuming it")
    r.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    flags.add_device(r)
    flags.add_dtype(r, "weights during training; the output keeps the checkpoint's dtype", default="float32",
                    choices=_dtypes())
    flags.add_output(r, "checkpoint directory to write", "replace an existing checkpoint at --output")
    r.add_argument("--json", metavar="FILE", help="also write the recovery record as JSON here")
    flags.add_quiet(r)
    return r


def _dtypes() -> list[str]:
    from rankcut.utils import DTYPES

    return list(DTYPES)


def recover_config(args: argparse.Namespace):
    """The RecoverConfig of the flags (validated by it): ``--distill`` defaults to 1 with ``--dense``, and
    ``--max-grad-norm 0`` means no clipping."""
    from rankcut.config import RecoverConfig

    values = flags.field_values(args, RecoverConfig)
    if values["distill"] is None:
        values["distill"] = 1.0 if args.dense else 0.0
    values["max_grad_norm"] = values["max_grad_norm"] or None
    return RecoverConfig(**values)


def run(args: argparse.Namespace) -> int:
    from rankcut import save
    from rankcut.hf import load_any
    from rankcut.io import check_output, read_record
    from rankcut.recover import check_recover, recover_
    from rankcut.utils import parse_dtype, resolve_device

    spec = os.path.expanduser(args.model)
    read_record(spec)  # CheckpointError: missing, not a rankcut checkpoint, incomplete
    config = recover_config(args)
    output = Path(args.output)
    check_output(output, args.overwrite, flag="--overwrite")  # before any work: fail fast, write nothing
    if output.resolve() == Path(spec).resolve():
        raise CLIError("the output must not be the input checkpoint")
    check_recover(config, args.data, args.eval, dense_given=args.dense is not None, calib=args.calib)
    device = resolve_device(args.device)
    work = Path(args.work_dir) if args.work_dir else output.parent / f".{output.name}.recover-work"
    model, tokenizer = load_any(spec)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; recovery needs one to read the tuning text")
    stored = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.to(parse_dtype(args.dtype))
    dense = load_any(args.dense, parse_dtype(args.dtype))[0] if args.dense else None
    if config.distill == 0:
        print("note: next-token loss on the tuning text only; with --dense MODEL (the model this checkpoint was "
              "compressed from) recovery distils from it instead, which held-out text favoured in BENCHMARKS.md")
    print(f"tuning data: {', '.join(args.data)}; training state saved every {config.save_every} steps in {work} "
          "(re-run the same command to resume)")
    args.interrupted = f"the state of the last save is in {work}: re-run the same command to resume"
    result = recover_(model, tokenizer, args.data, config, eval_text=args.eval, dense=dense, calib=args.calib,
                      work_dir=work, restart=args.restart, device=device, progress=not args.quiet)
    args.interrupted = None
    save(model, output, tokenizer=tokenizer, overwrite=args.overwrite, dtype=stored)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(result.report())
    print(f"saved {output}")
    report.write_json(args.json, {"recovery": result.record, **report.invocation(args.argv, device)})
    return 0
