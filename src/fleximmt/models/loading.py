"""Loading a base model: the right FlexiMMT pipeline for a checkpoint, safetensors only."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import FlexiMMTInputError
from ..method.pipeline import check_safetensors  # noqa: F401 (loading's API: the check every loader runs)


def pipeline_name(path: str | os.PathLike) -> str:
    """The diffusers pipeline class a checkpoint names in its ``model_index.json`` (a local folder
    or a hub id already in the cache; no download)."""
    local = Path(path) / "model_index.json"
    if local.is_file():
        index = local
    else:
        from huggingface_hub import hf_hub_download

        try:  # from the cache, or the hub when it can be reached (HF_HUB_OFFLINE=1: the cache only)
            index = Path(hf_hub_download(str(path), "model_index.json"))
        except Exception as err:
            raise FlexiMMTInputError(
                f"no model_index.json for {str(path)!r} ({type(err).__name__}): give a local folder of a diffusers "
                "image-to-video pipeline, or a hub id that can be downloaded (huggingface-cli download ...)"
            ) from None
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise FlexiMMTInputError(f"{str(index)!r} is not a diffusers model_index.json ({err})") from None


def load_pipeline(path: str | os.PathLike, **kwargs: Any):
    """Load a checkpoint into the FlexiMMT pipeline of its family, chosen from its ``model_index.json``
    (``CogVideoXImageToVideoPipeline`` -> ``FlexiMMTPipeline``, ``WanImageToVideoPipeline`` ->
    ``FlexiMMTWanPipeline``); keyword arguments go to ``from_pretrained``."""
    from . import REGISTRY, pipeline_class

    name = pipeline_name(path)
    if name not in REGISTRY:
        supported = sorted(n for n in REGISTRY if not n.startswith("FlexiMMT"))
        raise FlexiMMTInputError(f"{str(path)!r} is a {name}; fleximmt runs on {supported}")
    cls = pipeline_class(name)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones only know it
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return cls.from_pretrained(str(path), **kwargs)
