"""fleximmt: multi-object multi-motion transfer (FlexiMMT) for diffusers' CogVideoX image-to-video."""

from .errors import FlexiMMTInputError
from .motion import MotionTokens, ObjectMotion
from .pipeline import FlexiMMTPipeline, FlexiMMTPipelineOutput
from .train import TrainSettings, train_motion

__all__ = ["FlexiMMTInputError", "FlexiMMTPipeline", "FlexiMMTPipelineOutput", "MotionTokens", "ObjectMotion", "TrainSettings", "train_motion"]
__version__ = "0.1.0"
