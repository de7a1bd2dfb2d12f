"""Decoder-only transformer models in plain PyTorch (no knowledge of meshes or devices)."""

from models.config import ModelConfig
from models.placement import PLACEMENTS, NormWiring, layer_wiring
from models.transformer import Transformer, count_parameters, flops_per_token

__all__ = ["ModelConfig", "PLACEMENTS", "NormWiring", "layer_wiring", "Transformer", "count_parameters",
           "flops_per_token"]
