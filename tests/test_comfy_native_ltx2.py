"""FlexiMMT native on ComfyUI 0.33's LTX-2 (``fleximmt.apps.comfy.native.ltx2``), at the model level: tiny LTX-2.0
and LTX-2.3 audio-video transformers made by diffusers, their weights saved under ComfyUI's key names and loaded by
ComfyUI's own loader. Without the patch ComfyUI's model equals diffusers' (comfy_ltx2's docstring says
the one difference between them and how the tiny models sidestep it). One patched forward of ComfyUI's
model equals fleximmt's own LTX-2 transformer call (diffusers' model with fleximmt's processors: motion
tokens in the video stream's text attention, MDMA's cross parts, RMPM from the video self-attention, the
audio stream diffusers') with the same weights, inputs and objects, video and audio; without objects it
equals ComfyUI's unpatched model exactly. ComfyUI 0.33 only (0.3.64 has no LTX-2)."""

import pytest
import torch
from comfy_ltx2 import SHAPE, VARIANTS, GemmaClip, comfy_model, comfy_shaped_components, tiny_transformer
from comfy_native import (
    box,
    check_across_weight_changes,
    learn_jump,
    library_state,
    model_call,
    needs_native,
    patch_of,
    relative_error,
)

from fleximmt import MotionTokens, ObjectMotion
from fleximmt.errors import FlexiMMTInputError
from fleximmt.method.adapter import TokenGrid
from fleximmt.method.masks import CROSS_PARTS
from fleximmt.method.pipeline import TransferOptions
from fleximmt.models.ltx2 import LTX2Adapter, slot_of

pytestmark = [pytest.mark.comfy, needs_native("LTX-2")]
GEMMA = "gemma3_12b"  # ComfyUI's key of the Gemma tokens

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
SIZE, FRAMES, LATENT, AUDIO = 32, 3, 4, 5  # mask pixels; latent frames, height and width; audio latent frames
GRID = TokenGrid(FRAMES, LATENT, LATENT, FRAMES, 1, 8)
TEXT_LEN = 1024  # the prompt's Gemma tokens, then the connector's registers up to 1,024 (ComfyUI's and diffusers')
FPS = 24.0


@pytest.fixture(scope="module", params=list(VARIANTS))
def transformer(request):
    transformer = tiny_transformer(0, request.param)
    LTX2Adapter(type("Pipe", (), {"transformer": transformer})()).install_processors()
    return transformer


@pytest.fixture(scope="module")
def patcher(transformer):
    return comfy_model(transformer)


@pytest.fixture(scope="module")
def clip():
    return GemmaClip()


def make_objects(transformer, count=2, scale=30.0, words=WORDS):
    from fleximmt.toy.tiny import random_motion

    masks = [box(SIZE, 2, 16, 2, 16), box(SIZE, 10, 30, 14, 30), box(SIZE, 0, 32, 0, 10)]
    return tuple(
        ObjectMotion(masks[k], random_motion(transformer, 4, seed=k + 1, scale=scale), words[k]) for k in range(count)
    )


def widths(transformer) -> tuple[int, int]:
    """The video and audio text widths the transformer takes (LTX-2.3's connectors project them to its streams')."""
    cfg = transformer.config
    if cfg.use_prompt_embeddings:
        return cfg.caption_channels, cfg.caption_channels
    return cfg.cross_attention_dim, cfg.audio_cross_attention_dim


def inputs(transformer, batch=1, seed=0, sigma=0.6):
    """ComfyUI's inputs: the video and audio latents, each video token's timestep (the image's first latent
    frame 0, as ComfyUI's image-to-video denoise mask makes it) and the audio's, and the text after the
    connectors (video features, then audio features)."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, SHAPE["in_channels"], FRAMES, LATENT, LATENT, generator=gen)
    audio = torch.randn(batch, 8, AUDIO, 16, generator=gen)
    context = torch.randn(batch, TEXT_LEN, sum(widths(transformer)), generator=gen)
    clean = torch.zeros(batch, 1, FRAMES, LATENT, LATENT)
    clean[:, :, 0] = 1
    return video, audio, (sigma * (1 - clean)).flatten(1), torch.full((batch,), sigma), context


def comfy(patcher, video, audio, video_t, audio_t, context, **kw):
    """ComfyUI's LTX-2 called as its sampler calls it (``comfy_native.model_call``); its video and audio as
    diffusers packs them, ``[B, tokens, channels]``."""
    out = model_call(patcher, [video, audio], (video_t, audio_t), context, None, frame_rate=FPS, **kw)
    return out[0].flatten(2).transpose(1, 2), out[1].permute(0, 2, 1, 3).flatten(2)


def library_forward(transformer, state, video, audio, video_t, audio_t, context, rows=None, feature_rows=None, **kw):
    """fleximmt's LTX-2 transformer (diffusers' model, fleximmt's processors) on the same inputs; ``state`` None:
    diffusers' own computation. diffusers takes timesteps scaled by 1,000 and, as ComfyUI, reads the video's
    cross-attention modulation from the video's own timesteps (``use_cross_timestep=False``)."""
    slot = slot_of(transformer)
    if state is not None:
        state.rows.begin_forward(rows, feature_rows)
        slot.state = state
    try:
        with torch.no_grad():
            return transformer(
                hidden_states=video.flatten(2).transpose(1, 2),
                audio_hidden_states=audio.permute(0, 2, 1, 3).flatten(2),
                encoder_hidden_states=context[..., : widths(transformer)[0]],
                audio_encoder_hidden_states=context[..., widths(transformer)[0] :],
                timestep=video_t * 1000,
                audio_timestep=audio_t * 1000,
                sigma=audio_t * 1000,
                num_frames=FRAMES,
                height=LATENT,
                width=LATENT,
                fps=FPS,
                audio_num_frames=AUDIO,
                use_cross_timestep=False,
                return_dict=False,
                **kw,
            )
    finally:
        slot.state = None


def both(out) -> torch.Tensor:
    return torch.cat([out[0].flatten(), out[1].flatten()])


def library(objects, spans, mask_source="static", concept_spans=None):
    options = TransferOptions(objects, mask_source, parts=CROSS_PARTS)
    options.check(LTX2Adapter(None))
    return library_state(objects, spans, options, LTX2Adapter, SHAPE["num_layers"], GRID, TEXT_LEN, 1, concept_spans)


def test_comfy_loads_the_tiny_ltx2_as_its_own_model_and_equals_diffusers(transformer, patcher):
    model = patcher.model.diffusion_model
    assert type(model).__name__ == "LTXAVModel" and len(model.transformer_blocks) == SHAPE["num_layers"]
    video, audio, video_t, audio_t, context = inputs(transformer, batch=2)
    ours = comfy(patcher, video, audio, video_t, audio_t, context)
    theirs = library_forward(transformer, None, video, audio, video_t, audio_t, context)
    assert relative_error(ours[0], theirs[0]) < 1e-4 and relative_error(ours[1], theirs[1]) < 1e-4


def test_motion_words_are_found_as_comfyuis_gemma_tokenizer_gives_them(transformer, patcher, clip):
    """ComfyUI's own Gemma tokenizer (``<bos>``, left padding to 1,024) on the tiny Gemma-style sentencepiece
    model: the words' keys are their indices after the padding ComfyUI's encoder crops; punctuation and
    quotes around them, each occurrence its own; a prompt past 1,024 tokens (the registers then fill the
    text up to their next whole number, as ComfyUI's own connector shows)."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    cases = [
        (PROMPT, WORDS),
        ("The cat (jumps), while the dog runs quickly!", ["jumps", "runs quickly"]),
        ('A ball jumps up. A sign reads "jumps up".', ["jumps up", "jumps up"]),
    ]
    long = " ".join(["A dog walks on the snow, a cat runs right."] * 110) + " " + PROMPT  # past 1,024 tokens
    cases.append((long, WORDS))
    connector = patcher.model.diffusion_model.video_embeddings_connector
    for prompt, words in cases:
        patch = patch_of(apply_fleximmt(patcher, clip, prompt, make_objects(transformer, 2, words=words)))
        ids = [t[0] for t in clip.tokenize(prompt)[GEMMA][0]]
        assert len(ids) >= TEXT_LEN and (ids[0] == 0 or prompt is long)  # left padded to 1,024
        model_ids = ids[ids.index(2) :]  # what the encoder keeps: <bos>, then the prompt
        # the text length is what ComfyUI's own connector makes of those tokens (registers after them)
        text = connector(torch.zeros(1, len(model_ids), SHAPE["caption_channels"]))[0]
        assert patch.prompt_len == text.shape[1]
        assert (patch.prompt_len > TEXT_LEN) if prompt is long else (patch.prompt_len == TEXT_LEN)
        assert clip.decode(model_ids[1:]) == prompt
        assert [clip.decode([model_ids[i] for i in span]).strip() for span in patch.spans] == words
        assert len({tuple(span) for span in patch.spans}) == 2


@pytest.mark.parametrize("mask_source", ["static", "rmpm"])
def test_patched_forward_equals_fleximmt_ltx2_transformer(transformer, patcher, clip, mask_source):
    """Two evaluations (two noise levels; RMPM updates the masks in between from features each side captured
    itself), a batch of one unconditional and one conditional row; video and audio."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source=mask_source)
    patch = patch_of(patched)
    state, schedule = library(objects, patch.spans, mask_source)
    video, audio, video_t, audio_t, context = inputs(transformer, batch=2)
    unpatched = comfy(patcher, video, audio, video_t, audio_t, context)
    for step, sigma in enumerate([0.5, 0.4]):
        if step:
            schedule.step_end(step - 1)
        ours = comfy(patched, video, audio, video_t, audio_t, context, sigma=sigma, cond_or_uncond=(1, 0))
        theirs = library_forward(transformer, state, video, audio, video_t, audio_t, context, [0, 0], [1])
        assert relative_error(both(ours), both(theirs)) < 1e-4
        assert relative_error(ours[0], unpatched[0]) > 1e-3  # the motion tokens changed the video
        assert relative_error(ours[1], unpatched[1]) > 1e-5  # and the audio, through the video it reads
        assert torch.equal(patch.run.state.layouts.video_masks[0], state.layouts.video_masks[0])
    if mask_source == "rmpm":
        masks = state.layouts.video_masks[0].view(2, FRAMES, -1)
        assert patch.run.steps == 1 and not torch.equal(masks[:, 1], masks[:, 0])


# ComfyUI's LTXV guidance nodes' extra pass (its transformer options) and diffusers' forward that matches it
GUIDANCE = {
    "spatio-temporal": ({"stg_self_attn_blocks": frozenset({0})}, {"spatio_temporal_guidance_blocks": [0]}),
    "modality": ({"a2v_cross_attn": False, "v2a_cross_attn": False}, {"isolate_modalities": True}),
}


@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_a_guidance_pass_runs_with_the_objects_and_lends_rmpm_nothing(transformer, patcher, clip, guidance):
    """ComfyUI's LTXV Spatio-Temporal Guidance pass (block 0's self-attention a value passthrough: it makes no
    attention call) and Modality Guidance pass (audio-video attention severed), each on the positive rows at
    the step's noise level after its first pass, equal fleximmt's forward with diffusers' own guidance
    arguments, objects on; RMPM's masks after the step are those of the first pass alone (RMPM reads blocks 0
    and 1: the perturbed block 0 changes block 1's features; the closed audio-to-video gate leaves the video
    of the modality pass as the first's)."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    options, arguments = GUIDANCE[guidance]
    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="rmpm")
    patch = patch_of(patched)
    state, schedule = library(objects, patch.spans, "rmpm")
    video, audio, video_t, audio_t, context = inputs(transformer, batch=1, seed=8)
    guided = patched.clone()
    guided.model_options["transformer_options"].update(options)
    first = comfy(patched, video, audio, video_t, audio_t, context, sigma=0.5)
    library_forward(transformer, state, video, audio, video_t, audio_t, context, [0], [0])
    ours = comfy(guided, video, audio, video_t, audio_t, context, sigma=0.5)
    theirs = library_forward(transformer, state, video, audio, video_t, audio_t, context, [0], None, **arguments)
    assert relative_error(both(ours), both(theirs)) < 1e-4
    assert relative_error(both(ours), both(first)) > 1e-3  # the guidance counted
    schedule.step_end(0)
    ours = comfy(patched, video, audio, video_t, audio_t, context, sigma=0.4)  # the next step: RMPM's masks
    theirs = library_forward(transformer, state, video, audio, video_t, audio_t, context, [0], [0])
    assert patch.run.steps == 1 and relative_error(both(ours), both(theirs)) < 1e-4
    assert torch.equal(patch.run.state.layouts.video_masks[0], state.layouts.video_masks[0])


def test_the_patch_keeps_working_when_comfyui_recreates_or_streams_the_weights(transformer, patcher, clip):
    """comfy_native.check_across_weight_changes: weights re-created, a fresh clone, a partial load."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher.clone(), clip, PROMPT, objects, mask_source="rmpm")
    state, schedule = library(objects, patch_of(patched).spans, "rmpm")
    video, audio, video_t, audio_t, context = inputs(transformer, batch=2, seed=4)
    check_across_weight_changes(
        patched,
        schedule,
        lambda model, sigma: both(
            comfy(model, video, audio, video_t, audio_t, context, sigma=sigma, cond_or_uncond=(1, 0))
        ),
        lambda: both(library_forward(transformer, state, video, audio, video_t, audio_t, context, [0, 0], [1])),
    )


def test_without_objects_the_patch_is_comfyuis_model_exactly(transformer, patcher, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt

    patched = apply_fleximmt(patcher, clip, PROMPT, None)
    video, audio, video_t, audio_t, context = inputs(transformer, batch=2, seed=3)
    for sigma in (0.9, 0.8):
        ours = comfy(patched, video, audio, video_t, audio_t, context, sigma=sigma, cond_or_uncond=(0, 1))
        theirs = comfy(patcher, video, audio, video_t, audio_t, context, sigma=sigma, cond_or_uncond=(0, 1))
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_comfyuis_own_sampler_runs_the_patched_ltx2(transformer, clip):
    """A KSampler run (3 Euler steps, CFG 3: the conditional and unconditional rows) through ComfyUI's own model
    call - its text connector on the encoder's output (a 5-token negative prompt and the positive both filled
    to 1,024 keys by the registers), the image's latent frame kept by the denoise mask (per-token timesteps) -
    counts ComfyUI's steps as RMPM's, moves the video with the objects, and without objects is ComfyUI's run
    exactly. (That each forward is fleximmt's is the model-level tests'.)"""
    import comfy.sample

    from fleximmt.apps.comfy.native import apply_fleximmt

    patcher = comfy_model(transformer, connectors=True)
    gen = torch.Generator().manual_seed(9)
    ids = [t[0] for t in clip.tokenize(PROMPT)[GEMMA][0]]
    width = (
        transformer.config.caption_channels if transformer.config.use_prompt_embeddings else sum(widths(transformer))
    )
    positive = [[torch.randn(1, len(ids) - ids.index(2), width, generator=gen), {"unprocessed_ltxav_embeds": True}]]
    negative = [[torch.randn(1, 5, width, generator=gen), {"unprocessed_ltxav_embeds": True}]]
    shape = (1, SHAPE["in_channels"], FRAMES, LATENT, LATENT)
    noise, image = torch.randn(shape, generator=gen), torch.zeros(shape)
    keep = torch.ones(1, 1, FRAMES, LATENT, LATENT)
    keep[:, :, 0] = 0
    steps = []

    def sample(model, count=False):
        step = lambda i, x0, x, total: steps.append(patch_of(model).run.steps) if count else None
        settings = dict(noise_mask=keep, callback=step, disable_pbar=True, seed=0)
        return comfy.sample.sample(model, noise, 3, 3.0, "euler", "simple", positive, negative, image, **settings)

    unpatched = sample(patcher)
    patched = apply_fleximmt(patcher, clip, PROMPT, make_objects(transformer), mask_source="rmpm")
    moved = sample(patched, count=True)
    assert steps == [0, 1, 2]  # after each step, the run has counted the steps before it
    assert relative_error(moved, unpatched) > 1e-3
    assert torch.equal(sample(apply_fleximmt(patcher, clip, PROMPT, None)), unpatched)


def test_a_motion_learned_by_fleximmt_on_diffusers_ltx2_drives_comfyuis(clip, tmp_path):
    """``train_motion`` on diffusers' LTX-2 pipeline (tiny components around a transformer of ComfyUI's shape:
    ``comfy_shaped_components``), the motion loaded from its file, patches ComfyUI's model of the same weights."""
    from diffusers import LTX2ImageToVideoPipeline

    from fleximmt.apps.comfy.native import apply_fleximmt

    components = comfy_shaped_components(1)
    transformer = components["transformer"]
    pipe = LTX2ImageToVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    motion = learn_jump(pipe, tmp_path / "jump.safetensors", SIZE, 9)
    assert motion.family == "ltx2"
    objects = (ObjectMotion(box(SIZE, 2, 16, 2, 16), motion, "jumps up"),)
    patcher = comfy_model(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="static")
    video, audio, video_t, audio_t, context = inputs(transformer, seed=5)
    state, _ = library(objects, patch_of(patched).spans)
    ours = comfy(patched, video, audio, video_t, audio_t, context)
    theirs = library_forward(transformer, state, video, audio, video_t, audio_t, context, [0], [0])
    assert relative_error(both(ours), both(theirs)) < 1e-4
    assert relative_error(ours[0], comfy(patcher, video, audio, video_t, audio_t, context)[0]) > 1e-5


def test_bad_inputs_are_refused_by_name(transformer, patcher, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt, family_of

    objects = make_objects(transformer)
    wan = ObjectMotion(box(SIZE, 0, 10, 0, 10), MotionTokens(torch.zeros(2, 4, 16), family="wan"), "slides left")
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: this motion was learned on Wan"):
        apply_fleximmt(patcher, clip, PROMPT, (objects[0], wan))
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: motion words 'dances wildly' were not found"):
        apply_fleximmt(patcher, clip, PROMPT, make_objects(transformer, words=["jumps up", "dances wildly"]))
    with pytest.raises(FlexiMMTInputError, match="Gemma tokenizer parsed this prompt into other tokens"):
        apply_fleximmt(patcher, clip, "A ball jumps up<end_of_turn> A box slides left.", objects)

    def holder(diffusion_model):
        return type("Patcher", (), {"model": type("Base", (), {"diffusion_model": diffusion_model})()})()

    from comfy.ldm.lightricks import model as lightricks
    from comfy.ops import disable_weight_init

    with torch.device("meta"):
        ltxv = lightricks.LTXVModel(
            in_channels=4,
            cross_attention_dim=16,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=16,
            num_layers=1,
            operations=disable_weight_init,
        )
    with pytest.raises(FlexiMMTInputError, match=r"this is an LTX-Video model \(LTXVModel, video only\)"):
        family_of(holder(ltxv))

    patched = apply_fleximmt(patcher, clip, PROMPT, objects)
    video, audio, video_t, audio_t, context = inputs(transformer)
    with pytest.raises(FlexiMMTInputError, match="guide or keyframe tokens"):
        comfy(patched, video, audio, video_t, audio_t, context, keyframe_idxs=torch.zeros(1, 3, 16, 2))
    with pytest.raises(FlexiMMTInputError, match=f"the conditional text has {TEXT_LEN + 3} tokens"):
        comfy(patched, video, audio, video_t, audio_t, torch.cat([context, context[:, :3]], 1))
    closed = torch.ones(1, TEXT_LEN, dtype=torch.long)
    closed[:, -5:] = 0
    with pytest.raises(FlexiMMTInputError, match="closes text keys"):
        out = model_call(patched, [video, audio], (video_t, audio_t), context, closed, frame_rate=FPS)
        assert out is None
