"""The layout of the ranks: how many pipeline stages, data-parallel replicas and shards, and tensor-parallel
groups, and the DeviceMesh that names them.

Dimension order follows torchtitan (pp, dp_replicate, dp_shard, tp): ranks that talk most (tensor parallel) are
adjacent, so on a GPU cluster they share a node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def resolve(cls, pp: int, dp_replicate: int, dp_shard: int, tp: int, world_size: int) -> ParallelDims:
        """Fill dp_shard=-1 with the ranks the other dimensions leave; ValueError naming the mismatch."""
        if dp_shard < 1 and dp_shard != -1:
            raise ValueError(f"parallel.dp_shard={dp_shard} must be >= 1, or -1 for all remaining ranks")
        others = pp * dp_replicate * tp
        filled = world_size // others if dp_shard == -1 else dp_shard
        if others * max(filled, 1) != world_size:
            raise ValueError(f"parallel.pp ({pp}) x dp_replicate ({dp_replicate}) x dp_shard ({dp_shard}) x tp "
                             f"({tp}) must equal the {world_size} launched ranks; change the degrees or the number "
                             f"of processes")
        return cls(pp, dp_replicate, filled, tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    def dp_coordinates(self, rank: int) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size) of global `rank` in the (pp, dp_replicate, dp_shard, tp) order:
        ranks that differ only in their pipeline stage or tensor-parallel slice read the same data."""
        return (rank // self.tp) % self.dp_size, self.dp_size

    def build_mesh(self, device: torch.device) -> DeviceMesh:
        names, sizes = zip(*(("pp", self.pp), ("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard),
                             ("tp", self.tp)))
        mesh = init_device_mesh(device.type, sizes, mesh_dim_names=names)
        # A norm over parameters sharded by both FSDP and tp reduces over both dims: with the flattened dim named,
        # DTensor does that in one all-reduce instead of one per dim.
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
        return mesh
