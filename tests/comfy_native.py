"""What the native tests of every family share: a model call as ComfyUI's sampler makes it, the library's
own state for the diffusers twin (built from fleximmt's pieces, not from the native patch's), and the
ways ComfyUI re-creates or re-loads weights between calls (dynamic VRAM's CPU-testable part)."""

from __future__ import annotations

import numpy as np
import torch
from comfy_wan import COMFYUI, import_comfy

from fleximmt.method.adapter import TokenGrid
from fleximmt.method.masks import mask_to_token_grid, span_membership
from fleximmt.method.pipeline import MaskSchedule, transfer_state
from fleximmt.method.tokens import VideoMotions

NATIVE_ONLY_IN_033 = {
    "CogVideoX": "comfy/ldm/cogvideo/model.py",
    "HunyuanVideo 1.5": "comfy/ldm/hunyuan_video/upsampler.py",
    "LTX-2": "comfy/ldm/lightricks/av_model.py",
}


def needs_native(family: str):
    """A skip mark for tests of a family whose native model the ComfyUI source at ``COMFYUI`` lacks (0.3.64 has
    no CogVideoX, HunyuanVideo 1.5 or LTX-2): they run with ``COMFYUI=../shared/comfyui-0.33``."""
    import pytest

    return pytest.mark.skipif(
        not (COMFYUI / NATIVE_ONLY_IN_033[family]).is_file(),
        reason=f"ComfyUI at {COMFYUI} has no native {family}: these tests run on ComfyUI 0.33 (COMFYUI=../shared/comfyui-0.33)",
    )


def model_call(patcher, x, *args, sigma=0.5, cond_or_uncond=(0,), grad=False, **kwargs):
    """One call of the diffusion model as ComfyUI's sampler makes it: the patcher's transformer options
    with its wrappers merged in (``sampler_helpers.prepare_model_patcher``), the chunks and the sigma;
    ``grad``: with autograd on (a test of learning also sets ``model_management.in_training``, as ComfyUI's
    trainer does through the forward and backward passes). ``x``: the latent, or a list of them (LTX-2's
    ``[video, audio]``)."""
    comfy = import_comfy()
    ext = comfy.patcher_extension
    options = ext.copy_nested_dicts(patcher.model_options["transformer_options"])
    ext.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["sigmas"] = torch.full(((x[0] if isinstance(x, list) else x).shape[0],), float(sigma))
    with torch.set_grad_enabled(grad):
        return patcher.model.diffusion_model(x, *args, transformer_options=options, **kwargs)


def learnable_twins(motion, family: str):
    """Two motions of the same tokens, each a leaf that gathers its own gradient."""
    from fleximmt import MotionTokens

    tokens = motion.tokens.detach().clone().requires_grad_()
    twin = tokens.detach().clone().requires_grad_()
    return MotionTokens(tokens, family=family), MotionTokens(twin, family=family)


def learn_jump(pipe, path, size: int, frames: int):
    """A motion learned by fleximmt's ``train_motion`` on the diffusers ``pipe`` (two steps, four tokens): a red
    square jumping up, "jumps up" in its caption; loaded back from its file."""
    from fleximmt import MotionTokens, train_motion

    video = np.zeros((frames, size, size, 3), np.uint8)
    side, step = size // 4, max(1, size // 24)
    for f in range(frames):
        top = size - side - size // 8 - step * f
        video[f, top : top + side, size // 2 - side // 2 : size // 2 + side // 2] = (220, 30, 30)
    settings = dict(steps=2, tokens_per_motion=4, lr_warmup_steps=0, height=size, width=size, num_frames=frames)
    train_motion(pipe, video, "A red ball jumps up.", "ball", "jumps up", path, max_windows=1, **settings)
    return MotionTokens.load(path)


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def box(size, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def patch_of(patcher):
    """The NativePatch an FlexiMMT Apply clone carries (its DIFFUSION_MODEL wrapper's owner)."""
    from fleximmt.apps.comfy.native import KEY

    return patcher.wrappers["diffusion_model"][KEY][0].__self__


def library_state(
    objects, spans, options, adapter, num_blocks: int, grid: TokenGrid, text_len: int, videos=1, concept_spans=None
):
    """fleximmt's own state for the diffusers transformer, from the library's pieces: every expert's
    tokens (each transformer's processors read their own), the motion words over ``text_len`` tokens,
    the first-frame masks on the token grid, the concept words DMEM reads (``mask_source="qk"``); and
    its masks' schedule."""
    member = span_membership(text_len, spans)
    concept = None if concept_spans is None else [torch.tensor(span) for span in concept_spans]
    tokens = torch.stack([o.motion.expert_tokens() for o in objects])
    first = torch.stack([mask_to_token_grid(o.mask_tensor, grid.height, grid.width) for o in objects])
    state = transfer_state(
        [VideoMotions(tokens, member, concept) for _ in range(videos)], options, adapter, num_blocks, grid.frames
    )
    return state, MaskSchedule(state, [first] * videos, grid, options, num_blocks)


def recreate_weights(patcher) -> None:
    """Every parameter and buffer of the model replaced by a new tensor of the same values, as ComfyUI's
    dynamic VRAM re-creates weights between steps (the patch must hold none of the old ones)."""
    for module in patcher.model.diffusion_model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buffer.clone(), persistent=name not in module._non_persistent_buffers_set)


def lowvram(patcher):
    """A context in which ComfyUI has loaded ``patcher`` partially (``lowvram_model_memory`` of one
    byte): every layer casts its weights on the fly in each call, as when a model does not fit."""
    import contextlib

    @contextlib.contextmanager
    def loaded():
        patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, load_weights=True)
        try:
            yield patcher
        finally:
            patcher.unpatch_model()

    return loaded()


def write_random_weights(module: torch.nn.Module, path) -> None:
    """Random weights (seeded, float16) for every tensor of ``module`` (made on the meta device: its shapes),
    saved as safetensors: matrices and kernels scaled by their fan-in, norm scales (1-D weights, gammas)
    one, the rest zero. For ComfyUI's VAEs, whose loaders read fixed configs from the keys."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weights = {}
    for key, value in module.state_dict().items():
        shape = value.shape
        if key.endswith("gamma") or (len(shape) == 1 and key.endswith("weight")):
            weights[key] = torch.ones(shape, dtype=torch.float16)
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            weights[key] = (torch.randn(shape, generator=gen) * fan_in**-0.5).half()
        else:
            weights[key] = torch.zeros(shape, dtype=torch.float16)
    save_file(weights, str(path))


def check_across_weight_changes(patched, schedule, ours, theirs) -> None:
    """Two sampling steps of ``patched`` against fleximmt's (``ours(patcher, sigma)`` and ``theirs()``: one
    model call each, the second after ``schedule.step_end(0)``). Between them the weights are re-created
    (new tensors, same values) and a fresh clone of the patched MODEL samples on, loaded partially (every
    layer casting its weights on the fly, as when a model does not fit): the run goes on exactly as
    fleximmt's, RMPM's step included. What ComfyUI's dynamic VRAM does on a GPU (weights paged in per layer
    by comfy-aimdo) cannot run on a CPU; what it does to the weights the patch could hold is done here."""
    assert relative_error(ours(patched, 0.5), theirs()) < 1e-4
    recreate_weights(patched)
    clone = patched.clone()
    schedule.step_end(0)
    with lowvram(clone):
        assert any(getattr(m, "comfy_cast_weights", False) for m in clone.model.diffusion_model.modules())
        second = ours(clone, 0.4)
    assert patch_of(clone).run.steps == 1
    assert relative_error(second, theirs()) < 1e-4
