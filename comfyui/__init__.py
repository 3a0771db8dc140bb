"""The FlexiMMT node pack, as ComfyUI loads it from ``custom_nodes/``: link or copy this folder there
(e.g. ``ln -s "$PWD/comfyui" /path/to/ComfyUI/custom_nodes/fleximmt-nodes``) after
``pip install fleximmt`` into ComfyUI's Python. The nodes live in the package, ``fleximmt.apps.comfy``."""

try:
    from fleximmt.apps.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as err:  # ComfyUI lists the pack as failed, with this message
    raise ImportError(
        f"the FlexiMMT nodes need the fleximmt package in ComfyUI's Python: pip install fleximmt ({err})"
    ) from err

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
