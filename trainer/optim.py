"""AdamW with decoupled weight decay on matrices only (or Muon with AdamW, trainer/muon.py), and the learning-rate
schedules.

Every param group carries an "lr_scale": its peak lr is training.lr * lr_scale and the schedule keeps that ratio
(µP's per-layer multipliers, models/mup.py; Muon's own lr; 1 under the standard parametrization)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from normtron.models import mup
from normtron.models.config import ModelConfig
from normtron.models.hypersphere import hypersphere_weights
from normtron.models.transformer import plain_name
from normtron.trainer.config import TrainingConfig
from normtron.trainer.muon import apply_muon_hyperparameters, build_muon


def build_optimizer(model: nn.Module, cfg: TrainingConfig, model_cfg: ModelConfig | None = None
                    ) -> torch.optim.Optimizer:
    """Weight decay on 2-D weights except embeddings; none on norms, biases or embeddings, nor on nGPT's weights,
    which are renormalized after every step instead (nGPT Sec. 2.6: no weight decay). Under µP (`model_cfg`) the
    parameters are further grouped by their lr multiplier. training.optimizer=muon: trainer/muon.py (Muon for the
    blocks' matrices, this AdamW for the rest)."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    no_decay_ids |= {id(weight) for weight, _ in hypersphere_weights(model)}
    if cfg.optimizer == "muon":
        def muon_lr_scale(name: str, param: torch.Tensor) -> float:
            return mup.lr_scale(model_cfg, plain_name(name), param.ndim, "muon") if model_cfg is not None else 1.0
        optimizer = build_muon(model, cfg, lr_scale=muon_lr_scale, no_decay_ids=no_decay_ids)
        apply_hyperparameters(optimizer, cfg)
        return optimizer
    by_group: dict[tuple[str, float], list] = {("decay", 1.0): [], ("no_decay", 1.0): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kind = "no_decay" if param.ndim < 2 or id(param) in no_decay_ids else "decay"
            scale = mup.lr_scale(model_cfg, plain_name(name), param.ndim) if model_cfg is not None else 1.0
            by_group.setdefault((kind, scale), []).append(param)
    # Unscaled groups first: param_groups[0]["lr"] is the logged (base) lr. No empty groups: DCP rejects them (nGPT
    # has nothing to decay, µP may have no unscaled matrix); every other model has both of the first two.
    groups = [{"params": params, "name": kind, "lr": cfg.lr * scale, "lr_scale": scale}
              for (kind, scale), params in by_group.items() if params]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    apply_hyperparameters(optimizer, cfg)
    return optimizer


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> None:
    """Set betas, eps and weight decay from the config; called again after a checkpoint is loaded, because the
    optimizer's saved param groups would otherwise bring back the values of the run that wrote it."""
    for group in optimizer.param_groups:
        if group.get("muon"):
            apply_muon_hyperparameters(group, cfg)
            continue
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay if group["name"] == "decay" else 0.0)


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of cfg.lr at 0-based `step`: linear warmup, then cosine / warmup-stable-decay / constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of training.
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
    return 1.0 - (1 - floor) * progress


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))


def apply_lr_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                      cfg: TrainingConfig) -> None:
    """After a checkpoint is loaded: the configured peak lr and schedule, at the restored step."""
    scheduler.base_lrs = [cfg.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lr_factor(scheduler.last_epoch, cfg)
