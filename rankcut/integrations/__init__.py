"""Integrations with serving engines.

- :mod:`rankcut.integrations.sharding`: tensor-parallel sharding of low-rank factors (pure torch).
- :mod:`rankcut.integrations.vllm_plugin`: the vLLM plugin (``pip install "rankcut[vllm]"``; the entry point
  ``vllm.general_plugins`` -> :func:`~rankcut.integrations.vllm_plugin.register`). Nothing here is imported by
  ``import rankcut``, and only :mod:`~rankcut.integrations.vllm_layers` imports vLLM.
"""
