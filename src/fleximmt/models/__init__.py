"""Base models, one adapter module each: ``cogvideox`` (CogVideoX 5B-I2V and 1.5), ``wan`` (Wan 2.1 / 2.2
image-to-video), ``hunyuan15`` (HunyuanVideo 1.5 image-to-video) and ``ltx2`` (LTX-2 image-to-video). A family is registered by one line
below; everything else that names the families - ``SUPPORTED``, ``REGISTRY``, ``fleximmt``'s exports, the
command line's help, ComfyUI's model list - is derived from the registrations."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

from ..errors import FlexiMMTInputError
from ..method.adapter import FAMILIES, Family, ModelAdapter, TokenGrid, family_name, register_family

# name, family (in motion files), module, FlexiMMT pipeline, diffusers pipelines (Wan 2.2 TI2V-5B ships as a
# WanPipeline, Lightricks/LTX-2 as an LTX2Pipeline; they animate images too)
register_family(Family("CogVideoX", "cogvideox", "cogvideox", "FlexiMMTPipeline", ("CogVideoXImageToVideoPipeline",)))
register_family(Family("Wan", "wan", "wan", "FlexiMMTWanPipeline", ("WanImageToVideoPipeline", "WanPipeline")))
register_family(
    Family(
        "HunyuanVideo 1.5",
        "hunyuanvideo15",
        "hunyuan15",
        "FlexiMMTHunyuanVideo15Pipeline",
        ("HunyuanVideo15ImageToVideoPipeline",),
    )
)
register_family(
    Family("LTX-2", "ltx2", "ltx2", "FlexiMMTLTX2ImageToVideoPipeline", ("LTX2ImageToVideoPipeline", "LTX2Pipeline"))
)


def listing(names: list[str]) -> str:
    """``["a", "b", "c"]`` as "a, b or c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# a pipeline class name (diffusers' or FlexiMMT's, as model_index.json names it) -> (module, FlexiMMT pipeline class)
REGISTRY: dict[str, tuple[str, str]] = {
    name: (f.module, f.pipeline) for f in FAMILIES.values() for name in (*f.diffusers, f.pipeline)
}
SUPPORTED = listing([f.name for f in FAMILIES.values()])  # how messages name the registered families


def pipeline_class(name: str) -> type:
    """The FlexiMMT pipeline class for a pipeline class name (diffusers' or FlexiMMT's)."""
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of a registered family (``family``: what motion files record), its module imported."""
    return pipeline_class(FAMILIES[family].pipeline).adapter_class


def adapters() -> Iterator[type[ModelAdapter]]:
    """Every registered adapter class, in the order of registration, imported as it is reached: finding
    CogVideoX's does not import Wan's module."""
    for family in FAMILIES.values():
        yield pipeline_class(family.pipeline).adapter_class


def default_model() -> str:
    """The checkpoint loaded when none is named (the command line's ``--model``): the first registered
    family's ``default_model``."""
    return next(adapters()).default_model


def family_defaults(setting: str) -> str:
    """What each registered family's default model does for ``setting`` when a call leaves it out
    (``ModelAdapter.documented_defaults``), as help texts say it: "49 for CogVideoX, 81 for Wan, ...".
    Imports every family."""
    found = (
        (family.name, cls.documented_defaults().get(setting)) for family, cls in zip(FAMILIES.values(), adapters())
    )
    return ", ".join(f"{value} for {name}" for name, value in found if value is not None)


def adapter_for(pipe) -> ModelAdapter:
    """The adapter of a FlexiMMT pipeline or of a diffusers pipeline of a supported family."""
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
    hand the state their block as a tensor inside it: ``method.tokens.BlockProcessor``), so a model of
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
    "FAMILIES",
    "REGISTRY",
    "SUPPORTED",
    "Family",
    "ModelAdapter",
    "TokenGrid",
    "adapter_class",
    "adapter_for",
    "adapters",
    "compile",
    "default_model",
    "family_defaults",
    "family_name",
    "listing",
    "pipeline_class",
    "register_family",
]
