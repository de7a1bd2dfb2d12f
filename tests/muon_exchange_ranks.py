"""Run under torchrun with 4 ranks (tests/test_muon.py): Muon on matrices sharded over a 2 x 2 mesh in every way
FSDP2, TP and HSDP shard them equals torch.optim.Muon on the whole matrices bit for bit (bf16 Newton-Schulz), and
each rank orthogonalizes only its share. Prints one line per placement from rank 0."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from normtron.trainer.muon import DEFAULTS, MuonWithAdamW

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
torch.manual_seed(0)
shapes = [(64, 32), (128, 64), (64, 128), (40, 24), (30, 18)]  # the last two split unevenly
weights, grads = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
d, t = mesh.get_coordinate()
# Each layout's placements and the rank's block, written with torch.chunk as FSDP2 and TP cut them.
PLACEMENTS = {
    "fsdp2 over tp colwise": ((_StridedShard(0, split_factor=2), Shard(0)), lambda w: w.chunk(2)[t].chunk(2)[d]),
    "fsdp2 over tp rowwise": ((Shard(0), Shard(1)), lambda w: w.chunk(2)[d].chunk(2, dim=1)[t]),
    "hsdp": ((Replicate(), Shard(0)), lambda w: w.chunk(2)[t]),
}


def sharded(w, placements, block):
    return DTensor.from_local(block(w).clone(), mesh, placements, shape=w.shape, stride=w.stride())


for name, (placements, block) in PLACEMENTS.items():
    params = [torch.nn.Parameter(sharded(w, placements, block)) for w in weights]
    reference = [torch.nn.Parameter(w.clone()) for w in weights]
    ours = MuonWithAdamW([{**DEFAULTS, "params": params, "muon": True, "lr": 0.02, "name": "muon",
                           "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}])
    theirs = torch.optim.Muon(reference, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    calls = []
    for step in range(2):
        for p, r, g in zip(params, reference, grads):
            p.grad = sharded(g * (step + 1), placements, block)
            r.grad = g * (step + 1)
        ours.step(), theirs.step()
        calls.append(ours.newton_schulz_calls)
    equal = all(torch.equal(p.to_local(), block(r.detach())) for p, r in zip(params, reference))
    counts, equals = [None] * 4, [None] * 4
    dist.all_gather_object(counts, calls)
    dist.all_gather_object(equals, equal)
    if dist.get_rank() == 0:
        print(f"{name}: equal={all(equals)} calls={counts}", flush=True)
dist.destroy_process_group()
