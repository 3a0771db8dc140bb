"""A prompt with FlexiMMT nodes runs whole or not at all.

ComfyUI validates a prompt output by output and runs the outputs that pass: a Transfer with
``steps`` out of range, or a *Load Image* whose file is missing, leaves the Learn nodes valid, so
``/prompt`` answers 200, trains for minutes and reports success with no video. For prompts holding
a FlexiMMT node, the pack's on-prompt handler (ComfyUI's hook for packs, run before its own
validation) validates the prompt as ComfyUI does and, when some output fails, narrows the prompt to
the outputs that failed (``partial_execution_targets``, as the frontend's "queue selected outputs"
sets it): ComfyUI then refuses the prompt with its own ``400`` and node errors, before anything runs.
Other prompts are left as they are.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

PREFIX = "FlexiMMT"  # every FlexiMMT node's class id starts so


def has_fleximmt_nodes(prompt) -> bool:
    return isinstance(prompt, dict) and any(
        isinstance(node, dict) and str(node.get("class_type", "")).startswith(PREFIX) for node in prompt.values()
    )


def validate(prompt: dict, targets) -> tuple:
    """ComfyUI's own ``validate_prompt`` on a copy of ``prompt``: (valid, error, good outputs, node errors).
    The handler is called inside the server's event loop, so the coroutine runs on a loop of its own."""
    import execution
    import server

    prompt = copy.deepcopy(prompt)
    replacer = getattr(server.PromptServer.instance, "node_replace_manager", None)  # 0.33 renames old nodes first
    if replacer is not None:
        replacer.apply_replacements(prompt)
    check = execution.validate_prompt(str(uuid.uuid4()), prompt, targets)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, check).result()


def whole_or_nothing(json_data: dict) -> dict:
    """The on-prompt handler: a FlexiMMT prompt with failing outputs is narrowed to them."""
    prompt = json_data.get("prompt")
    if not has_fleximmt_nodes(prompt):
        return json_data
    valid, _, _, node_errors = validate(prompt, json_data.get("partial_execution_targets"))
    failed = sorted({output for error in node_errors.values() for output in error.get("dependent_outputs", [])})
    if not valid or not failed:  # ComfyUI refuses it anyway, or it is whole
        return json_data
    logger.warning(
        "FlexiMMT: nodes %s are invalid; the prompt is refused whole (outputs %s would not run)",
        sorted(node_errors),
        failed,
    )
    return {**json_data, "partial_execution_targets": failed}


def install() -> None:
    """Register the handler with ComfyUI's server (once)."""
    import server

    handlers = server.PromptServer.instance.on_prompt_handlers
    if whole_or_nothing not in handlers:
        server.PromptServer.instance.add_on_prompt_handler(whole_or_nothing)
