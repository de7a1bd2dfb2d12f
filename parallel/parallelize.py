"""Apply parallelism to a built, initialized model from outside; the model itself never sees a mesh."""

from __future__ import annotations

import inspect

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.distributed import DistInfo


def apply_ddp(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """Replicate the model on every rank and all-reduce gradients (plain data parallelism)."""
    if dist_info.world_size == 1:
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    # The only buffer (the RoPE table) is computed identically everywhere: no need to broadcast it every forward.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)

