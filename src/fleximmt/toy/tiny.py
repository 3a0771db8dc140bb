"""Tiny random-weight models of every family, for the test suite, the demo and the toy model's trainer: each
family's builders and contract rows live in its own module, ``tiny_<module>`` beside ``models/<module>.py``;
this one gives CogVideoX's and Wan's builders under the names tests and apps import, and random motion tokens
for any family.
"""

from __future__ import annotations

import torch

from ..method.motion import MotionTokens
from .tiny_cogvideox import tiny_components, tiny_pipeline
from .tiny_wan import WAN_VERSIONS, tiny_wan_components, tiny_wan_pipeline
from .vocabulary import WORDS, tiny_tokenizer

__all__ = [
    "WAN_VERSIONS",
    "WORDS",
    "family_of",
    "random_motion",
    "tiny_components",
    "tiny_pipeline",
    "tiny_tokenizer",
    "tiny_wan_components",
    "tiny_wan_pipeline",
]


def random_motion(
    transformer, tokens_per_motion: int = 4, seed: int = 0, scale: float = 1.0, experts: int = 1, **metadata
) -> MotionTokens:
    """Random motion tokens shaped for ``transformer`` (kaiming-uniform-like spread, seeded), one set per expert."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    gen = torch.Generator().manual_seed(seed)
    bound = scale * (3.0 / dim) ** 0.5
    sets = [(torch.rand(cfg.num_layers, tokens_per_motion, dim, generator=gen) * 2 - 1) * bound for _ in range(experts)]
    if "family" not in metadata:
        metadata["family"] = family_of(transformer)
    return MotionTokens(sets, **metadata)


def family_of(transformer) -> str:
    """The registered family whose pipeline takes ``transformer`` (its ``transformer`` argument's type)."""
    import inspect
    import typing

    from ..models import adapters

    for adapter_cls in adapters():
        init = adapter_cls.pipeline_class.__init__
        try:
            hint = typing.get_type_hints(init).get("transformer")
        except Exception:  # an annotation that does not resolve here: read it as written
            hint = inspect.signature(init).parameters["transformer"].annotation
        if any(isinstance(kind, type) and isinstance(transformer, kind) for kind in typing.get_args(hint) or (hint,)):
            return adapter_cls.family
    raise ValueError(f"{type(transformer).__name__} is the denoiser of no registered family (fleximmt.models.REGISTRY)")
