"""Per-layer training diagnostics, recorded on diagnostic steps only (`diagnostics.every`, plus the first and the
last step, so a study can compare the profile at init with the one at the end).

    layer_grad_norm, attn_grad_norm, mlp_grad_norm   gradient norm of each block's parameters, of its attention
                                                     (q/k/v/o, QK-norms, inner norm and head gains where the
                                                     placement has them) and of its MLP (gate/up/down, inner norm)
    update_ratio                                     ||W_after - W_before|| / ||W_before|| of each block's step
    resid_rms, resid_var                             the residual stream at each block's output: sqrt(mean h^2),
                                                     and the variance over features averaged over tokens
    max_act, max_act_ratio                           max |h| at each block's output, and its ratio to the median
                                                     |h| (of the first sequence): massive activations
    max_attn_logit                                   max over sequences, heads and causal (q, k) pairs of
                                                     q.k/sqrt(d) (nGPT: of q, k before its normalization)
    attn_eigen_lr, mlp_eigen_lr                      nGPT only: the mean eigen learning rate |alpha| of each
                                                     block's attention and MLP update, after the step (its
                                                     resid_rms is 1 by construction)
                                                     q.k/sqrt(d)
    attn_dyt_alpha, mlp_dyt_alpha                    with model.norm=dyt, after the step: the 2-norm of the DyT
                                                     alphas of each block's attention side (its norms and QK-norms)
                                                     and MLP side; |alpha| itself with one DyT per side (Pre-LN)

Activations come from forward hooks registered for the first micro-batch of a diagnostic step and removed after
it, so other steps run the model untouched. Attention logits are hidden inside SDPA, so the hooks keep the
(QK-normed) queries and keys of the micro-batch and recompute their logits, a few heads at a time. Under data parallelism the activation
statistics are averaged over ranks (maxima: the max over ranks); sharded FSDP2 gradients and weights are reduced
over their shards, so every logged value is that of the whole layer. DeepSpeed partitions gradients and weights
inside its engine, so its runs get the activation statistics only (plus the global grad norm every run logs).
All activation statistics cover the first micro-batch of the step on each rank. The update ratio needs a copy of
the blocks' (local, sharded) weights across the optimizer step: one extra copy of them on diagnostic steps.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from normtron.models.transformer import apply_rope, plain_name
from normtron.trainer.engine import local_tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP or DeepSpeed wrapper (FSDP2 shards the Transformer in place)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def sum_of_squares(groups: list[list[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Per group, the sum of squares of all its tensors' elements. A sharded (DTensor) tensor contributes its local
    shard divided by the number of ranks that hold a replica of it, and the sums are all-reduced over every mesh
    dimension: each element is then counted once, however each tensor is placed (FSDP shards, tensor-parallel
    shards and replicated norm weights mixed)."""
    def local_sum(t: torch.Tensor) -> torch.Tensor:
        total = local_tensor(t).float().pow(2).sum()
        if isinstance(t, DTensor):
            total = total / math.prod(t.device_mesh.size(d) for d, p in enumerate(t.placements) if p.is_replicate())
        return total
    sums = torch.stack([sum((local_sum(t) for t in group), torch.zeros((), device=device)) for group in groups])
    sharded = next((t for group in groups for t in group if isinstance(t, DTensor)), None)
    if sharded is not None:
        for mesh_dim in range(sharded.device_mesh.ndim):
            dist.all_reduce(sums, group=sharded.device_mesh.get_group(mesh_dim))
    return sums


def max_causal_logit(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """max over sequences, heads and j <= i of q_i.k_j * scale (default 1/sqrt(head_dim); the attention's
    `softmax_scale`, e.g. µP's), as SDPA computes them (after RoPE; KV heads
    shared by consecutive query heads). q: (batch, seq, heads, head_dim), k: (batch, seq, kv_heads, head_dim).
    One sequence and a few heads at a time, so the score matrices stay small at long sequence lengths."""
    q, k = apply_rope(q.float(), rope), apply_rope(k.float(), rope)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    seq, heads = q.shape[1], q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    chunk = max(1, 2**24 // (seq * seq))  # heads per score block: at most 16M scores (64 MB)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    best = torch.tensor(float("-inf"), device=q.device)
    for b in range(q.shape[0]):
        for h in range(0, heads, chunk):
            scores = torch.einsum("qhd,khd->hqk", q[b, :, h:h + chunk], k[b, :, h:h + chunk]) * scale
            best = torch.maximum(best, scores.masked_fill(~causal, float("-inf")).amax())
    return best


class ActivationProbe:
    """Forward hooks for one forward pass: residual-stream statistics at each block output and the max attention
    logit of each block. Only the first call of each hook counts (activation checkpointing may re-run forward)."""

    def __init__(self, layers: nn.ModuleDict, n_layers: int, stages: int):
        self.layers, self.n_layers, self.stages = layers, n_layers, stages
        self.block_stats: dict[str, torch.Tensor] = {}   # [mean h^2, feature variance, median |h|]
        self.block_max: dict[str, torch.Tensor] = {}     # [max |h|, max attention logit]
        self.qk: dict[str, dict[str, torch.Tensor]] = {}
        self.handles: list = []

    def __enter__(self):
        # Compiled blocks (parallel.compile) run this forward eagerly, so that the hooks inside them fire.
        self.eager = torch.compiler.set_stance("force_eager")
        self.eager.__enter__()
        for name, block in self.layers.items():
            self.handles.append(block.register_forward_hook(self._block_hook(name)))
            attention = block.attention
            self.handles.append(attention.q_norm.register_forward_hook(self._keep(name, "q")))
            self.handles.append(attention.k_norm.register_forward_hook(self._keep(name, "k")))
            self.handles.append(attention.register_forward_hook(self._attention_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.eager.__exit__(*exc)

    def _keep(self, name: str, which: str):
        def hook(module, args, output):  # under tensor parallelism: this rank's heads (the max covers all ranks)
            self.qk.setdefault(name, {}).setdefault(which, local_tensor(output.detach()))
        return hook

    def _attention_hook(self, name: str):
        def hook(module, args, output):
            if name in self.qk and "logit" not in self.qk[name]:
                with torch.no_grad():
                    kept = self.qk[name]
                    kept["logit"] = max_causal_logit(kept.pop("q"), kept.pop("k"), args[1],
                                                     getattr(module, "softmax_scale", None))
        return hook

    def _block_hook(self, name: str):
        def hook(module, args, output):
            if name in self.block_stats:
                return
            with torch.no_grad():
                if isinstance(output, tuple):  # (branch output, skip) with the residual add left to the next norm
                    output = output[0] if output[1] is None else output[0] + output[1]
                h = output.detach().float()
                h = h.full_tensor() if isinstance(h, DTensor) else h  # the tensor-parallel stream, gathered
                magnitude = h.abs()
                self.block_stats[name] = torch.stack([h.pow(2).mean(), h.var(dim=-1, unbiased=False).mean(),
                                                      magnitude[0].median()])
                self.block_max[name] = magnitude.amax()
        return hook

    def collect(self) -> dict[str, list[float]]:
        """The per-layer values of all `n_layers` layers, averaged (maxima: max) over data-parallel ranks; every rank
        must call this. A pipeline stage fills in its own layers (zeros / -inf elsewhere), so summing over all
        ranks and dividing by the ranks that hold each layer (world size / stages) gives every layer's mean."""
        some = next(iter(self.block_stats.values()))
        stats = torch.zeros(self.n_layers, 3, device=some.device)
        maxima = torch.full((self.n_layers, 2), float("-inf"), device=some.device)
        for name in self.layers:
            stats[int(name)] = self.block_stats[name]
            maxima[int(name)] = torch.stack([self.block_max[name], self.qk[name]["logit"]])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
            stats /= dist.get_world_size() // self.stages
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        stats, maxima = stats.tolist(), maxima.tolist()
        return {"resid_rms": [math.sqrt(s[0]) for s in stats], "resid_var": [s[1] for s in stats],
                "max_act": [m[0] for m in maxima],
                "max_act_ratio": [m[0] / s[2] if s[2] > 0 else float("inf") for m, s in zip(maxima, stats)],
                "max_attn_logit": [m[1] for m in maxima]}


class Diagnostics:
    """What the train loop calls on a diagnostic step: `probe()` around the first micro-batch's forward,
    `before_step()` between the last backward and the optimizer step, `after_step()` for the finished row."""

    def __init__(self, model: nn.Module, every: int, total_steps: int, device: torch.device, gradients: bool,
                 n_layers: int | None = None, pp_group: dist.ProcessGroup | None = None):
        """`model` holds all `n_layers` layers, or (pipeline parallelism) this rank's stages of them, whose sums are
        then completed over `pp_group`."""
        self.model, self.every, self.total_steps, self.device = unwrap(model), every, total_steps, device
        self.gradients = gradients  # False under DeepSpeed: its gradients and weights are not per-parameter tensors
        self.n_layers, self.pp_group = n_layers or len(self.model.layers), pp_group
        named = {plain_name(n): p for n, p in self.model.named_parameters()}
        self.groups = {part: [[p for n, p in named.items() if n.startswith(f"layers.{i}.{prefix}")]
                              for i in range(self.n_layers)]
                       for part, prefix in (("layer", ""), ("attn", "attention."), ("mlp", "feed_forward."))}
        # DyT's scalar alphas, by side of the block (attention / attention_norms, feed_forward / ffn_norms).
        self.alphas = [[p for n, p in named.items() if n.startswith(f"layers.{i}.{side}") and n.endswith(".alpha")]
                       for side in ("attention", "f") for i in range(self.n_layers)]
        self.row: dict = {}
        self.before: list[list[torch.Tensor]] = []

    def due(self, step: int) -> bool:
        """Whether `step` (1-based, the step about to run) records diagnostics."""
        return self.every > 0 and (step == 1 or step % self.every == 0 or step == self.total_steps)

    def probe(self) -> ActivationProbe:
        self.row = {}
        self._probe = ActivationProbe(self.model.layers, self.n_layers,
                                      1 if self.pp_group is None else dist.get_world_size(self.pp_group))
        return self._probe

    @torch.no_grad()
    def before_step(self) -> None:
        self.row = self._probe.collect()
        if not self.gradients:
            return
        grads = [[p.grad for p in group if p.grad is not None] for part in ("layer", "attn", "mlp")
                 for group in self.groups[part]]
        norms = self.sum_of_squares(grads).sqrt().tolist()
        n = self.n_layers
        self.row.update(layer_grad_norm=norms[:n], attn_grad_norm=norms[n:2 * n], mlp_grad_norm=norms[2 * n:])
        self.before = [[p.detach().clone() for p in group] for group in self.groups["layer"]]

    @torch.no_grad()
    def after_step(self) -> dict:
        if self.gradients:
            deltas = [[p.detach() - old for p, old in zip(group, before)]
                      for group, before in zip(self.groups["layer"], self.before)]
            sums = self.sum_of_squares(deltas + self.before).sqrt().tolist()
            n = len(self.before)
            self.row["update_ratio"] = [d / w if w > 0 else float("nan") for d, w in zip(sums[:n], sums[n:])]
            self.before = []
            if any(self.alphas):  # the same on every pipeline stage: each holds layers, and each layer its DyTs
                alphas = self.sum_of_squares(self.alphas).sqrt().tolist()
                self.row.update(attn_dyt_alpha=alphas[:self.n_layers], mlp_dyt_alpha=alphas[self.n_layers:])
        self.row.update(self.eigen_learning_rates())
        row, self.row = self.row, {}
        return row

    def eigen_learning_rates(self) -> dict[str, list[float]]:
        """nGPT's per-layer mean |alpha_A| and |alpha_M| (empty for other placements)."""
        means = torch.zeros(2, self.n_layers, device=self.device)
        found = False
        for name, module in self.model.named_modules():
            parts = plain_name(name).split(".")  # layers.{i}.attention_norms.eigen_lr / layers.{i}.ffn_norms.eigen_lr
            if len(parts) == 4 and parts[0] == "layers" and parts[3] == "eigen_lr" and module is not None:
                value = module.value()
                value = value.full_tensor() if isinstance(value, DTensor) else value  # FSDP2 / TP shards
                means[int(parts[2] == "ffn_norms"), int(parts[1])] = value.float().mean()
                found = True
        if self.pp_group is not None:  # each layer lives on one stage: the others add zeros
            dist.all_reduce(means, group=self.pp_group)
            found = bool(means.any())
        if not found:
            return {}
        attn, mlp = means.tolist()
        return {"attn_eigen_lr": attn, "mlp_eigen_lr": mlp}

    def sum_of_squares(self, groups: list[list[torch.Tensor]]) -> torch.Tensor:
        sums = sum_of_squares(groups, self.device)
        if self.pp_group is not None:  # each layer lives on one stage: the other stages add zeros
            dist.all_reduce(sums, group=self.pp_group)
        return sums
