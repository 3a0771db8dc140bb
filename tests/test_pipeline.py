"""FlexiMMTPipeline on tiny random-weight CogVideoX models: what is particular to CogVideoX's joint attention
and the pipeline's inputs (test_contract.py holds what every family does)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fleximmt import MotionTokens, ObjectMotion
from fleximmt.method.kernels.grouped import GroupedJoint
from fleximmt.models.cogvideox import FlexiMMTAttnProcessor
from fleximmt.toy import random_motion, tiny_pipeline

PROMPT = "A ball jumps up. A box slides left. A cat spins around."
WORDS = ["jumps up", "slides left", "spins around"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


def box(y0, y1, x0, x1, size=32):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def objects(pipe, count=2, d_m=4, masks=None):
    masks = masks or [box(2, 14, 2, 14), box(10, 30, 12, 30), box(0, 32, 0, 32)]
    return [
        ObjectMotion(masks[k], random_motion(pipe.transformer, d_m, seed=k + 1, scale=4.0), WORDS[k])
        for k in range(count)
    ]


def run(pipe, image, seed=0, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe(
        image=image,
        prompt=PROMPT,
        guidance_scale=kw.pop("guidance_scale", 6.0),
        max_sequence_length=16,
        output_type=kw.pop("output_type", "latent"),
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "settings",
    [
        dict(count=3, context_text="closed"),
        dict(count=3, parts=("m2v", "t2m")),
        dict(count=2, parts=()),
        dict(count=2, mask_source="static", guidance_scale=1.0),
    ],
)
def test_auto_backend_agrees_with_dense_reference_in_the_joint_forms_settings(pipe, image, settings):
    # the joint form's own MDMA settings (context_text, the text-query parts), three objects, one batch
    # row without guidance; the settings of every family are in test_contract.py
    settings = dict(settings)
    objs = objects(pipe, settings.pop("count", 2))
    auto = run(pipe, image, objects=objs, return_masks=True, **settings)
    dense = run(pipe, image, objects=objs, mask_kernel="dense", return_masks=True, **settings)
    assert rel(auto.frames, dense.frames) < 1e-4
    assert torch.equal(auto.masks, dense.masks)


def test_object_motion_stays_in_its_object_when_masks_are_static(pipe, image):
    # K = 1, static mask, all parts on: a video token outside the mask never reads the motion tokens
    # and the motion words; swapping the motion changes attention output only inside the object
    # on the first block (later blocks mix through video-video attention, which MDMA leaves open).
    objs = objects(pipe, 1)
    captured = {}

    def grab(module, args, kwargs, output):
        captured.setdefault(
            kwargs.get("fleximmt").videos[0].motion_tokens[0, 0, 0, 0, 0].item(), output[0].detach().clone()
        )

    handle = pipe.transformer.transformer_blocks[0].attn1.register_forward_hook(grab, with_kwargs=True)
    try:
        run(pipe, image, objects=objs, mask_source="static", num_inference_steps=1)
        objs[0].motion = random_motion(pipe.transformer, 4, seed=42, scale=4.0)
        run(pipe, image, objects=objs, mask_source="static", num_inference_steps=1)
    finally:
        handle.remove()
    a, b = captured.values()
    grid = pipe.token_grid(32, 32, 9)
    inside = torch.from_numpy(box(2, 14, 2, 14))
    token_mask = (
        torch.nn.functional.interpolate(inside[None, None].float(), (grid.height, grid.width), mode="area")[0, 0] >= 0.5
    )
    token_mask = token_mask.reshape(-1).repeat(grid.frames)
    diff = (a - b).abs().amax(dim=(0, 2))
    assert diff[~token_mask].max() < 1e-6
    assert diff[token_mask].min() > 1e-6


def test_auto_backend_builds_no_square_mask_and_prepares_masks_once_per_step(pipe, image, monkeypatch):
    shapes, layouts = [], []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):  # positional (the text encoder) or by name (diffusers' dispatcher)
        q, k, v = [*args, *(kw.pop(name) for name in ("query", "key", "value") if name in kw)]
        shapes.append((q.shape[2], k.shape[2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    real_layout = GroupedJoint.__init__

    def count(self, *args):
        layouts.append(1)
        real_layout(self, *args)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(GroupedJoint, "__init__", count)
    steps = 4
    run(pipe, image, objects=objects(pipe, 3), num_inference_steps=steps)
    n_video = pipe.token_grid(32, 32, 9).size
    total = 16 + 3 * 4 + n_video
    shapes = [s for s in shapes if s[1] > 16]  # the transformer's calls, not the text encoder's
    masked = [s for s in shapes if s[2] is not None]
    # one masked call per block: the text rows plus at most half of the video rows (small groups)
    assert masked and all(m[-1] == total and 16 <= m[-2] <= 16 + n_video // 2 for _, _, m in masked)
    assert all(q <= 16 + n_video // 2 or mask is None for q, _, mask in shapes)
    assert len(layouts) <= steps + 1  # once before the loop, then once per step - never per block
    blocks = pipe.transformer.config.num_layers
    assert len(masked) == steps * blocks


def test_rmpm_features_come_from_the_ordinary_forward(pipe, image):
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        run(pipe, image, num_inference_steps=3)
        plain_calls = len(calls)
        calls.clear()
        out = run(pipe, image, objects=objects(pipe), num_inference_steps=3, return_masks=True)
    finally:
        handle.remove()
    assert len(calls) == plain_calls == 3
    grid = pipe.token_grid(32, 32, 9)
    assert out.masks.shape == (1, 3, 2, grid.frames, grid.height, grid.width)
    first = out.masks[0, 0]
    assert torch.equal(first[:, 1], first[:, 0])  # step 0 uses the first-frame masks on every frame
    assert torch.equal(out.masks[0, :, :, 0], first[None, :, 0].expand(3, -1, -1, -1))  # frame 1 is the user's


def test_dynamic_rmpm_freezes_masks_after_the_first_steps(pipe, image):
    every_step = run(pipe, image, objects=objects(pipe), num_inference_steps=9, return_masks=True).masks[0]
    assert any(not torch.equal(every_step[s], every_step[6]) for s in range(7, 9))
    masks = run(pipe, image, objects=objects(pipe), num_inference_steps=9, alpha=0.99, return_masks=True).masks[0]
    # always updated for 5 steps; then a change below 99% freezes every mask
    assert not torch.equal(masks[4], masks[0])
    assert all(torch.equal(masks[s], masks[6]) for s in range(6, 9))


def test_a_motion_given_by_its_file_equals_the_motion_itself(pipe, image, tmp_path):
    motion_path = tmp_path / "m.safetensors"
    objs = objects(pipe)
    objs[0].motion.metadata.update(name="jump", caption="A ball jumps up .", motion_words="jumps up", steps=7)
    objs[0].motion.save(motion_path)
    from_file = [ObjectMotion(objs[0].mask, str(motion_path), WORDS[0]), objs[1]]
    assert torch.equal(run(pipe, image, objects=from_file).frames, run(pipe, image, objects=objs).frames)


def test_motion_file_round_trip_and_corrupt_files(tmp_path):
    tokens = torch.randn(3, 5, 7)
    m = MotionTokens(
        tokens,
        name="yoga",
        caption="A man is doing yoga.",
        concept_words="man",
        motion_words="is doing yoga",
        base_model="tiny",
        steps=12,
    )
    path = m.save(tmp_path / "yoga.safetensors")
    back = MotionTokens.load(path)
    assert torch.equal(back.tokens, tokens)
    assert back.metadata == m.metadata and back.d_m == 5 and back.motion_words == "is doing yoga"
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        MotionTokens.load(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fleximmt motion"):
        MotionTokens.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        MotionTokens.load(tmp_path / "missing.safetensors")


def test_mask_kernel_picks_the_kernel_and_its_old_name_attention_backend_warns_then_does_the_same(pipe, image):
    """``mask_kernel`` (FlexiMMT's option, not diffusers' attention backend) picks the layouts the state
    builds; ``attention_backend=``, its name before, warns that it is deprecated, naming the new one, and
    runs exactly what ``mask_kernel=`` runs - in the pipeline's call and in ``TransferOptions``."""
    from fleximmt.method.kernels.dense import DenseJoint
    from fleximmt.method.pipeline import OPTIONS, TransferOptions

    built = []
    real = DenseJoint.__init__

    def spy(self, *args):
        built.append(1)
        real(self, *args)

    objs = objects(pipe)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DenseJoint, "__init__", spy)
        new = run(pipe, image, objects=objs, num_inference_steps=2, mask_kernel="dense").frames
        assert built  # the dense kernel's layouts
        with pytest.warns(FutureWarning, match=r"attention_backend='dense' is deprecated .* use mask_kernel='dense'"):
            old = run(pipe, image, objects=objs, num_inference_steps=2, attention_backend="dense").frames
    assert torch.equal(old, new)
    assert "mask_kernel" in OPTIONS and "attention_backend" not in OPTIONS  # the signature shows the new name only
    with pytest.warns(FutureWarning, match="use mask_kernel='flex'"):
        assert TransferOptions(attention_backend="flex").mask_kernel == "flex"
    with pytest.raises(ValueError, match="attention_backend and mask_kernel both given"):
        run(pipe, image, objects=objs, num_inference_steps=1, mask_kernel="dense", attention_backend="dense")


def test_bad_input_raises_value_errors_that_name_the_fix(pipe, image, tmp_path):
    good = objects(pipe)
    cases = [
        (dict(objects=[ObjectMotion(box(0, 8, 0, 8), good[0].motion, "flies away")]), "were not found"),
        (dict(objects=[ObjectMotion(box(0, 8, 0, 8), MotionTokens(torch.zeros(2, 4, 8)), "jumps up")]), "width 8"),
        (dict(objects=[ObjectMotion(box(0, 8, 0, 8), MotionTokens(torch.zeros(5, 4, 32)), "jumps up")]), "5 blocks"),
        (dict(objects=[ObjectMotion(box(0, 8, 0, 8, size=48), good[0].motion, "jumps up")]), "48 x 48"),
        (dict(objects=good[:1] * 9), "at most 8"),
        (dict(objects=good, height=48), "learned positional embeddings for 32 x 32"),
        (dict(objects=good, mask_source="sam"), "mask_source"),
        (dict(objects=good, parts=("m2x",)), "unknown MDMA part"),
        (dict(objects=good, mask_kernel="flash"), "mask_kernel"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run(pipe, image, num_inference_steps=1, **kwargs)
    with pytest.raises(ValueError, match="does not exist"):
        ObjectMotion(str(tmp_path / "nope.png"), good[0].motion, "jumps up")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="not a readable image"):
        ObjectMotion(str(tmp_path / "broken.png"), good[0].motion, "jumps up")


def test_messages_about_one_object_start_with_its_number(pipe, image):
    import pickle

    from fleximmt.errors import ObjectInputError

    good = objects(pipe, 3)
    narrow = ObjectMotion(box(0, 8, 0, 8), MotionTokens(torch.zeros(2, 4, 8)), "slides left")
    cases = [
        (
            [good[0], ObjectMotion(box(0, 8, 0, 8), good[1].motion, "flies away")],
            "object 2: motion words 'flies away' were not found among the tokens of the prompt",
        ),
        ([good[0], narrow], "object 2: motion tokens are for a model with 2 blocks of width 8"),
        (
            [*good[:2], ObjectMotion(box(0, 8, 0, 8, size=48), good[2].motion, "spins around")],
            "object 3: the mask is 48 x 48",
        ),
        ([good[0], "walk.safetensors"], "object 2: it is a str: give fleximmt.ObjectMotion(mask, motion, motion_text)"),
    ]
    for objs, message in cases:
        with pytest.raises(ObjectInputError) as err:
            run(pipe, image, num_inference_steps=1, objects=objs)
        assert str(err.value).startswith(message), str(err.value)
        assert str(err.value).count("object ") == 1  # numbered once
    copy = pickle.loads(pickle.dumps(err.value))  # as a distributed run's processes pass it on
    assert (str(copy), copy.number) == (str(err.value), 2)


def test_an_empty_prompt_is_named_as_such(pipe, image):
    with pytest.raises(ValueError) as err:
        pipe(
            image=image,
            prompt="",
            objects=objects(pipe, 2),
            num_inference_steps=1,
            max_sequence_length=16,
            output_type="latent",
        )
    assert str(err.value) == (
        "the prompt is empty, so the motion words 'jumps up' are not in it: write a prompt that "
        "describes the scene and holds each object's motion words as they are, e.g. "
        "'A dog jumps up.'"
    )


def test_an_empty_object_mask_is_refused_in_every_prompts_objects(pipe, image):
    from fleximmt.errors import ObjectInputError

    good = objects(pipe, 2)
    empty = objects(pipe, 2, masks=[box(2, 14, 2, 14), box(0, 0, 0, 0)])
    with pytest.raises(ObjectInputError, match=r"^object 2: the mask is empty"):
        pipe(
            image=[image, image],
            prompt=[PROMPT, PROMPT],
            objects=[good, empty],  # the second prompt's object 2
            num_inference_steps=1,
            max_sequence_length=16,
            output_type="latent",
        )


def test_mask_png_paths_and_pil_masks_are_accepted(pipe, tmp_path):
    Image.fromarray(box(2, 14, 2, 14).astype(np.uint8) * 255).save(tmp_path / "m.png")
    motion = random_motion(pipe.transformer, 4)
    from_png = ObjectMotion(str(tmp_path / "m.png"), motion, "jumps up").mask_tensor
    from_pil = ObjectMotion(Image.open(tmp_path / "m.png"), motion, "jumps up").mask_tensor
    assert torch.equal(from_png, torch.from_numpy(box(2, 14, 2, 14))) and torch.equal(from_pil, from_png)


def test_release_style_step_zero_has_no_masks_then_rmpm_takes_over(pipe, image):
    out = run(pipe, image, objects=objects(pipe), initial_masks="none", return_masks=True)
    assert not out.masks[0, 0].any() and out.masks[0, 1].any()
    first = run(pipe, image, objects=objects(pipe), return_masks=True)
    assert rel(out.frames, first.frames) > 1e-6  # the step-0 choice matters
    with pytest.raises(ValueError, match="initial_masks"):
        run(pipe, image, objects=objects(pipe), initial_masks="sam")


def test_sizes_and_text_length_default_to_the_models_own(pipe, image):
    ours = pipe(
        image=image,
        prompt=PROMPT,
        objects=objects(pipe),
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    explicit = run(pipe, image, objects=objects(pipe), num_inference_steps=2, height=32, width=32, num_frames=9)
    assert torch.equal(ours, explicit.frames)


@pytest.mark.parametrize("backend", ["auto", "dense"])
@pytest.mark.parametrize("fused", [False, True])
def test_processor_equals_the_release_layout_brute_force(pipe, backend, fused):
    """One block's attention with objects against the release's form written out from Eqs. 2-11:
    tokens ``[text | motion | video]``, motion tokens through the block's own ``to_q/k/v`` and
    QK-norm (no RoPE), RoPE on the video rows only, the dense MDMA mask, one SDPA, ``to_out``. The
    processor orders its tokens video first and projects the motion tokens with the rest."""
    from diffusers.models.embeddings import apply_rotary_emb

    from fleximmt.method.attention import motion_state_for
    from fleximmt.method.masks import mdma_dense, span_membership

    attn = pipe.transformer.transformer_blocks[1].attn1
    gen = torch.Generator().manual_seed(3)
    dim, text_len, n_video, d_m, heads = attn.to_q.in_features, 6, 20, 3, attn.heads
    head_dim = dim // heads
    hidden, text = torch.randn(2, n_video, dim, generator=gen), torch.randn(2, text_len, dim, generator=gen)
    angles = torch.rand(n_video, head_dim // 2, generator=gen) * 6
    rotary = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    spans = [[1, 2], [4]]
    member = span_membership(text_len, spans)
    video_masks = torch.rand(2, n_video, generator=gen) < 0.5
    tokens = torch.randn(2, 1, len(pipe.transformer.transformer_blocks), d_m, dim, generator=gen)
    state = motion_state_for(tokens, member, mask_kernel=backend)
    state.set_video_masks(video_masks)
    if fused:
        attn.fuse_projections()
        assert attn.fused_projections
    try:
        with torch.no_grad():
            video_out, text_out = FlexiMMTAttnProcessor(1)(attn, hidden, text, image_rotary_emb=rotary, fleximmt=state)
    finally:
        if fused:
            attn.fused_projections = False  # the separate to_q/to_k/to_v were kept
    motion = tokens[:, 0, 1].reshape(-1, dim).expand(2, -1, -1)

    def heads_of(x, linear, norm):
        x = linear(x).view(2, -1, heads, head_dim).transpose(1, 2)
        return norm(x) if norm is not None else x

    with torch.no_grad():
        q, k, v = (
            [heads_of(x, lin, norm) for x in (text, motion, hidden)]
            for lin, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))
        )
        q[2], k[2] = apply_rotary_emb(q[2], rotary), apply_rotary_emb(k[2], rotary)
        mask = mdma_dense(text_len, spans, d_m, video_masks)
        out = F.scaled_dot_product_attention(torch.cat(q, 2), torch.cat(k, 2), torch.cat(v, 2), attn_mask=mask)
        out = attn.to_out[0](out.transpose(1, 2).reshape(2, -1, dim))
    m_len = 2 * d_m
    assert torch.allclose(text_out, out[:, :text_len], atol=1e-5)
    assert torch.allclose(video_out, out[:, text_len + m_len :], atol=1e-5)
