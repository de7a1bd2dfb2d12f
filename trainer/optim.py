"""AdamW with decoupled weight decay on matrices only (or Muon with AdamW, trainer/muon.py), and the learning-rate
schedules. A param group's peak lr is training.lr * group["lr_scale"] (1 where absent) and the schedule keeps that
ratio."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from models.hypersphere import hypersphere_weights
from trainer.config import TrainingConfig
from trainer.muon import apply_muon_hyperparameters, build_muon


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Weight decay on 2-D weights except embeddings; none on norms, biases or embeddings, nor on nGPT's weights,
    which are renormalized after every step instead (nGPT Sec. 2.6: no weight decay). training.optimizer=muon:
    trainer/muon.py (Muon for the blocks' matrices, this AdamW for the rest)."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    no_decay_ids |= {id(weight) for weight, _ in hypersphere_weights(model)}
    if cfg.optimizer == "muon":
        optimizer = build_muon(model, cfg, no_decay_ids=no_decay_ids)
        apply_hyperparameters(optimizer, cfg)
        return optimizer
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay"}]
    groups = [group for group in groups if group["params"]]  # nGPT has nothing to decay; DCP rejects empty groups
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
