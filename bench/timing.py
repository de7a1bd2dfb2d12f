"""Wall-clock timing shared by the benches."""

from __future__ import annotations

import time

import torch


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes; on CUDA the queue is drained before and after (kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
