"""Distributed setup and parallelization applied to models from outside (DDP now; FSDP2, TP, PP later)."""

from parallel.distributed import DistInfo, init_distributed, shutdown_distributed
from parallel.parallelize import apply_ddp, gradient_sync

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "apply_ddp", "gradient_sync"]
