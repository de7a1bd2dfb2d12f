"""The Hugging Face wrapper of the normtron Transformer, for placements that LlamaForCausalLM cannot express.

`codegen.py` writes it into a converted folder as `modeling_normtron.py`, preceded by the source of models/ (norms,
placement, config, transformer), with the `models.*` imports removed: the folder then loads with
`trust_remote_code=True` and never imports normtron. Parameter names are the training checkpoint's own
(`model.layers.0.attention.q_proj.weight`), since the Transformer sits at `self.model`.

Generation keeps a KV cache (transformers' Cache API: `cache`, called `past_key_values` before transformers 5.2x; a
DynamicCache unless the caller passes another): the Transformer's `cache` argument takes any object with the Cache's `update`/`get_seq_length`, so each
step runs only the new tokens, for every placement.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer, rope_table
from normtron.trainer.convert.hf.remote_config import NormtronConfig


_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def model_config_from(config: NormtronConfig) -> ModelConfig:
    """The normtron ModelConfig stored in a NormtronConfig (keys missing from it keep their defaults)."""
    values = config.to_dict()
    return ModelConfig(**{f.name: values[f.name] for f in dataclasses.fields(ModelConfig) if f.name in values})


class NormtronForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NormtronConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["TransformerBlock"]
    # Tied only when config.tie_word_embeddings is true (Hugging Face checks it).
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: NormtronConfig):
        super().__init__(config)
        self.model = Transformer(model_config_from(config))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.output = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only what loading leaves unset: the RoPE table (a derived buffer, never saved), and weights of a model
        built from a config alone."""
        cfg = self.model.cfg if hasattr(self, "model") else model_config_from(self.config)
        if isinstance(module, Transformer):
            module.rope = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=module.rope.device)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
        elif hasattr(module, "reset_parameters") and not isinstance(module, PreTrainedModel):
            module.reset_parameters()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("NormtronForCausalLM has no padding support: pass unpadded sequences of equal length")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        logits = self.model(input_ids, cache=cache if use_cache or cache is not None else None)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.model.cfg.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
