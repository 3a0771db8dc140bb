"""The toy world: tiny random models for tests, a miniature world of moving sprites, the small
CogVideoX-architecture model trained on it (``assets/toy-model``), its trainer, its lab and the demo.

Nothing of the method lives here; this folder only exercises it where no real model can run.
"""

from .tiny import random_motion, tiny_components, tiny_pipeline, tiny_tokenizer

__all__ = ["random_motion", "tiny_components", "tiny_pipeline", "tiny_tokenizer"]
