"""Running a kernel check script under Triton's interpreter on the CPU, in a fresh process (the interpreter is
chosen when Triton is imported, so it cannot be switched on inside the test process)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

#: Skip marker for the interpreter tests.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def run_in_interpreter(script: str, timeout: int = 600) -> None:
    """Run ``script`` (dedented) with ``TRITON_INTERPRET=1`` and no GPU; assert it exits 0 and prints ``ok``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
