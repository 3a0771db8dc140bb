"""FlexiMMT Learn Motion (native) on ComfyUI's Wan 2.1 and Wan 2.2 A14B (``fleximmt.apps.comfy.learn``), at the
model level: tiny Wan image-to-video pipelines made by diffusers, their transformers saved under ComfyUI's key
names and loaded by ComfyUI's own loader (Wan 2.2: both experts, each its own MODEL). The library's loop trains
the tokens through ComfyUI's forward and ends on the tokens ``train_motion`` learns on diffusers' pipeline of
the same weights, the reference, seed and settings the same; Wan 2.2's motion holds one token set per expert,
each trained on the noise levels its expert denoises. Runs on ComfyUI 0.33 and 0.3.64."""

import pytest
from comfy_learn import jumping_square, library_and_native
from comfy_native import relative_error
from comfy_wan import SHAPE, TokenizerClip, comfy_model, import_comfy

from fleximmt.training.train import Conditions

pytestmark = pytest.mark.comfy

SIZE, FRAMES = 32, 9  # pixels (the tiny Wan VAE's 8x: 4 x 4 latents, 2 x 2 tokens); video frames (3 latent frames)
SETTINGS = dict(size=SIZE, frames=FRAMES, max_windows=2, seed=1)


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def version(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(version):
    from fleximmt.toy.tiny import tiny_wan_pipeline

    import_comfy()
    return tiny_wan_pipeline(0, version=version, **SHAPE)


def shifted(patcher, shift: float):
    """The MODEL with ComfyUI's *ModelSamplingSD3* at ``shift`` (the tiny pipeline's scheduler's flow shift)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(patcher, shift)[0]


@pytest.fixture(scope="module")
def patchers(pipe):
    shift = pipe.scheduler.config.flow_shift
    experts = [pipe.transformer] + ([pipe.transformer_2] if pipe.transformer_2 is not None else [])
    return [shifted(comfy_model(transformer), shift) for transformer in experts]


def vae():
    from comfy_learn import VaeShape

    return VaeShape(16, 8)


def native_conditions(cond):
    """The library's encoded reference as ComfyUI's Wan takes it: the latents as they are ([W, C, F, h, w]), the
    frame mask and image latents as the concatenated condition, the umT5 features as the text, Wan 2.1's CLIP
    image features per window."""
    t = cond.tensors
    tensors = {"video_latents": t["video_latents"], "c_concat": t["condition"], "c_crossattn": t["prompt_embeds"]}
    if "image_embeds" in t:
        tensors["clip_fea"] = t["image_embeds"]
    return Conditions(tensors, cond.member, cond.concept_member)


def test_tokens_learned_on_comfyuis_wan_equal_train_motions(pipe, patchers, version, tmp_path):
    """Four steps: DMEM's masks in every block, two windows, image dropout, the frame-difference term,
    gradient checkpointing through ComfyUI's blocks; Wan 2.2 draws its expert by the noise level as the
    library does (boundary 0.875). The tokens agree to 1e-5 (ComfyUI's and diffusers' blocks sum in other
    orders; AdamW's normalised steps carry that into the tokens)."""
    video = jumping_square(SIZE, FRAMES + 4)
    boundary = pipe.config.boundary_ratio
    library, native, first = library_and_native(
        pipe,
        patchers,
        TokenizerClip(),
        vae(),
        native_conditions,
        tmp_path,
        video,
        steps=4,
        gradient_checkpointing=True,
        native=dict(boundary=boundary),
        **SETTINGS,
    )
    experts = len(patchers)
    assert native.motion.num_experts == library.motion.num_experts == experts == (2 if version == "2.2" else 1)
    ours, theirs = native.motion.expert_tokens(), library.motion.expert_tokens()
    for expert in range(experts):
        assert relative_error(theirs[expert], first[expert]) > 1e-3  # every expert's tokens trained
        assert relative_error(ours[expert], theirs[expert]) < 1e-5
    assert native.losses == pytest.approx(library.losses, rel=1e-5)
    assert native.motion.family == "wan"


def test_a_wan_model_learning_does_not_train_is_refused_by_name(tmp_path):
    """Wan 2.2 TI2V-5B takes the image as its first latent frame (no concatenated channels): refused, with the
    wrapper nodes named."""
    from fleximmt.apps.comfy.learn import learn_native
    from fleximmt.errors import FlexiMMTInputError
    from fleximmt.toy.tiny import tiny_wan_components

    import_comfy()
    transformer = tiny_wan_components(0, "2.2-ti2v", **SHAPE)["transformer"]
    patcher = comfy_model(transformer)
    with pytest.raises(FlexiMMTInputError, match="TI2V-5B"):
        learn_native(
            [patcher],
            TokenizerClip(),
            vae(),
            jumping_square(SIZE, FRAMES),
            "A ball jumps up.",
            "ball",
            "jumps up",
            tmp_path / "m.safetensors",
            num_frames=FRAMES,
        )
