"""FlexiMMT's mask kernels - "auto" (grouped SDPA, no N x N mask), "dense" (the reference), "flex" (one
FlexAttention call with a block mask) - each registered once with its layouts and constraints
(``base.py``, as diffusers registers its attention backends)."""

from . import grouped  # registered first: "auto", the default, is the options' first choice

# isort: split
from . import dense, flex  # noqa: F401 - each registers its kernel
from .base import Attention, MaskKernel, Mdma, check, kernel_names, mask_kernel, register, sdpa

MASK_KERNELS = kernel_names()  # the options' choices
DEFAULT_KERNEL = grouped.AUTO.name

__all__ = [
    "DEFAULT_KERNEL",
    "MASK_KERNELS",
    "Attention",
    "MaskKernel",
    "Mdma",
    "check",
    "kernel_names",
    "mask_kernel",
    "register",
    "sdpa",
]
