"""Fused Triton kernels, and the one rule for when the model uses them (`model.kernels`: triton | torch | auto).

The Triton code lives in `kernels.triton_norm` and is imported only when a kernel first runs, so that importing the
model never needs Triton and TRITON_INTERPRET (read by Triton when a kernel is defined) can still be set before.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (how the tests run them without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_problem(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on a `device_type` device, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'normtron[kernels]')"
    if device_type != "cuda" and not interpreting():
        return (f"Triton kernels need a CUDA GPU and this run is on {device_type} (TRITON_INTERPRET=1 runs them in "
                f"Triton's slow CPU interpreter, meant for tests)")
    return None


def use_triton(choice: str, device: torch.device) -> bool:
    """Whether norms on `device` run the Triton kernels: always for 'triton', on CUDA GPUs (when Triton is installed)
    for 'auto', never for 'torch'."""
    if choice == "triton":
        return True
    return choice == "auto" and device.type == "cuda" and triton_problem("cuda") is None


def describe_kernels(choice: str, device: torch.device) -> str:
    """One line for the start of a run: which kernels the norms use and why."""
    used = "triton" if use_triton(choice, device) else "torch"
    interpreted = " (Triton interpreter)" if used == "triton" and interpreting() else ""
    return f"norm kernels {used}{interpreted}" + (f" (auto on {device.type})" if choice == "auto" else "")
