"""FlexiMMT native on ComfyUI 0.33's HunyuanVideo 1.5 (``fleximmt.apps.comfy.native.hunyuan15``), at the model
level: tiny HunyuanVideo 1.5 I2V models made by diffusers, their weights saved under ComfyUI's key names
and loaded by ComfyUI's own loader. One patched forward of ComfyUI's model equals fleximmt's own
HunyuanVideo 1.5 transformer call (diffusers' model with fleximmt's processors: dual-stream joint
attention with the motion tokens through the text stream, all five MDMA parts, padded text closed) with
the same weights, inputs and objects; without objects it equals ComfyUI's unpatched model exactly.
ComfyUI 0.33 only (0.3.64 has no HunyuanVideo 1.5)."""

import pytest
import torch
from comfy_hunyuan15 import SHAPE, QwenClip, comfy_model, comfy_shaped_components
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
from fleximmt.method.masks import PARTS
from fleximmt.method.pipeline import TransferOptions
from fleximmt.models.hunyuan15 import HunyuanVideo15Adapter, row_texts, slot_of

pytestmark = [pytest.mark.comfy, needs_native("HunyuanVideo 1.5")]

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
SIZE, FRAMES, LATENT = 32, 3, 4  # mask pixels; latent frames; latent height and width (16 video tokens a frame)
GRID = TokenGrid(FRAMES, LATENT, LATENT, FRAMES, 1)
IMAGE_TOKENS, GLYPHS = 9, 5  # SigLIP image tokens and ByT5 glyph tokens in the tests' text (any counts)


@pytest.fixture(scope="module")
def transformer():
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(**SHAPE).eval()
    HunyuanVideo15Adapter(type("Pipe", (), {"transformer": transformer})()).install_processors()
    return transformer


@pytest.fixture(scope="module")
def patcher(transformer):
    return comfy_model(transformer)


@pytest.fixture(scope="module")
def clip():
    return QwenClip()


@pytest.fixture(scope="module")
def prompt_len(clip):
    from fleximmt.apps.comfy.native.hunyuan15 import QWEN, qwen_crop

    ids = [t[0] for t in clip.tokenize(PROMPT)[QWEN][0]]
    return len(ids) - qwen_crop(ids)


def make_objects(transformer, count=2, scale=30.0, words=WORDS):
    masks = [box(SIZE, 2, 16, 2, 16), box(SIZE, 10, 30, 14, 30), box(SIZE, 0, 32, 0, 10)]
    return tuple(ObjectMotion(masks[k], random_motion(transformer, k + 1, scale), words[k]) for k in range(count))


def random_motion(transformer, seed, scale):
    from fleximmt.toy.tiny import random_motion as motion

    return motion(transformer, 4, seed=seed, scale=scale)


def inputs(text_len, batch=1, seed=0, padding=0):
    """ComfyUI's inputs: noise + image latents + the image mask channel, timestep, Qwen2.5 text (its last
    ``padding`` tokens padding, their features the valid ones' mean: see ``library_forward``), ByT5 and
    SigLIP features; and the Qwen2.5 mask (None without padding)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, SHAPE["in_channels"], FRAMES, LATENT, LATENT, generator=gen)
    context = torch.randn(batch, text_len, SHAPE["text_embed_dim"], generator=gen)
    byt5 = torch.randn(batch, GLYPHS, SHAPE["text_embed_2_dim"], generator=gen)
    image = torch.randn(batch, IMAGE_TOKENS, SHAPE["image_embed_dim"], generator=gen)
    mask = None
    if padding:
        mask = torch.ones(batch, text_len, dtype=torch.long)
        mask[:, -padding:] = 0
        context[:, -padding:] = context[:, :-padding].mean(1, keepdim=True)
    return x, torch.full((batch,), 500.0), context, byt5, image, mask


def comfy(patcher, x, t, context, byt5, image, mask=None, **kw):
    return model_call(patcher, x, t, context, txt_byt5=byt5, clip_fea=image, attention_mask=mask, **kw)


def library_forward(transformer, state, x, t, context, byt5, image, mask=None, rows=None, feature_rows=None):
    """fleximmt's HunyuanVideo 1.5 transformer (diffusers' model, fleximmt's processors) on the same inputs;
    ``state`` None: diffusers' own computation. ComfyUI's text refiner pools the Qwen2.5 features over every
    token, diffusers' over the valid ones: with the padding's features the valid ones' mean both pool alike.
    Without ByT5 or SigLIP features in ComfyUI (``byt5``/``image`` None), diffusers gets their tokens closed
    (its own padding, and its text-to-video image rule: all-zero image features)."""
    batch = x.shape[0]
    mask = torch.ones(batch, context.shape[1], dtype=torch.long) if mask is None else mask
    if byt5 is None:
        byt5, mask_2 = torch.zeros(batch, GLYPHS, SHAPE["text_embed_2_dim"]), torch.zeros(batch, GLYPHS)
    else:
        mask_2 = torch.ones(batch, byt5.shape[1])
    if image is None:
        image = torch.zeros(batch, IMAGE_TOKENS, SHAPE["image_embed_dim"])
    kwargs = dict(
        encoder_hidden_states=context,
        encoder_attention_mask=mask,
        encoder_hidden_states_2=byt5,
        encoder_attention_mask_2=mask_2,
        image_embeds=image,
    )
    slot = slot_of(transformer)
    if state is not None:
        state.rows.begin_forward(rows, feature_rows)  # text keys and DMEM's queries: the adapter's settings
        slot.state, slot.texts = state, row_texts(kwargs)
    try:
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]
    finally:
        slot.state, slot.texts = None, []


def library(transformer, objects, spans, text_len, mask_source="static", concept_spans=None):
    options = TransferOptions(objects, mask_source, parts=PARTS)
    options.check(HunyuanVideo15Adapter(None))
    num_blocks = SHAPE["num_layers"]
    return library_state(objects, spans, options, HunyuanVideo15Adapter, num_blocks, GRID, text_len, 1, concept_spans)


def test_comfy_loads_the_tiny_hunyuan15_as_its_own_model(transformer, patcher, prompt_len):
    model = patcher.model.diffusion_model
    assert len(model.double_blocks) == SHAPE["num_layers"] and not model.single_blocks
    assert model.cond_type_embedding is not None and model.vision_in is not None
    x, t, context, byt5, image, _ = inputs(prompt_len, batch=2)
    ours = comfy(patcher, x, t, context, byt5, image)
    assert relative_error(ours, library_forward(transformer, None, x, t, context, byt5, image)) < 1e-4
    x, t, context, _, _, mask = inputs(prompt_len, seed=2, padding=6)  # ComfyUI takes a mask without ByT5, SigLIP
    ours = comfy(patcher, x, t, context, None, None, mask)
    assert relative_error(ours, library_forward(transformer, None, x, t, context, None, None, mask)) < 1e-4


def test_motion_words_are_found_as_comfyuis_qwen_tokenizer_gives_them(transformer, patcher, clip, monkeypatch):
    """The real Qwen2.5 tokenizer (a byte-level BPE: " jumps" mid-sentence is not "jumps" alone) inside
    HunyuanVideo 1.5's chat template, cropped as ComfyUI's encoder crops it (its own code, run here on
    token positions); quoted text goes to ByT5 and stays in the Qwen2.5 prompt too."""
    from comfy.text_encoders import hunyuan_image
    from comfy.text_encoders.hunyuan_video import HunyuanVideo15Tokenizer

    from fleximmt.apps.comfy.native import apply_fleximmt
    from fleximmt.apps.comfy.native.hunyuan15 import QWEN

    class Positions(hunyuan_image.HunyuanImageTEModel):  # ComfyUI's crop, run on each token's position
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.byt5_small = None

    cases = [
        (PROMPT, WORDS),
        ("The cat jumps, while the dog runs quickly.", ["jumps", "runs quickly"]),
        ('A ball jumps up. A sign reads "jumps up".', ["jumps up", "jumps up"]),  # each its own occurrence
    ]
    for prompt, words in cases:
        objects = make_objects(transformer, 2, words=words)
        patch = patch_of(apply_fleximmt(patcher, clip, prompt, objects))
        tokens = clip.tokenize(prompt)
        ids = [t[0] for t in tokens[QWEN][0]]
        kept = kept_positions(monkeypatch, Positions(), tokens, len(ids))
        model_ids = [ids[i] for i in kept]  # the Qwen2.5 tokens the model sees
        assert patch.prompt_len == len(model_ids)
        assert clip.decode(model_ids).startswith(prompt)
        assert [clip.decode([model_ids[i] for i in span]).strip() for span in patch.spans] == words
        assert len({tuple(span) for span in patch.spans}) == 2
    assert isinstance(clip.tokenizer, HunyuanVideo15Tokenizer)


def kept_positions(monkeypatch, encoder, tokens, count: int) -> list[int]:
    """The Qwen2.5 token positions ComfyUI's HunyuanVideo 1.5 ``encoder`` keeps of ``tokens``: its own
    ``encode_token_weights``, the language model's output replaced by each token's position."""
    from comfy.text_encoders import qwen_image

    def positions(self, pairs):
        return torch.arange(count).float()[None, :, None], None, {"attention_mask": torch.ones(1, count)}

    monkeypatch.setattr(qwen_image.sd1_clip.SD1ClipModel, "encode_token_weights", positions)
    return encoder.encode_token_weights(tokens)[0][0, :, 0].long().tolist()


@pytest.mark.parametrize("mask_source", ["static", "rmpm", "qk"])
def test_patched_forward_equals_fleximmt_hunyuan15_transformer(transformer, patcher, clip, prompt_len, mask_source):
    """Two evaluations (two noise levels; RMPM updates the masks in between from features each side
    captured itself), a batch of one unconditional and one conditional row, SigLIP and ByT5 tokens
    before the prompt's."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source=mask_source)
    patch = patch_of(patched)
    state, schedule = library(transformer, objects, patch.spans, prompt_len, mask_source, patch.concept_spans)
    x, t, context, byt5, image, _ = inputs(prompt_len, batch=2)
    unpatched = comfy(patcher, x, t, context, byt5, image)
    for step, sigma in enumerate([0.5, 0.4]):
        if step:
            schedule.step_end(step - 1)
        ours = comfy(patched, x, t, context, byt5, image, sigma=sigma, cond_or_uncond=(1, 0))
        theirs = library_forward(transformer, state, x, t, context, byt5, image, rows=[0, 0], feature_rows=[1])
        assert relative_error(ours, theirs) < 1e-4
        assert relative_error(ours, unpatched) > 1e-3  # the motion tokens changed the result
        assert torch.equal(patch.run.state.layouts.video_masks[0], state.layouts.video_masks[0])
    if mask_source == "rmpm":
        masks = state.layouts.video_masks[0].view(2, FRAMES, -1)
        assert patch.run.steps == 1 and not torch.equal(masks[:, 1], masks[:, 0])


def test_padded_text_is_closed_as_in_fleximmt(transformer, patcher, clip, prompt_len):
    """A Qwen2.5 text whose last tokens are padding (ComfyUI's attention_mask): the padding closed to
    every query, motion words placed before it, as fleximmt's processors do; one call per branch."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="rmpm")
    state, schedule = library(transformer, objects, patch_of(patched).spans, prompt_len, "rmpm")
    x, t, context, _, _, mask = inputs(prompt_len, seed=6, padding=5)
    for step, sigma in enumerate([0.5, 0.4]):
        if step:
            schedule.step_end(step - 1)
        ours = comfy(patched, x, t, context, None, None, mask, sigma=sigma, cond_or_uncond=(0,))
        theirs = library_forward(transformer, state, x, t, context, None, None, mask, rows=[0], feature_rows=[0])
        assert relative_error(ours, theirs) < 1e-4


def test_the_patch_keeps_working_when_comfyui_recreates_or_streams_the_weights(transformer, patcher, clip, prompt_len):
    """comfy_native.check_across_weight_changes: weights re-created, a fresh clone, a partial load."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher.clone(), clip, PROMPT, objects, mask_source="rmpm")
    state, schedule = library(transformer, objects, patch_of(patched).spans, prompt_len, "rmpm")
    x, t, context, byt5, image, _ = inputs(prompt_len, batch=2, seed=4)
    check_across_weight_changes(
        patched,
        schedule,
        lambda model, sigma: comfy(model, x, t, context, byt5, image, sigma=sigma, cond_or_uncond=(1, 0)),
        lambda: library_forward(transformer, state, x, t, context, byt5, image, rows=[0, 0], feature_rows=[1]),
    )


def test_without_objects_the_patch_is_comfyuis_model_exactly(patcher, clip, prompt_len):
    from fleximmt.apps.comfy.native import apply_fleximmt

    patched = apply_fleximmt(patcher, clip, PROMPT, None)
    x, t, context, byt5, image, _ = inputs(prompt_len, batch=2, seed=3)
    for sigma in (0.9, 0.8):
        assert torch.equal(
            comfy(patched, x, t, context, byt5, image, sigma=sigma, cond_or_uncond=(0, 1)),
            comfy(patcher, x, t, context, byt5, image, sigma=sigma, cond_or_uncond=(0, 1)),
        )


def test_a_motion_learned_by_fleximmt_on_diffusers_hunyuan15_drives_comfyuis(clip, prompt_len, tmp_path):
    """``train_motion`` on diffusers' HunyuanVideo 1.5 pipeline (tiny components around a transformer of
    ComfyUI's shape: ``comfy_shaped_components``), the motion loaded from its file, patches ComfyUI's
    model of the same weights."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    from fleximmt.apps.comfy.native import apply_fleximmt

    components = comfy_shaped_components(1)
    transformer = components["transformer"]
    pipe = HunyuanVideo15ImageToVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    motion = learn_jump(pipe, tmp_path / "jump.safetensors", SIZE, 9)
    assert motion.family == "hunyuanvideo15"
    objects = (ObjectMotion(box(SIZE, 2, 16, 2, 16), motion, "jumps up"),)
    patcher = comfy_model(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="static")
    x, t, context, byt5, image, _ = inputs(prompt_len, seed=5)
    state, _ = library(transformer, objects, patch_of(patched).spans, prompt_len)
    ours = comfy(patched, x, t, context, byt5, image)
    theirs = library_forward(transformer, state, x, t, context, byt5, image, rows=[0], feature_rows=[0])
    assert relative_error(ours, theirs) < 1e-4
    assert relative_error(ours, comfy(patcher, x, t, context, byt5, image)) > 1e-5


def test_bad_inputs_are_refused_by_name(transformer, patcher, clip, prompt_len):
    from fleximmt.apps.comfy.native import apply_fleximmt

    objects = make_objects(transformer)
    wan = ObjectMotion(box(SIZE, 0, 10, 0, 10), MotionTokens(torch.zeros(2, 4, 128), family="wan"), "slides left")
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: this motion was learned on Wan"):
        apply_fleximmt(patcher, clip, PROMPT, (objects[0], wan))
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: motion words 'dances wildly' were not found"):
        apply_fleximmt(patcher, clip, PROMPT, make_objects(transformer, words=["jumps up", "dances wildly"]))
    with pytest.raises(FlexiMMTInputError, match=r"^object 1: motion words 'Jumps up' are not in the prompt"):
        apply_fleximmt(patcher, clip, PROMPT, make_objects(transformer, words=["Jumps up", "slides left"]))
    patched = apply_fleximmt(patcher, clip, PROMPT, objects)
    x, t, context, byt5, image, _ = inputs(prompt_len)
    with pytest.raises(FlexiMMTInputError, match="reference latent"):
        comfy(patched, x, t, context, byt5, image, ref_latent=x[:, :32])
    with pytest.raises(FlexiMMTInputError, match=f"the conditional text has {prompt_len + 3} tokens"):
        comfy(patched, x, t, torch.cat([context, context[:, :3]], 1), byt5, image)
