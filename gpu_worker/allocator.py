"""The CUDA caching allocator's settings for a training process (torch-free: set before torch's allocator
starts, which reads ``PYTORCH_CUDA_ALLOC_CONF`` at its first allocation).

Expandable segments: the patcher re-lays small models' frozen weights after loading (the joined and padded
layouts, gpu_worker/patching), which leaves holes inside the loaded weights' segments that the default
allocator can neither reuse for the wider buffers nor give back. With expandable segments it unmaps them:
1B on the H200, 10.56 GB reserved against 11.07 with the padded Q/K/V, the step unchanged (bench/NOTES.md,
session 12). An operator's own ``PYTORCH_CUDA_ALLOC_CONF`` is kept as it is.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(env: MutableMapping[str, str] = os.environ) -> str:
    """Set the training process's allocator settings unless ``env`` already has some; returns those in force.
    Call before the process allocates on the GPU."""
    return env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
