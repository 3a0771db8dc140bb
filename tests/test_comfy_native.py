"""FlexiMMT native on ComfyUI's Wan (``fleximmt.apps.comfy.native``), at the model level: tiny Wan models
made by diffusers, their weights saved under ComfyUI's key names and loaded by ComfyUI's own loader.
One patched forward of ComfyUI's model equals fleximmt's own Wan transformer call (diffusers' model
with fleximmt's processors) with the same weights, inputs and objects; without objects it equals
ComfyUI's unpatched model exactly. Runs in `make test-comfy` (ComfyUI's environment)."""

from types import SimpleNamespace

import comfy_native
import numpy as np
import pytest
import torch
from comfy_native import check_across_weight_changes, learn_jump, library_state, patch_of, relative_error
from comfy_wan import SHAPE, TokenizerClip, comfy_forward, comfy_model, import_comfy

from fleximmt import MotionTokens, ObjectMotion
from fleximmt.errors import FlexiMMTInputError
from fleximmt.method.adapter import TokenGrid
from fleximmt.method.masks import CROSS_PARTS, mask_to_token_grid
from fleximmt.method.pipeline import TransferOptions
from fleximmt.models.wan import WanAdapter, slot_of
from fleximmt.toy.tiny import random_motion, tiny_wan_components

pytestmark = pytest.mark.comfy

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
SIZE, FRAMES = 64, 3  # pixels; latent frames (9 video frames)
GRID = TokenGrid(FRAMES, SIZE // 16, SIZE // 16, FRAMES, 1)
TEXT = 512  # umT5's padded length, in ComfyUI as in diffusers


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def version(request):
    return request.param


@pytest.fixture(scope="module")
def models(version):
    """(diffusers' transformer with fleximmt's processors, ComfyUI's MODEL of the same weights)."""
    import_comfy()
    components = tiny_wan_components(0, version, **SHAPE)
    transformer = components["transformer"]
    patcher = comfy_model(transformer)
    WanAdapter(SimpleNamespace(transformer=transformer, transformer_2=None)).install_processors()
    return transformer, patcher


@pytest.fixture(scope="module")
def clip():
    return TokenizerClip()


def box(y0, y1, x0, x1):
    return comfy_native.box(SIZE, y0, y1, x0, x1)


def make_objects(transformer, count=2, scale=30.0, words=WORDS):
    masks = [box(4, 30, 4, 30), box(20, 60, 28, 60), box(0, 64, 0, 20)]
    return tuple(
        ObjectMotion(masks[k], random_motion(transformer, 4, seed=k + 1, scale=scale), words[k]) for k in range(count)
    )


def inputs(version, batch=1, seed=0):
    """Noise + image latents, timestep, umT5-shaped text and (Wan 2.1) CLIP-H image features."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 36, FRAMES, SIZE // 8, SIZE // 8, generator=gen)
    context = torch.randn(batch, TEXT, SHAPE["text_dim"], generator=gen)
    clip_fea = torch.randn(batch, 257, SHAPE["image_dim"], generator=gen) if version == "2.1" else None
    return x, torch.full((batch,), 500.0), context, clip_fea


def library_run(transformer, objects, spans, options, videos=1):
    """fleximmt's own state for the diffusers transformer (``comfy_native.library_state``)."""
    return library_state(objects, spans, options, WanAdapter, transformer.config.num_layers, GRID, TEXT, videos)


def library_forward(transformer, state, x, t, context, clip_fea, rows, feature_rows):
    state.rows.begin_forward(rows, feature_rows)
    slot_of(transformer).state = state
    try:
        with torch.no_grad():
            return transformer(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=context,
                encoder_hidden_states_image=clip_fea,
                return_dict=False,
            )[0]
    finally:
        slot_of(transformer).state = None


def test_comfy_loads_the_tiny_wan_as_its_own_wan_model(models, version):
    from comfy.ldm.wan.model import WanI2VCrossAttention, WanModel

    transformer, patcher = models
    model = patcher.model.diffusion_model
    assert type(model) is WanModel and len(model.blocks) == SHAPE["num_layers"] and model.dim == 128
    assert isinstance(model.blocks[0].cross_attn, WanI2VCrossAttention) == (version == "2.1")
    x, t, context, clip_fea = inputs(version)
    plain = comfy_forward(patcher, x, t, context, clip_fea)
    with torch.no_grad():
        theirs = transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=context,
            encoder_hidden_states_image=clip_fea,
            return_dict=False,
        )[0]
    assert relative_error(plain, theirs) < 1e-4  # the same model in both formats


def test_motion_words_are_found_in_the_prompt_as_comfyui_tokenizes_it(models, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt, clip_token_ids

    transformer, patcher = models
    cases = [
        (PROMPT, WORDS),
        ("The cat (jumps) while the dog runs quickly.", ["jumps", "runs quickly"]),  # ComfyUI's weight syntax
        ("A ball jumps up. A box jumps up.", ["jumps up", "jumps up"]),  # each object its own occurrence
    ]
    for prompt, words in cases:
        objects = make_objects(transformer, 2, words=words)
        spans = patch_of(apply_fleximmt(patcher, clip, prompt, objects)).spans
        ids = clip_token_ids(clip, prompt)
        assert len(ids) == TEXT
        assert [clip.decode([ids[i] for i in span]) for span in spans] == words
        assert len({tuple(span) for span in spans}) == 2


@pytest.mark.parametrize("mask_source", ["static", "rmpm"])
def test_patched_forward_equals_fleximmt_wan_transformer(models, version, clip, mask_source):
    """Two evaluations (two noise levels; RMPM updates the masks in between from features each side
    captured itself), a batch of one conditional and one unconditional row, the unconditional first."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    transformer, patcher = models
    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source=mask_source)
    patch = patch_of(patched)
    options = TransferOptions(objects, mask_source, parts=CROSS_PARTS)
    options.check(WanAdapter(None))
    state, schedule = library_run(transformer, objects, patch.spans, options)
    x, t, context, clip_fea = inputs(version, batch=2)
    unpatched = comfy_forward(patcher, x, t, context, clip_fea)
    for step, sigma in enumerate([0.5, 0.4]):
        if step:
            schedule.step_end(step - 1)
        ours = comfy_forward(patched, x, t, context, clip_fea, sigma=sigma, cond_or_uncond=(1, 0))
        theirs = library_forward(transformer, state, x, t, context, clip_fea, rows=[0, 0], feature_rows=[1])
        assert relative_error(ours, theirs) < 1e-4
        assert relative_error(ours, unpatched) > 1e-3  # the motion tokens changed the result
        assert torch.equal(patch.run.state.layouts.video_masks[0], state.layouts.video_masks[0])
    first = torch.stack([mask_to_token_grid(o.mask_tensor, GRID.height, GRID.width) for o in objects]).flatten(1)
    now = state.layouts.video_masks[0].view(2, FRAMES, -1)
    assert (now[:, 0] == first).all()  # frame 1 keeps the given masks
    if mask_source == "rmpm":
        assert patch.run.steps == 1 and not torch.equal(now, first[:, None].expand_as(now))


def test_the_patch_keeps_working_when_comfyui_recreates_or_streams_the_weights(models, version, clip):
    """comfy_native.check_across_weight_changes: weights re-created, a fresh clone, a partial load."""
    from fleximmt.apps.comfy.native import apply_fleximmt

    transformer, patcher = models
    objects = make_objects(transformer)
    patched = apply_fleximmt(patcher.clone(), clip, PROMPT, objects, mask_source="rmpm")
    options = TransferOptions(objects, "rmpm", parts=CROSS_PARTS)
    state, schedule = library_run(transformer, objects, patch_of(patched).spans, options)
    x, t, context, clip_fea = inputs(version, batch=2, seed=4)
    check_across_weight_changes(
        patched,
        schedule,
        lambda model, sigma: comfy_forward(model, x, t, context, clip_fea, sigma, (1, 0)),
        lambda: library_forward(transformer, state, x, t, context, clip_fea, rows=[0, 0], feature_rows=[1]),
    )


def test_without_objects_the_patch_is_comfyuis_model_exactly(models, version, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt

    _, patcher = models
    patched = apply_fleximmt(patcher, clip, PROMPT, None)
    x, t, context, clip_fea = inputs(version, batch=2, seed=3)
    for sigma in (0.9, 0.8):
        assert torch.equal(
            comfy_forward(patched, x, t, context, clip_fea, sigma, (0, 1)),
            comfy_forward(patcher, x, t, context, clip_fea, sigma, (0, 1)),
        )


def test_the_original_model_stays_unpatched(models, version, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt

    transformer, patcher = models
    before = dict(patcher.model_options["transformer_options"].items())
    apply_fleximmt(patcher, clip, PROMPT, make_objects(transformer))
    assert patcher.model_options["transformer_options"] == before
    assert "diffusion_model" not in patcher.wrappers


def test_a_motion_learned_by_fleximmt_on_diffusers_wan_drives_comfyuis_experts(clip, tmp_path):
    """Wan 2.2 A14B's two experts: a motion trained by ``train_motion`` on the diffusers pipeline,
    loaded from its file, patches ComfyUI's high- and low-noise models with its two token sets."""
    from diffusers import WanImageToVideoPipeline

    from fleximmt.apps.comfy.native import apply_fleximmt

    components = tiny_wan_components(0, "2.2", **SHAPE)
    pipe = WanImageToVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    motion = learn_jump(pipe, tmp_path / "jump.safetensors", SIZE, 9)
    assert motion.num_experts == 2 and motion.family == "wan"
    objects = (ObjectMotion(box(4, 30, 4, 30), motion, "jumps up"),)
    x, t, context, _ = inputs("2.2", batch=1, seed=5)
    options = TransferOptions(objects, "static", parts=CROSS_PARTS)
    WanAdapter(pipe).install_processors()
    for expert, transformer in enumerate([pipe.transformer, pipe.transformer_2]):
        patcher = comfy_model(transformer)
        patched = apply_fleximmt(
            patcher, clip, PROMPT, objects, expert=["1 (high noise)", "2 (low noise)"][expert], mask_source="static"
        )
        ours = comfy_forward(patched, x, t, context)
        state, _ = library_run(transformer, objects, patch_of(patched).spans, options)
        theirs = library_forward(transformer, state, x, t, context, None, rows=[0], feature_rows=[0])
        assert relative_error(ours, theirs) < 1e-4
        assert relative_error(ours, comfy_forward(patcher, x, t, context)) > 1e-4


def test_the_mask_kernel_reaches_the_patch_and_the_wrapper_nodes_and_its_old_name_warns(models, version, clip):
    """Apply FlexiMMT's mask_kernel input builds the run's layouts with that kernel (dense: the same forward as
    auto); ``attention_backend=``, its old name, warns naming the new one; Transfer and Learn motion offer the
    same choice, and Transfer hands it to the pipeline."""
    from fleximmt.apps.comfy.native import ApplyFlexiMMT, apply_fleximmt
    from fleximmt.apps.comfy.nodes import LearnMotion, Transfer, transfer
    from fleximmt.method.kernels import MASK_KERNELS
    from fleximmt.method.kernels.dense import DenseJoint
    from fleximmt.toy import tiny_pipeline

    transformer, patcher = models
    objects = make_objects(transformer)
    x, t, context, clip_fea = inputs(version, batch=2, seed=13)
    outs = {}
    for kernel in ("auto", "dense"):
        patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="static", mask_kernel=kernel)
        outs[kernel] = comfy_forward(patched, x, t, context, clip_fea, 0.5, (1, 0))
        assert patch_of(patched).run.state.kernel.name == kernel
    assert relative_error(outs["dense"], outs["auto"]) < 1e-5
    with pytest.warns(FutureWarning, match="use mask_kernel='dense'"):
        patched = apply_fleximmt(patcher, clip, PROMPT, objects, mask_source="static", attention_backend="dense")
    assert patch_of(patched).options.mask_kernel == "dense"
    for node in (ApplyFlexiMMT, Transfer, LearnMotion):
        (given,) = [i for i in node.define_schema().inputs if i.id == "mask_kernel"]
        assert given.optional and given.options == list(MASK_KERNELS) and given.default == "auto"
    pipe = tiny_pipeline(0)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    motion = random_motion(pipe.transformer, 4, seed=1, scale=4.0)
    cog = (ObjectMotion(np.ones((32, 32), bool), motion, "jumps up"),)
    built = []
    real = DenseJoint.__init__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DenseJoint, "__init__", lambda self, *args: built.append(1) or real(self, *args))
        frames = {
            k: transfer(pipe, image, "A ball jumps up.", cog, steps=2, mask_kernel=k)[0] for k in MASK_KERNELS[:2]
        }
    assert built and relative_error(frames["dense"], frames["auto"]) < 1e-4


def test_bad_inputs_are_refused_naming_the_object(models, clip):
    from fleximmt.apps.comfy.native import apply_fleximmt

    transformer, patcher = models
    objects = make_objects(transformer)
    cog = ObjectMotion(box(0, 10, 0, 10), MotionTokens(torch.zeros(2, 4, 128), family="cogvideox"), "slides left")
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: this motion was learned on CogVideoX"):
        apply_fleximmt(patcher, clip, PROMPT, (objects[0], cog))
    small = ObjectMotion(box(0, 10, 0, 10), MotionTokens(torch.zeros(3, 4, 128), family="wan"), "slides left")
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: motion tokens are for a model with 3 blocks"):
        apply_fleximmt(patcher, clip, PROMPT, (objects[0], small))
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: motion words 'dances wildly' were not found"):
        apply_fleximmt(patcher, clip, PROMPT, make_objects(transformer, words=["jumps up", "dances wildly"]))
    with pytest.raises(FlexiMMTInputError, match="the prompt is empty"):
        apply_fleximmt(patcher, clip, "  ", objects)
    two = ObjectMotion(box(0, 10, 0, 10), random_motion(transformer, 4, experts=2), "slides left")
    with pytest.raises(FlexiMMTInputError, match=r"^object 2: the motion holds 2 experts"):
        apply_fleximmt(patcher, clip, PROMPT, (objects[0], two))
    with pytest.raises(FlexiMMTInputError, match=r"^object 1: the motion has one expert's tokens"):
        apply_fleximmt(patcher, clip, PROMPT, objects, expert="2 (low noise)")
    with pytest.raises(FlexiMMTInputError, match=r"m2m"):
        from fleximmt.apps.comfy.native import apply_fleximmt as apply

        apply(patcher, clip, PROMPT, objects, parts=("m2v", "m2m"))
    with pytest.raises(FlexiMMTInputError, match="this MODEL is a Linear"):
        apply_fleximmt(
            SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1))), clip, PROMPT, objects
        )


def diffusers_twin(transformer, comfy_weights):
    """A copy of the diffusers transformer (fleximmt's processors included) holding ``comfy_weights``
    (ComfyUI's names), in float32."""
    import copy

    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    twin = copy.deepcopy(transformer)
    weights = convert_wan_transformer_to_diffusers({k: v.float() for k, v in comfy_weights.items()})
    twin.load_state_dict(weights, strict=True)
    return twin


@pytest.mark.parametrize("kind", ["lora", "fp8"])
def test_the_patch_composes_with_comfyuis_lora_and_fp8_weights(models, version, clip, kind):
    """A LoRA from ComfyUI's LoRA loader (on the cross-attention's k and v, which project the motion
    tokens too, and on attn1's q), or the model loaded with fp8 weights: the patched forward equals
    fleximmt's Wan transformer holding the weights ComfyUI computes with (merged LoRA; fp8 values)."""
    import comfy.sd

    from fleximmt.apps.comfy.native import apply_fleximmt

    transformer, patcher = models
    if kind == "lora":
        gen = torch.Generator().manual_seed(7)
        lora = {}
        for b in range(SHAPE["num_layers"]):
            for name in (f"blocks.{b}.cross_attn.k", f"blocks.{b}.cross_attn.v", f"blocks.{b}.self_attn.q"):
                lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(128, 2, generator=gen) * 0.3
                lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, 128, generator=gen) * 0.3
        loaded, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        assert len(loaded.patches) == 3 * SHAPE["num_layers"]
        merged = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
        for key in list(merged):
            up = lora.get(f"diffusion_model.{key[: -len('.weight')]}.lora_up.weight")
            if up is not None:
                merged[key] += up @ lora[f"diffusion_model.{key[: -len('.weight')]}.lora_down.weight"]
    else:
        from comfy_wan import comfy_state_dict

        loaded = comfy.sd.load_diffusion_model_state_dict(
            comfy_state_dict(transformer), model_options={"dtype": torch.float8_e4m3fn}
        )
        assert loaded.model.diffusion_model.blocks[0].cross_attn.k.weight.dtype == torch.float8_e4m3fn
        merged = loaded.model.diffusion_model.state_dict()
    twin = diffusers_twin(transformer, merged)
    objects = make_objects(transformer)
    patched = apply_fleximmt(loaded, clip, PROMPT, objects, mask_source="static")
    options = TransferOptions(objects, "static", parts=CROSS_PARTS)
    x, t, context, clip_fea = inputs(version, seed=11)
    patched.patch_model()  # what sampling does first: LoRA patches into the weights
    try:
        ours = comfy_forward(patched, x, t, context, clip_fea)
    finally:
        patched.unpatch_model()
    state, _ = library_run(twin, objects, patch_of(patched).spans, options)
    theirs = library_forward(twin, state, x, t, context, clip_fea, rows=[0], feature_rows=[0])
    assert relative_error(ours, theirs) < 1e-4
    state, _ = library_run(transformer, objects, patch_of(patched).spans, options)
    base = library_forward(transformer, state, x, t, context, clip_fea, rows=[0], feature_rows=[0])
    assert relative_error(ours, base) > 1e-3  # the LoRA / fp8 weights are what ComfyUI ran
