"""Shared test set-up: never reach the Hugging Face Hub; one tiny random-weight pipeline per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def tiny_pipe():
    """``fleximmt.toy.tiny_pipeline(0)``: 32 x 32 images, 9 frames, 16 text tokens, random weights.
    Shared by the whole session: read it, do not change its settings."""
    from fleximmt.toy import tiny_pipeline

    return tiny_pipeline(0)
