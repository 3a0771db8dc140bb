"""The FlexiMMT node pack, as ComfyUI loads it from ``custom_nodes/``: installed by ComfyUI-Manager or the
Comfy Registry (``pyproject.toml``, ``requirements.txt`` here), or linked or copied there by hand after
``pip install fleximmt`` into ComfyUI's Python. The nodes live in the package, ``fleximmt.apps.comfy``
(ComfyUI's V3 schema); ``web/`` shows a motion's metadata on the Learn and Load Motion nodes."""

try:
    from fleximmt.apps.comfy import comfy_entrypoint
except ImportError as err:  # ComfyUI lists the pack as failed, with this message
    raise ImportError(
        f"the FlexiMMT nodes need the fleximmt package in ComfyUI's Python: pip install fleximmt ({err})"
    ) from err

WEB_DIRECTORY = "web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
