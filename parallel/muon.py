"""Whole-matrix work on sharded matrices without every rank gathering every matrix (used by Muon's Newton-Schulz
step, trainer/muon.py).

Each sharded matrix (a DTensor sharded by FSDP2, by tensor parallelism, or both) gets one owner among the ranks
that hold its shards, the matrices spread over those ranks by size. One all-to-all sends every rank's shards to
their matrices' owners, each owner runs the function on its whole matrices, and a second all-to-all sends every
rank its shards of the results. Ranks that hold the same shards in different replicas (HSDP's dp_replicate) each
do the work of their own replica; under a pipeline each stage's ranks only exchange with each other.

Per step and rank this moves about 2 * (W-1)/W^2 of the matrices' bytes (W ranks sharing them), against (W-1)/W for
gathering every matrix on every rank (DTensor.full_tensor()): W/2 times less, and 1/W of the Newton-Schulz work.
The split into assign / gather to the owner / redistribute follows the distributed-Muon design note proposed for
torch.optim.Muon (vchiley/pytorch, torch/optim/PROJECT.md); here all matrices of a step share two all-to-alls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.tensor._utils import _get_shard_size_and_offsets


@dataclass
class ShardedMatrix:
    shape: torch.Size
    owner: int  # global rank that runs the function on the whole matrix
    blocks: dict[int, tuple[torch.Tensor, torch.Tensor]]  # global rank -> (rows, columns) of the matrix it holds


def shard_indices(shape: torch.Size, mesh_shape: tuple[int, ...], coordinate: list[int],
                  placements) -> list[torch.Tensor]:
    """For each dimension of a tensor of `shape`, the global indices held at mesh `coordinate`: DTensor's own shard
    arithmetic (uneven chunks, FSDP2's strided shards over tensor-parallel ones), kept as index lists."""
    indices: dict[int, torch.Tensor] = {}
    sizes = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if not shard_like(placement):
            continue
        dim = placement.dim
        sizes[dim], indices[dim] = _get_shard_size_and_offsets(sizes[dim], mesh_shape[mesh_dim],
                                                               coordinate[mesh_dim], placement, indices.get(dim),
                                                               shape[dim], False)
        if sizes[dim] == 0:
            indices[dim] = indices[dim][:0]
    return [indices.get(d, torch.arange(shape[d])) for d in range(len(shape))]


def plan_matrices(params: list[DTensor]) -> list[ShardedMatrix]:
    """The owner and every rank's block of each sharded matrix. All ranks holding the same matrices compute the
    same plan: largest matrices first, each to the least-loaded rank among those that hold its shards."""
    plans: list[ShardedMatrix | None] = [None] * len(params)
    loads: dict[tuple[int, ...], list[int]] = {}
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        p = params[i]
        mesh, coordinate = p.device_mesh, p.device_mesh.get_coordinate()
        # The ranks of this replica: vary the mesh dimensions that shard the matrix, keep the others at ours.
        select = tuple(slice(None) if shard_like(pl) else coordinate[d] for d, pl in enumerate(p.placements))
        peers = mesh.mesh[select].flatten().tolist()
        blocks = {}
        for rank in peers:
            peer_coordinate = [int(c) for c in (mesh.mesh == rank).nonzero()[0]]
            rows, cols = shard_indices(p.shape, tuple(mesh.shape), peer_coordinate, p.placements)
            blocks[rank] = (rows, cols)
        load = loads.setdefault(tuple(peers), [0] * len(peers))
        k = load.index(min(load))
        load[k] += p.numel()
        plans[i] = ShardedMatrix(p.shape, peers[k], blocks)
    return plans


def shard_like(placement) -> bool:
    return isinstance(placement, (Shard, _StridedShard))  # FSDP2 over tensor parallelism: strided shards


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor) and any(shard_like(pl) for pl in param.placements)


class ShardedMatrixMap:
    """`apply(fns, shards)`: fns[i] on the whole matrix of sharded parameter i (whose shard on this rank is
    shards[i]), run by the matrix's owner only; returns this rank's shards of the results. The whole matrices travel
    in `wire_dtype` (bf16: what Muon's Newton-Schulz casts them to anyway; fp32 for an fp32 iteration). `calls`
    counts the matrices this rank ran a function on."""

    def __init__(self, params: list[DTensor]):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # NCCL moves only GPU tensors: CPU-offloaded shards travel, and are orthogonalized, on the GPU.
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.plans = plan_matrices(params)
        for plan in self.plans:
            plan.blocks = {rank: (rows.to(self.device), cols.to(self.device))
                           for rank, (rows, cols) in plan.blocks.items()}
        self.calls = 0

    def apply(self, fns: list[Callable[[torch.Tensor], torch.Tensor]], shards: list[torch.Tensor],
              wire_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        plans, me, device = self.plans, self.rank, self.device
        mine = [i for i, plan in enumerate(plans) if plan.owner == me]
        # Gather: to each owner, this rank's shards of its matrices, in plan order.
        send = [[shards[i] for i, plan in enumerate(plans) if plan.owner == dest] for dest in range(self.world)]
        recv_sizes = [sum(block_numel(plans[i], src) for i in mine) for src in range(self.world)]
        received = self.all_to_all(send, recv_sizes, device, wire_dtype)
        whole = {i: torch.zeros(plans[i].shape, dtype=wire_dtype, device=device) for i in mine}
        for src, chunk in enumerate(received):
            offset = 0
            for i in mine:
                if src in plans[i].blocks:
                    rows, cols = plans[i].blocks[src]
                    n = len(rows) * len(cols)
                    whole[i][rows[:, None], cols] = chunk[offset:offset + n].view(len(rows), len(cols))
                    offset += n
        results = {i: fns[i](whole[i]) for i in mine}
        self.calls += len(mine)
        # Scatter: each rank's blocks of the results back to it; ours arrive in plan order per owner.
        send = [[results[i][plans[i].blocks[dest][0][:, None], plans[i].blocks[dest][1]]
                 for i in mine if dest in plans[i].blocks] for dest in range(self.world)]
        recv_sizes = [sum(shards[i].numel() for i, plan in enumerate(plans) if plan.owner == src)
                      for src in range(self.world)]
        received = self.all_to_all(send, recv_sizes, device, wire_dtype)
        out: list[torch.Tensor | None] = [None] * len(plans)
        for src, chunk in enumerate(received):
            offset = 0
            for i, plan in enumerate(plans):
                if plan.owner == src:
                    n = shards[i].numel()
                    out[i] = chunk[offset:offset + n].view(shards[i].shape)
                    offset += n
        return out

    def all_to_all(self, send: list[list[torch.Tensor]], recv_sizes: list[int], device: torch.device,
                   dtype: torch.dtype) -> list[torch.Tensor]:
        """One all-to-all over the world group (ranks that share nothing exchange zero elements)."""
        flat = [t.to(device=device, dtype=dtype).reshape(-1) for tensors in send for t in tensors]
        inputs = torch.cat(flat) if flat else torch.zeros(0, dtype=dtype, device=device)
        output = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(output, inputs, output_split_sizes=recv_sizes,
                               input_split_sizes=[sum(t.numel() for t in tensors) for tensors in send])
        return list(output.split(recv_sizes))


def block_numel(plan: ShardedMatrix, rank: int) -> int:
    rows, cols = plan.blocks.get(rank, ((), ()))
    return len(rows) * len(cols)
