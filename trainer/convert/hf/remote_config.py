"""The configuration class of converted non-Llama models; written verbatim as `configuration_normtron.py`.

Every `model.*` key of the training config is stored under its own name in config.json; the standard Hugging Face
names (hidden_size, num_hidden_layers, ...) are aliases so generic tools can read the sizes."""

from typing import ClassVar

from transformers import PreTrainedConfig


class NormtronConfig(PreTrainedConfig):
    model_type = "normtron"
    attribute_map: ClassVar[dict[str, str]] = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len", "intermediate_size": "ffn_hidden_dim"}
