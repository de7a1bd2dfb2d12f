"""training.optimizer=muon: Muon for the hidden matrices (the attention and MLP projections inside the blocks), AdamW
for everything else (embeddings, output head, norms, biases), as one torch optimizer.

Muon (K. Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) as torch.optim.Muon computes it, whose
Newton-Schulz iteration and learning-rate adjustment are called here: momentum buffer B <- mu*B + (1-mu)*G, the
Nesterov update G + mu*(B - G) (lerp), five quintic Newton-Schulz steps with coefficients (3.4445, -4.7750, 2.0315)
in bf16, decoupled weight decay W <- W*(1 - lr*wd), then W <- W - lr'*O with lr' = lr*sqrt(max(1, A/B)) ("original")
or lr' = 0.2*lr*sqrt(max(A, B)) ("match_rms_adamw": "Muon is Scalable for LLM Training", Moonshot 2025, Sec. 2.2
eq. 4, matching AdamW's update RMS so that the AdamW lr and weight decay carry over).

The elementwise steps run on each rank's shards; Newton-Schulz needs the whole matrix: sharded matrices (FSDP2, TP)
are orthogonalized once each, by one owner rank (parallel/muon.py). Replicated parameters (one process, DDP,
DeepSpeed ZeRO-0) are orthogonalized by every rank, as torch.optim.Muon does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from normtron.parallel.muon import ShardedMatrixMap, is_sharded
from normtron.trainer.config import TrainingConfig

try:  # torch.optim.Muon since torch 2.9 (config validation refuses optimizer=muon without it)
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr, _zeropower_via_newtonschulz
except ImportError:
    DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS = 3.4445, -4.7750, 2.0315, 1e-7


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (wrappers keep the `layers.` prefix of the parameter names)."""
    return param.ndim == 2 and name.startswith("layers.")


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over both kinds of param groups (those with group["muon"] True step with Muon), so that the
    schedule, clipping, DCP checkpoints (state keyed by parameter name) and resumes treat it like plain AdamW. The
    AdamW groups are stepped by a torch.optim.AdamW that shares this optimizer's groups and state."""

    def __init__(self, groups: list[dict]):
        adamw_groups = [g for g in groups if not g["muon"]]
        self.adamw = torch.optim.AdamW(adamw_groups or [{"params": []}])  # fills AdamW's defaults into its groups
        super().__init__(adamw_groups + [g for g in groups if g["muon"]], defaults={})
        self._link()
        self.sharded_map: ShardedMatrixMap | None = None
        self.newton_schulz_calls = 0  # matrices this rank orthogonalized in the last step

    def _link(self) -> None:
        self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon_step()
        self.adamw.step()
        return loss

    def muon_step(self) -> None:
        entries = []  # (group, param, Nesterov update on this rank's shard)
        for group in self.param_groups:
            if not group["muon"]:
                continue
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None and not is_sharded(p):
                    continue  # as torch.optim.Muon; a sharded matrix's owner still needs this rank's (zero) shard
                grad = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
                state = self.state[p]
                if "momentum_buffer" not in state:  # a DTensor like the parameter: DCP reshards it
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - momentum)
                entries.append((group, p, grad.lerp(buf, momentum) if group["nesterov"] else buf))
        orthogonalized = self.orthogonalize(entries)
        for (group, p, _), update in zip(entries, orthogonalized):
            lr = group["lr"]
            adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)  # the whole matrix's shape
            weight = local(p)
            weight.mul_(1 - lr * group["weight_decay"])
            weight.add_(update.to(weight.device), alpha=-adjusted_lr)

    def orthogonalize(self, entries: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Newton-Schulz of each update: on this rank for whole matrices, by the owner rank for sharded ones."""
        newton_schulz = [partial(zeropower, ns_coefficients=tuple(g["ns_coefficients"]), ns_steps=g["ns_steps"],
                                 eps=g["eps"], dtype=g["ns_dtype"]) for g, _, _ in entries]
        sharded = [i for i, (_, p, _) in enumerate(entries) if is_sharded(p)]
        out: list[torch.Tensor | None] = [None] * len(entries)
        calls = 0
        for i, (_, p, update) in enumerate(entries):
            if i not in sharded:
                out[i] = newton_schulz[i](update)
                calls += 1
        if sharded:
            if self.sharded_map is None:  # the same matrices every step: plan once
                self.sharded_map = ShardedMatrixMap([entries[i][1] for i in sharded])
            before = self.sharded_map.calls
            wire = torch.float32 if any(entries[i][0]["ns_dtype"] == "fp32" for i in sharded) else torch.bfloat16
            results = self.sharded_map.apply([newton_schulz[i] for i in sharded], [entries[i][2] for i in sharded],
                                             wire)
            for i, result in zip(sharded, results):
                out[i] = result
            calls += self.sharded_map.calls - before
        self.newton_schulz_calls = calls
        return out


def zeropower(update: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
              dtype: str) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (bf16, its own function), or the same iteration in
    fp32 (muon_ns_dtype=fp32: slower, but free of bf16 rounding, e.g. for exact layout-parity checks)."""
    if dtype == "bf16":
        return _zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)
    a, b, c = ns_coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a*X + (b*A + c*A^2) X
    return x.T if tall else x


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def build_muon(model: nn.Module, cfg: TrainingConfig,
               lr_scale: Callable[[str, torch.Tensor], float] = lambda name, param: 1.0,
               no_decay_ids: set[int] = frozenset()) -> MuonWithAdamW:
    """Groups: AdamW "decay" (2-D weights outside the blocks but embeddings: the untied head) and "no_decay"
    (embeddings, norms, biases) first, so param_groups[0]["lr"] stays the logged AdamW lr; then Muon's hidden
    matrices, one group per lr multiplier (`lr_scale`, e.g. µP's) and per decay ("muon_no_decay": the weights in
    `no_decay_ids`, e.g. nGPT's renormalized ones)."""
    no_decay_ids = set(no_decay_ids) | {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    adamw = {"decay": [], "no_decay": []}
    muon: dict[tuple[float, str], list] = {}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if is_hidden_matrix(name, param):
            kind = "muon_no_decay" if id(param) in no_decay_ids else "muon"
            muon.setdefault((lr_scale(name, param), kind), []).append(param)
        else:
            adamw["no_decay" if param.ndim < 2 or id(param) in no_decay_ids else "decay"].append(param)
    groups = [{"params": params, "name": kind, "muon": False, "lr": cfg.lr, "lr_scale": 1.0}
              for kind, params in adamw.items() if params]  # DCP rejects empty groups (nGPT decays nothing)
    base = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
    groups += [{"params": params, "name": kind, "muon": True, "lr": base * scale,
                "lr_scale": base * scale / cfg.lr, "muon_lr_scale": scale} for (scale, kind), params in muon.items()]
    return MuonWithAdamW([{**DEFAULTS, **g} if g["muon"] else g for g in groups])  # hyperparameters: trainer/optim.py


DEFAULTS = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C),
            "eps": EPS, "adjust_lr_fn": "original", "weight_decay": 0.0, "ns_dtype": "bf16"}


def apply_muon_hyperparameters(group: dict, cfg: TrainingConfig) -> None:
    """Muon's keys of a Muon param group from the config (also after a resume: the config wins)."""
    base = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
    group.update(momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                 ns_dtype=cfg.muon_ns_dtype,
                 ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), eps=EPS, adjust_lr_fn=cfg.muon_adjust_lr_fn,
                 weight_decay=0.0 if group["name"] == "muon_no_decay" else
                 cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay,
                 lr_scale=base * group.get("muon_lr_scale", 1.0) / cfg.lr)
