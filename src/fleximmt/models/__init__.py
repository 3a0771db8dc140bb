"""Base models, one adapter each: ``cogvideox`` (CogVideoX 5B-I2V and 1.5), ``wan`` (Wan 2.1 / 2.2
image-to-video), ``hunyuan15`` (HunyuanVideo 1.5 image-to-video) and ``ltx2`` (LTX-2 image-to-video). The registry below maps diffusers' pipeline names to them; a new model is one
adapter file and one line here."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

from ..method.adapter import ModelAdapter, TokenGrid

# diffusers pipeline class name (as model_index.json names it) -> (module, FlexiMMT pipeline class)
REGISTRY: dict[str, tuple[str, str]] = {
    "CogVideoXImageToVideoPipeline": ("cogvideox", "FlexiMMTPipeline"),
    "FlexiMMTPipeline": ("cogvideox", "FlexiMMTPipeline"),
    "WanImageToVideoPipeline": ("wan", "FlexiMMTWanPipeline"),
    "WanPipeline": ("wan", "FlexiMMTWanPipeline"),  # Wan 2.2 TI2V-5B ships as a WanPipeline; it animates images too
    "FlexiMMTWanPipeline": ("wan", "FlexiMMTWanPipeline"),
    "HunyuanVideo15ImageToVideoPipeline": ("hunyuan15", "FlexiMMTHunyuanVideo15Pipeline"),
    "FlexiMMTHunyuanVideo15Pipeline": ("hunyuan15", "FlexiMMTHunyuanVideo15Pipeline"),
    "LTX2ImageToVideoPipeline": ("ltx2", "FlexiMMTLTX2ImageToVideoPipeline"),
    "LTX2Pipeline": (
        "ltx2",
        "FlexiMMTLTX2ImageToVideoPipeline",
    ),  # Lightricks/LTX-2 ships as one; it animates images too
    "FlexiMMTLTX2ImageToVideoPipeline": ("ltx2", "FlexiMMTLTX2ImageToVideoPipeline"),
}
SUPPORTED = (
    "CogVideoX, Wan, HunyuanVideo 1.5 or LTX-2"  # how messages name the registered families, without importing them
)


def pipeline_class(name: str) -> type:
    """The FlexiMMT pipeline class for a diffusers pipeline class name."""
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def adapters() -> Iterator[type[ModelAdapter]]:
    """Every registered adapter class (each model module once), imported as it is reached: finding
    CogVideoX's does not import Wan's module."""
    for name in dict.fromkeys(module for module, _ in REGISTRY.values()):
        yield importlib.import_module(f"{__name__}.{name}").ADAPTER


def default_model() -> str:
    """The checkpoint loaded when none is named (the command line's ``--model``): the first registered
    family's ``default_model``."""
    return next(adapters()).default_model


def family_name(family: str) -> str:
    """How messages name a model family ("CogVideoX image-to-video")."""
    for adapter_cls in adapters():
        if adapter_cls.family == family:
            return adapter_cls.display_name
    return family


ModelAdapter.name_family = staticmethod(family_name)


def adapter_for(pipe) -> ModelAdapter:
    """The adapter of a FlexiMMT pipeline or of a diffusers pipeline of a supported family."""
    from ..errors import FlexiMMTInputError

    for adapter_cls in adapters():
        if isinstance(pipe, adapter_cls.pipeline_class):
            return adapter_cls(pipe)
    supported = sorted(n for n in REGISTRY if not n.startswith("FlexiMMT"))
    raise FlexiMMTInputError(f"{type(pipe).__name__} is not a pipeline fleximmt supports: use one of {supported}")


def compile(pipe, regional: bool = True, fullgraph: bool = True, **compile_kwargs) -> None:
    """``torch.compile`` a FlexiMMT pipeline's denoisers with FlexiMMT's processors in place: each
    transformer's repeated blocks (``regional``; FlexiMMT names CogVideoX's, which diffusers' model does
    not) or the whole model. The masks' shapes never reach the graph ("flex": one block mask; "auto": its
    groups run inside opaque operators, ``method/opaque.py``): once warm nothing compiles again, from step
    to step or call to call, whatever the masks. Regionally every block is the same graph (the processors
    hand the state their block as a tensor inside it: ``method.attention.BlockProcessor``), so a model of
    any number of blocks compiles once (``tests/test_compile.py``)."""
    adapter = adapter_for(pipe)
    adapter.install_processors()
    for transformer in adapter.transformers():
        if not regional:
            transformer.compile(fullgraph=fullgraph, **compile_kwargs)
            continue
        if adapter.repeated_blocks:
            transformer._repeated_blocks = list(adapter.repeated_blocks)
        transformer.compile_repeated_blocks(fullgraph=fullgraph, **compile_kwargs)


__all__ = [
    "REGISTRY",
    "SUPPORTED",
    "ModelAdapter",
    "TokenGrid",
    "adapter_for",
    "adapters",
    "compile",
    "default_model",
    "family_name",
    "pipeline_class",
]
