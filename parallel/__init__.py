"""Distributed setup and parallelization applied to models from outside (DDP now; FSDP2, TP, PP later)."""

from parallel.distributed import DistInfo, init_distributed, shutdown_distributed
from parallel.parallelize import apply_ddp, gradient_sync

__all__ = ["DistInfo", "apply_ddp", "gradient_sync", "init_distributed", "shutdown_distributed"]
