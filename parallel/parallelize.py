"""Apply parallelism to the model from outside; the model itself never sees a mesh or a process group.

Every function here takes the model as built on the meta device plus a `materialize` callback (allocate on the
device, then initialize from the seed), and decides where in its sequence materialization belongs: DDP needs the
full model first, FSDP2 shards on meta and materializes only the shards.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.distributed import DistInfo


def apply_ddp(model: nn.Module, dist_info: DistInfo, materialize: Callable[[nn.Module], None]) -> nn.Module:
    """Replicate the model on every rank and all-reduce gradients (plain data parallelism)."""
    materialize(model)
    if dist_info.world_size == 1:
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    # The only buffer (the RoPE table) is computed identically everywhere: no need to broadcast it every forward.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce inside this context when `enabled` is False (gradient accumulation)."""
    if enabled or not isinstance(model, DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield
