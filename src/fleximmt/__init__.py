"""fleximmt: multi-object multi-motion transfer (FlexiMMT) for diffusers' image-to-video models."""

from .errors import FlexiMMTInputError
from .method.motion import MotionTokens, ObjectMotion
from .method.pipeline import FlexiMMTPipelineOutput
from .models import compile
from .models.cogvideox import FlexiMMTPipeline
from .models.loading import load_pipeline
from .training.train import TrainSettings, train_motion

__all__ = [
    "FlexiMMTHunyuanVideo15Pipeline",
    "FlexiMMTInputError",
    "FlexiMMTLTX2ImageToVideoPipeline",
    "FlexiMMTPipeline",
    "FlexiMMTPipelineOutput",
    "FlexiMMTWanPipeline",
    "MotionTokens",
    "ObjectMotion",
    "TrainSettings",
    "compile",
    "load_pipeline",
    "train_motion",
]
LAZY = {
    "FlexiMMTWanPipeline": "wan",
    "FlexiMMTHunyuanVideo15Pipeline": "hunyuan15",
    "FlexiMMTLTX2ImageToVideoPipeline": "ltx2",
}  # the other families' pipelines
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in LAZY:  # imported on first use: diffusers' Wan and HunyuanVideo modules pull in image processors
        import importlib

        return getattr(importlib.import_module(f"{__name__}.models.{LAZY[name]}"), name)
    raise AttributeError(f"module 'fleximmt' has no attribute {name!r}")
