"""The accelerators `normtron plan --gpu` knows: memory, dense bf16 peak, and the bandwidths collectives see.

Sources (vendor datasheets): H100 SXM5 80 GB, 989 TFLOP/s dense bf16, NVLink 4 900 GB/s bidirectional (NVIDIA H100
datasheet); H200 SXM 141 GB, same compute and NVLink (NVIDIA H200 datasheet); A100 SXM4 80 GB, 312 TFLOP/s dense
bf16, NVLink 3 600 GB/s bidirectional (NVIDIA A100 datasheet); B200 180 GB (HGX B200: 1.44 TB over 8 GPUs),
2.25 PFLOP/s dense bf16, NVLink 5 1.8 TB/s bidirectional (NVIDIA HGX B200 datasheet, half of the sparse figure).
Inter-node: one ConnectX-7 NDR 400 Gb/s NIC per GPU (50 GB/s) on H100/H200/B200 systems (DGX H100/B200 reference
architecture), one HDR 200 Gb/s (25 GB/s) per A100 (DGX A100). HBM bandwidth from the same datasheets (H100 SXM
3.35 TB/s, H200 4.8 TB/s, A100 80GB 2,039 GB/s, A100 40GB 1,555 GB/s, B200 8 TB/s). The bandwidths are per GPU and per direction, the
figure a ring all-gather or reduce-scatter divides its volume by; the roofline applies an efficiency to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from normtron.trainer.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float          # usable HBM (the datasheet's GB, as GiB would overstate it: converted below)
    bf16_tflops: float         # dense, no sparsity
    nvlink_gbps: float         # GB/s per GPU per direction inside a node
    internode_gbps: float      # GB/s per GPU per direction between nodes
    hbm_gbps: float = 0.0      # memory bandwidth, GB/s
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


GPUS = {
    "h100": GPU("H100 SXM 80GB", 80e9 / 2**30, 989.0, 450.0, 50.0, 3350.0),
    "h200": GPU("H200 SXM 141GB", 141e9 / 2**30, 989.0, 450.0, 50.0, 4800.0),
    "a100": GPU("A100 SXM 80GB", 80e9 / 2**30, 312.0, 300.0, 25.0, 2039.0),
    "a100-40gb": GPU("A100 SXM 40GB", 40e9 / 2**30, 312.0, 300.0, 25.0, 1555.0),
    "b200": GPU("B200 180GB", 180e9 / 2**30, 2250.0, 900.0, 50.0, 8000.0),
}


def lookup_gpu(name: str) -> GPU:
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise UserError(f"unknown GPU {name!r} for --gpu; known: {', '.join(GPUS)}")
    return gpu
