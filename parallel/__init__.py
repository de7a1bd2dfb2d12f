"""Distributed setup and the parallelization applied to models from outside: `parallelize()` composes DDP, FSDP2,
tensor and pipeline parallelism, activation checkpointing, compile and FP8 in one place."""

from parallel.config import ParallelConfig
from parallel.distributed import DistInfo, init_distributed, shutdown_distributed
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelModel, Precision, gradient_sync, parallelize

__all__ = ["DistInfo", "ParallelConfig", "ParallelDims", "ParallelModel", "Precision", "gradient_sync",
           "init_distributed", "parallelize", "shutdown_distributed"]
