"""FlexiMMT native on ComfyUI 0.33's CogVideoX (``fleximmt.apps.comfy.native.cogvideox``), at the model level:
tiny CogVideoX 1.5 I2V models made by diffusers, their weights saved under ComfyUI's key names and loaded
by ComfyUI's own loader. One patched forward of ComfyUI's model equals fleximmt's own CogVideoX
transformer call (diffusers' model with fleximmt's processors: joint attention with motion tokens, all
five MDMA parts) with the same weights, inputs and objects; without objects it equals ComfyUI's unpatched
model exactly. ComfyUI 0.33 only (0.3.64 has no CogVideoX): runs in `make test-comfy` with COMFYUI set to it."""

from types import SimpleNamespace

import pytest
import torch
from comfy_cogvideox import SHAPE, TEXT, T5Clip, comfy_model
from comfy_native import (
    box,
    check_across_weight_changes,
    learn_jump,
    learnable_twins,
    library_state,
    model_call,
    needs_native,
    patch_of,
    relative_error,
)

from fleximmt import MotionTokens, ObjectMotion
from fleximmt.errors import FlexiMMTInputError
from fleximmt.method.adapter import TokenGrid
from fleximmt.method.masks import PARTS
from fleximmt.method.pipeline import TransferOptions
from fleximmt.models.cogvideox import CogVideoXAdapter, FlexiMMTPipeline
from fleximmt.toy.tiny import random_motion, tiny_components

pytestmark = [pytest.mark.comfy, needs_native("CogVideoX")]

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
SIZE, FRAMES = 32, 4  # pixels (the tiny VAE's 4x: 8 x 8 latents, 4 x 4 tokens); latent frames (2 token frames)
GRID = TokenGrid(FRAMES // 2, SIZE // 8, SIZE // 8, FRAMES, 2)


@pytest.fixture(scope="module")
def pipe():
    pipe = FlexiMMTPipeline(**tiny_components(0, height=SIZE, width=SIZE, num_frames=13, text_len=TEXT, **SHAPE))
    pipe.set_progress_bar_config(disable=True)
    CogVideoXAdapter(pipe).install_processors()
    return pipe


@pytest.fixture(scope="module")
def patcher(pipe):
    return comfy_model(pipe.transformer)


@pytest.fixture(scope="module")
def clip():
    return T5Clip()


def make_objects(transformer, count=2, scale=30.0, words=WORDS):
    masks = [box(SIZE, 2, 16, 2, 16), box(SIZE, 10, 30, 14, 30), box(SIZE, 0, 32, 0, 10)]
    return tuple(
        ObjectMotion(masks[k], random_motion(transformer, 4, seed=k + 1, scale=scale), words[k]) for k in range(count)
    )


def inputs(batch=1, seed=0):
    """Noise + image latents (ComfyUI's [B, C, T, H, W]), timestep, T5-shaped text, CogVideoX 1.5's ofs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2 * SHAPE["latent_channels"], FRAMES, SIZE // 4, SIZE // 4, generator=gen)
    context = torch.randn(batch, TEXT, SHAPE["text_dim"], generator=gen)
    return x, torch.full((batch,), 500.0), context, torch.full((batch,), 2.0)


def comfy(patcher, x, t, context, ofs, **kw):
    return model_call(patcher, x, t, context, ofs=ofs, **kw)


def library_forward(pipe, state, x, t, context, ofs, rows=None, feature_rows=None, grad=False):
    """fleximmt's CogVideoX transformer (diffusers' model, fleximmt's processors) on the same inputs, in
    ComfyUI's layout; ``state`` None: diffusers' own computation."""
    if state is not None:
        state.rows.begin_forward(rows, feature_rows)
    rotary = pipe._prepare_rotary_positional_embeddings(
        x.shape[-2] * pipe.vae_scale_factor_spatial, x.shape[-1] * pipe.vae_scale_factor_spatial, x.shape[2], "cpu"
    )
    with torch.set_grad_enabled(grad):
        out = pipe.transformer(
            hidden_states=x.transpose(1, 2),
            encoder_hidden_states=context,
            timestep=t,
            ofs=ofs,
            image_rotary_emb=rotary,
            attention_kwargs=None if state is None else {"fleximmt": state},
            return_dict=False,
        )[0]
    return out.transpose(1, 2)


def library(pipe, objects, spans, mask_source="static", concept_spans=None):
    options = TransferOptions(objects, mask_source, parts=PARTS)
    options.check(CogVideoXAdapter(pipe))
    num_blocks = SHAPE["num_layers"]
    return library_state(objects, spans, options, CogVideoXAdapter, num_blocks, GRID, TEXT, 1, concept_spans)


def test_comfy_loads_the_tiny_cogvideox_as_its_own_model(pipe, patcher):
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel

    model = patcher.model.diffusion_model
    assert type(model) is CogVideoXTransformer3DModel and len(model.blocks) == SHAPE["num_layers"]
    assert model.patch_size_t == 2 and model.use_rotary_positional_embeddings
    x, t, context, ofs = inputs(batch=2)
    assert relative_error(comfy(patcher, x, t, context, ofs), library_forward(pipe, None, x, t, context, ofs)) < 1e-4


def test_motion_words_are_found_as_comfyuis_t5_tokenizer_gives_them(pipe, patcher, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt, clip_token_ids

    cases = [
        (PROMPT, WORDS),
        ("The cat (jumps) while the dog runs quickly.", ["jumps", "runs quickly"]),  # ComfyUI's weight syntax
        ("A ball jumps up. A box jumps up.", ["jumps up", "jumps up"]),  # each object its own occurrence
    ]
    for prompt, words in cases:
        objects = make_objects(pipe.transformer, 2, words=words)
        patch = patch_of(apply_fleximmt(patcher, clip, prompt, objects))
        ids = clip_token_ids(clip, prompt)
        assert len(ids) == TEXT == patch.prompt_len
        assert [clip.decode([ids[i] for i in span]) for span in patch.spans] == words
        assert len({tuple(span) for span in patch.spans}) == 2


@pytest.mark.parametrize("mask_source", ["static", "rmpm", "qk"])
def test_patched_forward_equals_fleximmt_cogvideox_transformer(pipe, patcher, clip, mask_source):
    """Two evaluations (two noise levels; RMPM updates the masks in between from features each side
    captured itself), a batch of one unconditional and one conditional row."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(pipe.transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source=mask_source)
    patch = patch_of(patched)
    state, schedule = library(pipe, objects, patch.spans, mask_source, patch.concept_spans)
    x, t, context, ofs = inputs(batch=2)
    unpatched = comfy(patcher, x, t, context, ofs)
    for step, sigma in enumerate([0.5, 0.4]):
        if step:
            schedule.step_end(step - 1)
        ours = comfy(patched, x, t, context, ofs, sigma=sigma, cond_or_uncond=(1, 0))
        theirs = library_forward(pipe, state, x, t, context, ofs, rows=[0, 0], feature_rows=[1])
        assert relative_error(ours, theirs) < 1e-4
        assert relative_error(ours, unpatched) > 1e-3  # the motion tokens changed the result
        assert torch.equal(patch.run.state.layouts.video_masks[0], state.layouts.video_masks[0])
    first = state.layouts.video_masks[0].view(2, GRID.frames, -1)[:, 0]
    if mask_source == "rmpm":  # RMPM moved the masks of the second token frame
        assert patch.run.steps == 1 and not torch.equal(
            state.layouts.video_masks[0].view(2, GRID.frames, -1)[:, 1], first
        )


def test_the_dense_mask_kernel_gives_the_joint_attention_as_auto_through_comfyuis_attention(pipe, patcher, clip):
    """Apply FlexiMMT's mask_kernel on a joint-attention family: the dense kernel's bool N x N mask reaches
    ComfyUI's attention as the additive float mask it takes (its split and sub-quadratic attentions add the
    mask to the scores), so dense computes what auto computes."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(pipe.transformer)
    x, t, context, ofs = inputs(batch=2, seed=13)
    outs = {}
    for kernel in ("auto", "dense"):
        patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="static", mask_kernel=kernel)
        outs[kernel] = comfy(patched, x, t, context, ofs, cond_or_uncond=(1, 0))
        assert patch_of(patched).run.state.kernel.name == kernel
    assert relative_error(outs["dense"], outs["auto"]) < 1e-5
    assert relative_error(outs["auto"], comfy(patcher, x, t, context, ofs)) > 1e-3  # the masks were in play


def test_the_patch_keeps_working_when_comfyui_recreates_or_streams_the_weights(pipe, patcher, clip):
    """comfy_native.check_across_weight_changes: weights re-created, a fresh clone, a partial load."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(pipe.transformer)
    patched = apply_fleximmt(patcher.clone(), clip, PROMPT, objects, mask_source="rmpm")
    state, schedule = library(pipe, objects, patch_of(patched).spans, "rmpm")
    x, t, context, ofs = inputs(batch=2, seed=4)
    check_across_weight_changes(
        patched,
        schedule,
        lambda model, sigma: comfy(model, x, t, context, ofs, sigma=sigma, cond_or_uncond=(1, 0)),
        lambda: library_forward(pipe, state, x, t, context, ofs, rows=[0, 0], feature_rows=[1]),
    )


def test_gradients_reach_the_motion_tokens_through_comfyuis_blocks_as_through_fleximmts(
    pipe, patcher, clip, monkeypatch
):
    """What learning a motion natively needs: with DMEM's per-block masks (mask_source "qk", training's
    masks) and autograd on, the motion tokens' gradient through ComfyUI's blocks equals the gradient
    through fleximmt's CogVideoX transformer; ComfyUI in training mode through both passes, as its trainer runs."""
    from comfy import model_management

    from fleximmt.apps.comfy.native import apply_fleximmt

    monkeypatch.setattr(model_management, "in_training", True)

    ours, theirs = learnable_twins(random_motion(pipe.transformer, 4, seed=9, scale=30.0), "cogvideox")
    objects = [(ObjectMotion(box(SIZE, 2, 16, 2, 16), motion, "jumps up"),) for motion in (ours, theirs)]
    patched = apply_fleximmt(patcher, clip, PROMPT, objects[0], mask_source="qk")
    patch = patch_of(patched)
    state, _ = library(pipe, objects[1], patch.spans, "qk", patch.concept_spans)
    x, t, context, ofs = inputs(seed=8)
    weight = torch.randn(x[:, : SHAPE["latent_channels"]].shape, generator=torch.Generator().manual_seed(1))
    (comfy(patched, x, t, context, ofs, grad=True) * weight).sum().backward()
    (library_forward(pipe, state, x, t, context, ofs, [0], [0], grad=True) * weight).sum().backward()
    assert ours.tokens.grad.abs().sum() > 0
    assert relative_error(ours.tokens.grad, theirs.tokens.grad) < 1e-4


def test_without_objects_the_patch_is_comfyuis_model_exactly(patcher, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt

    patched = apply_fleximmt(patcher, clip, PROMPT, None)
    x, t, context, ofs = inputs(batch=2, seed=3)
    for sigma in (0.9, 0.8):
        assert torch.equal(
            comfy(patched, x, t, context, ofs, sigma=sigma, cond_or_uncond=(0, 1)),
            comfy(patcher, x, t, context, ofs, sigma=sigma, cond_or_uncond=(0, 1)),
        )


def test_a_motion_learned_by_fleximmt_on_diffusers_cogvideox_drives_comfyuis(pipe, clip, tmp_path):
    from fleximmt.apps.comfy.native import apply_fleximmt

    motion = learn_jump(pipe, tmp_path / "jump.safetensors", SIZE, 13)
    assert motion.family == "cogvideox"
    objects = (ObjectMotion(box(SIZE, 2, 16, 2, 16), motion, "jumps up"),)
    patcher = comfy_model(pipe.transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="static")
    x, t, context, ofs = inputs(seed=5)
    state, _ = library(pipe, objects, patch_of(patched).spans)
    ours = comfy(patched, x, t, context, ofs)
    assert relative_error(ours, library_forward(pipe, state, x, t, context, ofs, rows=[0], feature_rows=[0])) < 1e-4
    assert relative_error(ours, comfy(patcher, x, t, context, ofs)) > 1e-5


def test_bad_inputs_are_refused_by_name(pipe, patcher, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(pipe.transformer)
    wan = ObjectMotion(box(SIZE, 0, 10, 0, 10), MotionTokens(torch.zeros(2, 4, 128), family="wan"), "slides left")
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: this motion was learned on Wan"):
        apply_fleximmt(patcher, clip, PROMPT, (objects[0], wan))
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: motion words 'dances wildly' were not found"):
        apply_fleximmt(patcher, clip, PROMPT, make_objects(pipe.transformer, words=["jumps up", "dances wildly"]))
    from comfy_hunyuan15 import QwenClip

    with pytest.raises(FlexiMMTInputError, match=r"tokenises for \['qwen25_7b'\], not for CogVideoX's text encoder"):
        apply_fleximmt(patcher, QwenClip(), PROMPT, objects)
    with pytest.raises(ValueError, match="context_text='sideways'"):
        apply_fleximmt(patcher, clip, PROMPT, objects, context_text="sideways")
    patched = apply_fleximmt(patcher, clip, PROMPT, objects)
    x, t, context, ofs = inputs(batch=2)
    with pytest.raises(FlexiMMTInputError, match="the conditional text has 452 tokens"):  # ComfyUI's repeat to batch
        comfy(patched, x, t, context.repeat(1, 2, 1), ofs, cond_or_uncond=(1, 0))
    t2v = SimpleNamespace(in_channels=16, out_channels=16)
    from fleximmt.apps.comfy.native.cogvideox import CogVideoX

    with pytest.raises(FlexiMMTInputError, match="not the 32 of an image-to-video model"):
        CogVideoX().check(t2v)
