"""fleximmt: multi-object multi-motion transfer (FlexiMMT) for diffusers' image-to-video models."""

from .errors import FlexiMMTInputError
from .method.motion import MotionTokens, ObjectMotion
from .method.pipeline import FlexiMMTPipelineOutput
from .models import FAMILIES, compile
from .models.loading import load_pipeline
from .training.train import TrainSettings, train_motion

# every registered family's pipeline, imported on first use (diffusers' pipeline modules pull in image processors)
LAZY = {family.pipeline: family.module for family in FAMILIES.values()}
__all__ = [  # noqa: PLE0604 - the families' pipelines last, from their registrations
    "FlexiMMTInputError",
    "FlexiMMTPipelineOutput",
    "MotionTokens",
    "ObjectMotion",
    "TrainSettings",
    "compile",
    "load_pipeline",
    "train_motion",
    *LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.models.{LAZY[name]}"), name)
    raise AttributeError(f"module 'fleximmt' has no attribute {name!r}")
