"""FP8 training through torchao: swap the model's linear layers for `Float8Linear` before parallelizing.

A converted linear casts its input, weight and output gradient to float8 (e4m3 forward, e5m2 gradients) with
dynamic scales and multiplies them with `torch._scaled_mm`; everything else (norms, attention, embeddings, the
output head, the loss) computes in bf16 or fp32 as under `training.precision=bf16`. The parameters stay ordinary
fp32 master weights with unchanged names, so checkpoints do not depend on the compute precision.

Recipes (torchao's names): `tensorwise` (one scale per tensor; the fastest, and the only one whose FSDP2
all-gather can send float8), `rowwise` (a scale per row: more accurate with outliers), `rowwise_with_gw_hp`
(rowwise, with the weight gradient in high precision).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import warnings

import torch
from torch import nn
from torch.distributed.tensor import DTensor

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
KEEP_HIGH_PRECISION = ("output",)  # the head feeds the loss directly: its rounding would show in every token


def float8_problem(device: torch.device, emulate: bool) -> str | None:
    """Why FP8 matmuls cannot run on `device` (None when they can). CUDA needs compute capability 8.9+ (Ada,
    Hopper) unless `emulate`; CPUs run torch._scaled_mm natively."""
    if device.type != "cuda" or emulate:
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no "
                f"FP8 matmuls (8.9+ needed: Ada, Hopper)")
    return None


def uses_float8_all_gather(precision: str, recipe: str, backend: str, dp_shard: int) -> bool:
    """Whether FSDP2 all-gathers the FP8 weights as float8 (half of bf16's traffic): it needs sharding and one
    scale per tensor, i.e. the tensorwise recipe."""
    return precision == "fp8" and recipe == "tensorwise" and backend == "fsdp" and dp_shard > 1


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Which linears compute in FP8: not the head, and only dimensions that are multiples of 16 (the float8
    kernels' alignment). Embeddings are not linears and are never converted."""
    return (isinstance(module, nn.Linear) and fqn not in KEEP_HIGH_PRECISION
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def float8_plan(model: nn.Module) -> tuple[list[str], list[str]]:
    """(linears that will compute in FP8, linears kept in high precision), by name."""
    linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ([fqn for fqn, m in linears if float8_eligible(m, fqn)],
            [fqn for fqn, m in linears if not float8_eligible(m, fqn)])


def describe_float8(model: nn.Module, recipe: str, emulate: bool) -> str:
    """One line for the startup log: the recipe and which linears compute in FP8."""
    converted, kept = float8_plan(model)
    return (f"fp8 {recipe}{' (emulated)' if emulate else ''}: {len(converted)} of {len(converted) + len(kept)} "
            f"linears in fp8, high precision: {', '.join(kept) or 'none'}")


def apply_float8(model: nn.Module, recipe: str, *, emulate: bool, fsdp_float8_all_gather: bool) -> list[str]:
    """Convert the eligible linears of the (meta-device) model to torchao's `Float8Linear` in place; returns their
    names. `fsdp_float8_all_gather` (tensorwise only) makes FSDP2 gather the weights as float8, scaled once per
    step by `precompute_float8_scales`."""
    float8 = import_torchao_float8()
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                                 enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
    # Float8Linear returns a reshaped (view) output, which FSDP2 warns about in case a caller modifies it in place;
    # the model never does (every residual add is out of place).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    float8.convert_to_float8_training(model, module_filter_fn=float8_eligible, config=config)
    converted = [fqn for fqn, m in model.named_modules() if is_float8_linear(m)]
    for fqn in converted:
        linear = model.get_submodule(fqn)
        linear.register_forward_pre_hook(_cast_input_to_autocast_dtype)
        if fsdp_float8_all_gather:
            linear.register_state_dict_post_hook(_plain_weight)
    return converted


def import_torchao(module: str = "torchao"):
    """A torchao module, imported without the warnings torchao logs on import where its CUDA kernels cannot load
    (CPU builds of torch: "Failed to load ..._C_mxfp8...") and torch's pytree deprecation notice about torchao's
    enums: neither concerns the float8 training used here. torchao logs them once, on its first import."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def import_torchao_float8():
    return import_torchao("torchao.float8")


def preload_torchao() -> None:
    """transformers' model classes import its torchao quantizer, and so torchao, when torchao is installed (and
    lm-eval imports those classes): import them first, here, with torchao's import-time warnings silenced."""
    if importlib.util.find_spec("torchao") is not None and importlib.util.find_spec("transformers") is not None:
        import_torchao("transformers.quantizers.quantizer_torchao")


def is_float8_linear(module: nn.Module) -> bool:
    return isinstance(module, import_torchao_float8().float8_linear.Float8Linear)


def _cast_input_to_autocast_dtype(module: nn.Module, args: tuple) -> tuple | None:
    # Float8Linear reads only the CUDA autocast state; elsewhere (CPU autocast) its input would stay fp32 and the
    # high-precision weight-gradient matmul would mix fp32 and bf16. Cast as autocast would for a plain Linear.
    x = args[0]
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return (x.to(torch.get_autocast_dtype(x.device.type)), *args[1:])
    return None


def _plain_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # For the float8 all-gather, torchao wraps the weight in a tensor subclass that would be pickled into the
    # checkpoint (loadable only with torchao, and not with weights_only). Save the same storage as a plain tensor.
    weight = state_dict.get(prefix + "weight")
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    inner = getattr(local, "_tensor", None)
    if inner is None or type(local) is torch.Tensor:
        return
    state_dict[prefix + "weight"] = (DTensor.from_local(inner, weight.device_mesh, weight.placements, run_check=False,
                                                        shape=weight.shape, stride=weight.stride())
                                     if isinstance(weight, DTensor) else inner)


def precompute_float8_scales(model: nn.Module) -> None:
    """After each optimizer step under FSDP2's float8 all-gather: every weight's scale in one all-reduce, instead
    of one per weight in the next forward."""
    import_torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)
