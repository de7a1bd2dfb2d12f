"""Process-group setup and the few collectives the trainer needs.

Backend and device come from the hardware: NCCL on CUDA GPUs, gloo on CPU. Nothing else in the stack names either.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 for a plain single process)."""
    return int(os.environ.get("RANK", "0"))


def pick_device(local_rank: int = 0) -> tuple[torch.device, str]:
    """(device, process-group backend) for this machine."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(needs_process_group: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else run as a single process —
    inside a one-rank process group when `needs_process_group` (FSDP2 and DeepSpeed need one even alone)."""
    rank, world_size = env_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, backend = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ and not needs_process_group:
        return DistInfo(0, 0, 1, device, None)
    if "RANK" not in os.environ:  # a world of one, set up the way torchrun would (DeepSpeed reads these too)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                store=restart_store(rank, world_size), rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size, device, backend)


def restart_store(rank: int, world_size: int) -> dist.Store | None:
    """Under torchrun, the rendezvous store with a prefix per restart attempt: workers restarted by --max-restarts
    reuse the agent's store, where torch 2.13's init_process_group would read the dead workers' gloo addresses (and
    hang connecting to them). None (env:// as usual) outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it, as env:// does
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=datetime.timedelta(minutes=10))
    return dist.PrefixStore(f"normtron/attempt_{attempt}/", store)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python floats over all ranks (one collective), in float64."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank, so that all ranks act on one decision."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
