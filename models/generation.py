"""Autoregressive decoding with the training model: a KV cache and the next-token choice (greedy, temperature, top-p).

The model itself only knows the `cache` argument of its forward (models.transformer.KVCache): attention appends
each layer's keys/values to it and attends over all of them, and the RoPE positions continue after what is cached.
So every placement, norm and parametrization decodes with exactly the modules it trains with.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    """Per layer, the keys and values of every position seen so far, (batch, kv_heads, seq, head_dim), grown by
    concatenation (the same contract as transformers' DynamicCache)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        cached = self.keys.get(layer_idx) if layer_idx is not None else next(iter(self.keys.values()), None)
        return 0 if cached is None else cached.shape[-2]


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) ids. Temperature 0: the argmax (greedy). Otherwise a sample from
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose probability reaches
    top_p (nucleus sampling, Holtzman et al. 2020, Sec. 3.1)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, eos_id: int | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """(batch, prompt_len) ids -> (batch, new) generated ids, stopping early when every row has produced `eos_id`.

    With the cache, the prompt runs once and then one token per step; without it (`use_cache=False`) each step
    recomputes the whole sequence, the reference the cache is tested against."""
    cache = KVCache() if use_cache else None
    tokens, step_input = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache)[:, -1] if use_cache else model(tokens)[:, -1]
        new = next_token(logits.float(), temperature, top_p, generator)
        if eos_id is not None:
            new = new.masked_fill(done, eos_id)  # finished rows keep emitting EOS
            done |= new == eos_id
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        step_input = new[:, None]
        if eos_id is not None and bool(done.all()):
            break
    return tokens[:, prompt.shape[1]:]
