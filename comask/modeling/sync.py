"""Reading device values on the host, in the few places where a shape must be known.

Each such read waits for the device (a host-device sync on CUDA). `host_list` marks the read with a
profiler range, so that `comask.bench.speed.count_syncs` counts it on every device, the CPU included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HOST_READ = "comask::host_read"


def host_list(t: Tensor) -> Any:
    """`t.tolist()`, marked for the profiler as one host read."""
    with torch.profiler.record_function(HOST_READ):
        return t.tolist()
