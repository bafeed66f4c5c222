"""GPU decode benchmark: a static-KV-cache, CUDA-graph decode loop, NVML energy, and a roofline cost model.

- :func:`bench` / ``rankcut bench``: decode speed of a model and optionally its dense baseline.
- :func:`make_decoder`: rankcut's own decode step over a Hugging Face model's modules.
- :mod:`rankcut.cost`: predicted time per target and per decode step from bytes, FLOPs and the
  measured launch floor.
"""

from rankcut.cost import H200_BF16, DeviceProfile, speedup_warning
from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import time_decode
from rankcut.bench.models import preset_config, random_lowrank_, random_model, weight_bytes
from rankcut.bench.run import bench, bench_model, format_table

__all__ = [
    "H200_BF16",
    "DeviceProfile",
    "bench",
    "bench_model",
    "format_table",
    "make_decoder",
    "preset_config",
    "random_lowrank_",
    "random_model",
    "speedup_warning",
    "time_decode",
    "weight_bytes",
]
