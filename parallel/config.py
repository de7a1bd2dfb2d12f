"""The `parallel:` section of the config: how the model is spread over the ranks (trainer/config.py reads it with the
other sections; parallel/parallelize.py applies it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from normtron.models.config import config_field


@dataclass
class ParallelConfig:
    backend: str = config_field("ddp", "data-parallel implementation: ddp (replicated), fsdp (PyTorch FSDP2 "
                                "sharding), deepspeed (DeepSpeed ZeRO engine)", ("ddp", "fsdp", "deepspeed"))
    dp_replicate: int = config_field(1, "fsdp: replicated data-parallel degree (> 1 with dp_shard > 1 = HSDP)", ge=1)
    dp_shard: int = config_field(-1, "fsdp: sharded data-parallel degree (-1 = all remaining ranks)")
    reshard_after_forward: bool = config_field(
        True, "fsdp: free gathered parameters after forward and gather again for backward (ZeRO-3); false keeps "
              "them until backward (ZeRO-2-like: more memory, less communication)")
    zero_stage: int = config_field(0, "deepspeed: ZeRO stage (0 = plain data parallel, 1 = optimizer state, "
                                      "2 = + gradients, 3 = + parameters sharded)", (0, 1, 2, 3))
    offload_optimizer: bool = config_field(False, "deepspeed (stage >= 1): optimizer state and step on the CPU")
    offload_params: bool = config_field(False, "fsdp: parameters, gradients and the optimizer step on the CPU "
                                               "(CPUOffloadPolicy); deepspeed (stage 3): parameters on the CPU")
    tp: int = config_field(1, "tensor-parallel degree (needs backend fsdp; must divide the head and KV-head counts)",
                           ge=1)
    sequence_parallel: bool = config_field(
        True, "tp > 1: keep the residual stream and the norms sharded along the sequence between the tensor-parallel "
              "matmuls (less activation memory; data.seq_len must divide by tp)")
    loss_parallel: bool = config_field(
        True, "tp > 1 without pp: leave the logits sharded over the vocabulary and compute the cross entropy on the "
              "shards (the full logits are never gathered)")
    pp: int = config_field(1, "pipeline-parallel degree (needs backend fsdp)", ge=1)
    pp_schedule: str = config_field("1F1B", "pipeline schedule; Interleaved1F1B, InterleavedZeroBubble and "
                                    "ZBVZeroBubble run several stages per rank (pp_stages_per_rank)",
                                    ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"))
    pp_stages_per_rank: Optional[int] = config_field(
        None, "pipeline stages (virtual stages) per rank (null = 1, or 2 for the multi-stage schedules)", ge=1)
    pp_layers: Optional[list[int]] = config_field(
        None, "layers in each pipeline stage, first to last (e.g. 3,3,2; null = balanced by layer count)")
    activation_checkpoint: str = config_field(
        "none", "recompute activations in backward: none, full (each block), or selective (each block keeps its "
                "matmul and attention outputs, recomputes the cheap element-wise ops)", ("none", "full", "selective"))
    compile: bool = config_field(False, "torch.compile each transformer block")
