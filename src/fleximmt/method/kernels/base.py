"""The registry of FlexiMMT's mask kernels, as diffusers registers its attention backends
(``models/attention_dispatch.py``): each kernel is registered once, by name, with the layouts it builds
for the two attention forms - each layout holds the kernel's masks and attends with them - and its
constraints, checked in one place (:func:`check`). The kernels (``grouped.py`` "auto", ``dense.py``,
``flex.py``) register themselves; ``fleximmt.method.kernels`` imports them.

Every kernel computes MDMA of one video exactly (docs/method.md#mdma); they differ in how. A layout is
built from an :class:`Mdma` once per denoising step (or per block, DMEM's), and offers:

- joint form: ``attend(query, key, value, m_q, m_k, m_v, text_len, attention)`` over ``[text | video]``
  tokens (diffusers' order) and ``attend_video_first(query, keys, values, text_len, attention)`` over
  ``[video | text | motion]`` tokens; both return the video and text queries' outputs;
- cross form: ``attend(query, key, value, m_k, m_v, attention)``, video queries over ``[text | motion]``.

``attention`` is the model's attention over ``[B, H, N, d]`` tensors (:func:`sdpa` by default, diffusers'
dispatcher or ComfyUI's attention in the adapters), taking a mask only in the calls that need one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ...errors import FlexiMMTInputError

logger = logging.getLogger(__name__)

Attention = Callable[..., torch.Tensor]  # (query, key, value, mask=None) -> out, all [B, H, N, d]


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's SDPA over ``[B, H, N, d]``: the default ``attention`` of every layout. An adapter passes its
    own, taking the same arguments; ``mask`` (bool, or SDPA's additive float mask) only where one is needed."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


class Mdma(NamedTuple):
    """MDMA of one video, what every kernel's layout is built from (docs/method.md#mdma)."""

    member: torch.Tensor  # bool [K, L_y]: Y_mo^k, each object's motion words among the text keys
    tokens_per_motion: int  # d_m
    video_masks: torch.Tensor  # bool [K, N_v]: V^k
    parts: frozenset[str]  # the MDMA parts on
    context_text: str = "open"
    text_valid: torch.Tensor | None = None  # bool [L_y]: the text keys that are not padding (None: all)


# A constraint: (kernel name, the attention's device, whether gradients will flow) -> raise when it cannot run
Constraint = Callable[[str, torch.device, bool], None]


@dataclass(frozen=True)
class MaskKernel:
    """One registered mask kernel: its name, the layout it builds for each attention form (a class taking
    ``(mdma, key_cache, pad_queries)``), its constraints, and how it runs inside a compiled graph."""

    name: str
    joint: Callable[..., Any]
    cross: Callable[..., Any]
    constraints: tuple[Constraint, ...] = ()
    # inside a torch.compile graph the state runs this kernel as opaque operators (method/opaque.py): its
    # group sizes change with the masks at every step, and traced each new size would compile again
    opaque_when_compiled: bool = False

    def layout(self, form: str, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False):
        """This kernel's layout of ``mdma`` for attention form ``form`` ("joint" or "cross"). ``key_cache``: a
        dict kept across layouts with the same words; ``pad_queries``: a layout built in every block (DMEM's)."""
        build = {"joint": self.joint, "cross": self.cross}[form]
        return build(mdma, key_cache, pad_queries)


_KERNELS: dict[str, MaskKernel] = {}


def register(kernel: MaskKernel) -> MaskKernel:
    """Register a mask kernel under its name (once)."""
    if kernel.name in _KERNELS:
        raise ValueError(f"the mask kernel {kernel.name!r} is registered twice")
    _KERNELS[kernel.name] = kernel
    return kernel


def kernel_names() -> tuple[str, ...]:
    """The registered kernels' names, in the order of registration."""
    return tuple(_KERNELS)


def mask_kernel(name: str) -> MaskKernel:
    """The kernel registered as ``name``; an unknown name is refused with the choices."""
    if name not in _KERNELS:
        raise FlexiMMTInputError(f"mask_kernel={name!r}: choose from {list(_KERNELS)}")
    return _KERNELS[name]


def check(kernel: MaskKernel, device: torch.device, grad: bool) -> None:
    """Raise where ``kernel`` cannot run: on ``device``, with gradients flowing (``grad``) or not. The one
    place a kernel's constraints are checked: before each attention (``FlexiMMTState``) and before training."""
    for constraint in kernel.constraints:
        constraint(kernel.name, torch.device(device), grad)
