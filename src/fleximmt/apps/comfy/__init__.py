"""FlexiMMT in ComfyUI: the node pack (``comfyui/__init__.py`` in the repository is what ComfyUI loads
from ``custom_nodes/``; it re-exports the mappings below).

Two ways in, as ComfyUI users know them:

- **wrapper nodes** (``nodes.py``) around fleximmt's diffusers pipelines: load a model, learn a
  motion, transfer motions onto objects, preview masks;
- **native** (``native/``): *Apply FlexiMMT* patches ComfyUI's own MODEL of a family fleximmt knows
  (Wan 2.1 / 2.2, CogVideoX, HunyuanVideo 1.5; its loaders, LoRAs, fp8 weights) through ComfyUI's
  patch points, for any sampler.

``common.py`` holds the types and the *Object* node both use.
"""

from __future__ import annotations


def _mappings() -> tuple[dict, dict]:
    from . import common, native, nodes

    table = {**nodes.NODES, "FlexiMMTObject": (common.ObjectNode, "FlexiMMT Object"), **native.NODES}
    return {k: cls for k, (cls, _) in table.items()}, {k: name for k, (_, name) in table.items()}


def __getattr__(name: str):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        classes, names = _mappings()
        return classes if name == "NODE_CLASS_MAPPINGS" else names
    raise AttributeError(f"module 'fleximmt.apps.comfy' has no attribute {name!r}")
