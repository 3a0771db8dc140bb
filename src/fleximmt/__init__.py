"""fleximmt: multi-object multi-motion transfer (FlexiMMT) for diffusers' image-to-video models."""

from .errors import FlexiMMTInputError
from .method.motion import MotionTokens, ObjectMotion
from .method.pipeline import FlexiMMTPipelineOutput
from .models import compile
from .models.cogvideox import FlexiMMTPipeline
from .models.loading import load_pipeline
from .training.train import TrainSettings, train_motion

__all__ = ["FlexiMMTInputError", "FlexiMMTPipeline", "FlexiMMTPipelineOutput", "FlexiMMTWanPipeline", "MotionTokens",
           "ObjectMotion", "TrainSettings", "compile", "load_pipeline", "train_motion"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "FlexiMMTWanPipeline":  # imported on first use: diffusers' Wan module pulls in CLIP's processors
        from .models.wan import FlexiMMTWanPipeline

        return FlexiMMTWanPipeline
    raise AttributeError(f"module 'fleximmt' has no attribute {name!r}")
