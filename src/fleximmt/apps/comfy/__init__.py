"""FlexiMMT in ComfyUI: the node pack (``comfyui/`` in the repository is the folder ComfyUI loads from
``custom_nodes/``; its ``__init__.py`` hands ComfyUI :func:`comfy_entrypoint`).

Two ways in, as ComfyUI users know them:

- **wrapper nodes** (``nodes.py``) around fleximmt's diffusers pipelines: load a model, learn a
  motion, transfer motions onto objects, preview masks;
- **native** (``native/``): *FlexiMMT Apply* patches ComfyUI's own MODEL of a family fleximmt knows
  (Wan 2.1 / 2.2, CogVideoX, HunyuanVideo 1.5; its loaders, LoRAs, fp8 weights) through ComfyUI's
  patch points, for any sampler; *Learn motion (native)* (``learn.py``) learns a motion on that MODEL.

``common.py`` holds the types and the *Object* node both use; ``preview.py`` Transfer's latent
previews; ``validation.py`` the rule that a prompt with FlexiMMT nodes runs whole or not at all.
The nodes use ComfyUI's V3 schema (``comfy_api.latest``), loaded by ComfyUI 0.3.64 and 0.33 alike;
they import ComfyUI, so this module imports them only when ComfyUI asks for them.
"""

from __future__ import annotations


def node_list() -> list:
    """Every FlexiMMT node class, in the node library's order."""
    from . import common, learn, native, nodes

    return [*nodes.NODES[:3], common.ObjectNode, *nodes.NODES[3:], *native.NODES, *learn.NODES]


async def comfy_entrypoint():
    """ComfyUI's entry point for V3 node packs: the FlexiMMT extension. Loading it registers the
    whole-or-nothing rule for prompts with FlexiMMT nodes (``validation.py``)."""
    from comfy_api.latest import ComfyExtension

    from . import validation

    class FlexiMMTExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return node_list()

    validation.install()
    return FlexiMMTExtension()


def __getattr__(name: str):
    """``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` for a pack folder written for the first
    release (``from fleximmt.apps.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS``)."""
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import validation

        validation.install()
        schemas = {cls: cls.GET_SCHEMA() for cls in node_list()}
        if name == "NODE_CLASS_MAPPINGS":
            return {schema.node_id: cls for cls, schema in schemas.items()}
        return {schema.node_id: schema.display_name for schema in schemas.values()}
    raise AttributeError(f"module 'fleximmt.apps.comfy' has no attribute {name!r}")
