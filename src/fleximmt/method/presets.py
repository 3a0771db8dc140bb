"""Presets: one name that sets a group of options, each only where the caller left it out
(docs/method.md#the-release-preset). The values live beside the options they set:
``pipeline.RELEASE_OPTIONS`` for a transfer, ``training.train.RELEASE_SETTINGS`` for training."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ..errors import FlexiMMTInputError

PRESETS = ("release",)  # "release": the authors' released code, inference and training


def fill_preset(options: Any, preset: str | None, values: Mapping[str, Any], given: Collection[str]) -> None:
    """Set each of ``values`` on ``options`` unless its name is in ``given`` (what the caller passed
    explicitly: an explicit option wins). ``preset`` None sets nothing."""
    if preset is None:
        return
    if preset not in PRESETS:
        raise FlexiMMTInputError(f"preset={preset!r}: choose from {list(PRESETS)} or leave it out (None)")
    for name, value in values.items():
        if name not in given:
            setattr(options, name, value)
