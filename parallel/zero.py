"""DeepSpeed ZeRO (stages 0-3) driving the same model, optimizer, schedule and data as the PyTorch backends.

DeepSpeed owns gradient reduction, clipping, the optimizer step (on its fp32 master partitions) and the checkpoint
files; normtron keeps everything else. It picks its accelerator at import time, so `DS_ACCELERATOR=cpu` is set
before the import whenever there is no GPU.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normtron.models.hypersphere import hypersphere_weights, l2_normalize

# Entries normtron derives from its own config; a `deepspeed:` section may not contradict them.
OWNED_KEYS = {
    "train_batch_size": "training.batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.micro_batch_size",
    "gradient_clipping": "training.grad_clip",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "optimizer": "training.lr, weight_decay, beta1, beta2, adam_eps",
    "scheduler": "training.schedule, warmup_steps",
}


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed still calls the collectives torch renamed; the warning is about DeepSpeed, not the user's setup.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    try:
        return importlib.import_module("deepspeed")
    except ImportError:
        raise ImportError("parallel.backend=deepspeed needs DeepSpeed: pip install 'normtron[deepspeed]' "
                          "(or pip install deepspeed)") from None


def build_deepspeed_config(*, global_batch: int, micro_batch: int, accum_steps: int, grad_clip: float,
                           bf16: bool, zero_stage: int, offload_optimizer: bool, offload_params: bool,
                           user: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's JSON config from normtron's keys, with the user's `deepspeed:` entries merged over it.
    Raises ValueError when a user entry contradicts a value normtron sets."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        # Gradients are reduced in fp32 whatever the compute precision (DeepSpeed's default is the bf16 of the
        # gradients); a `deepspeed:` entry may trade that back for bandwidth.
        "communication_data_type": "fp32",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # normtron's AdamW (torch.optim.AdamW) is passed in as the client
        "zero_force_ds_cpu_optimizer": False,   # ... also under ZeRO-Offload, so both paths run the same update
        "steps_per_print": 2**31 - 1,           # normtron prints progress itself
        "wall_clock_breakdown": False,
    }
    for key, value in user.items():
        if key in OWNED_KEYS and value != config.get(key):
            raise ValueError(f"deepspeed.{key}={value!r} conflicts with what normtron sets from "
                             f"{OWNED_KEYS[key]} ({config.get(key, 'not used')!r}); set it through that key")
        if key == "zero_optimization" and isinstance(value, dict) and value.get("stage", zero_stage) != zero_stage:
            raise ValueError(f"deepspeed.zero_optimization.stage={value['stage']} conflicts with "
                             f"parallel.zero_stage={zero_stage}; set parallel.zero_stage")
    return _merge(config, user)


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key),
                                                                                             dict) else value
    return merged


def _skip_shared_memory_allreduce_build(deepspeed) -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce in init_distributed that only its
    inference all-reduce uses. The build holds a lock file under TORCH_EXTENSIONS_DIR; a process killed while holding
    it (a timeout, a fault-injection test, Ctrl-C) leaves the lock behind and every later DeepSpeed start waits on it
    forever (torch.utils.file_baton). Training never calls that kernel, so the build is skipped; the probe result is
    a module-level dict that DeepSpeed documents as editable."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """DeepSpeed's half of the trainer's `Engine` over a `deepspeed.DeepSpeedEngine`: micro-batch, backward, step,
    save/load (trainer/engine.py's ZeroEngine adds the step's micro-batches and evaluation)."""

    checkpoint_format = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: dict[str, Any],
                 backend: str | None, hypersphere: bool = False):
        self.hypersphere = hypersphere  # nGPT: renormalize the hypersphere weights after every optimizer step
        deepspeed = import_deepspeed()
        _skip_shared_memory_allreduce_build(deepspeed)
        deepspeed.init_distributed(dist_backend=backend or "gloo")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model = self.engine  # forward, train() and eval() go through the engine

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces gradients itself, at the accumulation boundary

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the accumulation steps
        if not last:
            self.engine.step()  # advances DeepSpeed's micro-step count; the optimizer steps only at the boundary

    def step(self, max_norm: float, skip_nonfinite: bool = False) -> torch.Tensor:
        # Without ZeRO (stage 0) and without mixed precision DeepSpeed computes no global gradient norm (it reports
        # None): take it here, from the gradients its backward has already all-reduced, before step() zeroes them.
        own_norm = None
        if self.engine.zero_optimization_stage() == 0:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            own_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.engine.step()  # clipping (gradient_clipping), optimizer, scheduler, zero_grad
        if self.hypersphere:
            normalize_hypersphere_masters_(self.engine.module)
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def local_state_elements(self) -> tuple[int, int]:
        """(parameter, optimizer-state) elements this rank holds; ZeRO-3 keeps a partition (`ds_tensor`) of
        each parameter, ZeRO-1/2 partition the optimizer state (held by the wrapped torch optimizer)."""
        params = {id(p): p for p in self.engine.module.parameters()}.values()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        state = sum(value.numel() for s in inner.state.values() for value in s.values()
                    if torch.is_tensor(value) and value.dim() > 0)
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params), state

    def save_checkpoint(self, path: Path, train_state) -> None:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"train": train_state.state_dict()},
                                    save_latest=False)
        if self.engine.global_rank == 0:  # DeepSpeed's own recovery scripts; `normtron convert` does their job
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (path.parent / script).unlink(missing_ok=True)

    def load_checkpoint(self, path: Path, train_state) -> None:
        loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None or "train" not in (client_state or {}):
            raise ValueError("DeepSpeed found no complete checkpoint there")
        train_state.load_state_dict(client_state["train"])


@torch.no_grad()
def normalize_hypersphere_masters_(model: nn.Module) -> None:
    """nGPT's post-step projection (models/hypersphere.py, paper Sec. 2.6) under DeepSpeed, whose step updates fp32
    master partitions and then copies them into the model's weights, so the projection must reach both: each
    hypersphere weight's master is gathered whole, renormalized along its dim, written back to this rank's master partition
    (DeepSpeed's safe_get/set_full_fp32_param), and the same unit vectors go into the working weight that the next
    forward uses (ZeRO-1/2: the whole weight on every rank; ZeRO-3: its partition, through GatheredParameters).
    Whole-weight gathers, because ZeRO's flat partitions may cut a row anywhere. A collective: every rank calls it."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    for weight, dim in hypersphere_weights(model):
        master = safe_get_full_fp32_param(weight)
        if master is None:  # stage 0 in fp32: the torch optimizer stepped the model's weight itself
            weight.copy_(l2_normalize(weight, dim))
            continue
        unit = l2_normalize(master.view(getattr(weight, "ds_shape", weight.shape)), dim)
        safe_set_full_fp32_param(weight, unit)
        partitioned = hasattr(weight, "ds_id")  # ZeRO-3: gather, overwrite, and re-partition from rank 0's copy
        with GatheredParameters([weight], modifier_rank=0) if partitioned else contextlib.nullcontext():
            weight.copy_(unit)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a DeepSpeed checkpoint directory, on the CPU, without a process group
    (ZeRO-1/2/3 through DeepSpeed's zero_to_fp32; stage 0 holds the whole model in one file)."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if any(checkpoint.glob("*optim_states.pt")) and any(checkpoint.glob("zero_pp_rank_*")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        state = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in state.items()}
