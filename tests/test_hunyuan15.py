"""FlexiMMT on HunyuanVideo 1.5 image-to-video (docs/method.md#hunyuanvideo-15), on tiny random models built offline
(``fleximmt.toy.tiny_hunyuan15``): what is particular to it - the text that is image, glyph and prompt
tokens then padding (padded keys closed without an N x N mask, docs/method.md#hunyuanvideo-15's table by brute force), the
guider's branches as separate forwards, the video sized and cropped from the image, the chat template
around the prompt, DMEM's reading, its messages, loading, the command line and the web app. What every
family does (diffusers' result without objects, auto against dense, training, the loss, resume, the
signature, offload, save and load) is in test_contract.py's hunyuanvideo-1.5 row."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline
from PIL import Image
from test_attention_backends import restore_active_backend, spy  # noqa: F401 (fixtures)

from fleximmt import FlexiMMTHunyuanVideo15Pipeline, MotionTokens, ObjectMotion, load_pipeline
from fleximmt.errors import FlexiMMTInputError
from fleximmt.method.attention import FlexiMMTState, TextKeys, VideoMotions
from fleximmt.method.kernels import Mdma, mask_kernel
from fleximmt.models.hunyuan15 import HunyuanVideo15Adapter
from fleximmt.toy.tiny import random_motion, tiny_wan_components
from fleximmt.toy.tiny_hunyuan15 import tiny_hunyuan15_components

PROMPT = 'A dog jumps while a cat runs past a sign that says "Hi".'  # the quoted text gives ByT5 glyph tokens
WORDS = ["jumps", "runs"]
HEIGHT, WIDTH = 32, 48  # the image; the pipeline makes 24 x 36 videos of it (target_size 32)
CALL = dict(num_frames=9, num_inference_steps=2, output_type="latent")


@pytest.fixture(scope="module")
def pipes():
    components = tiny_hunyuan15_components(0)
    ours = FlexiMMTHunyuanVideo15Pipeline(**components)
    theirs = HunyuanVideo15ImageToVideoPipeline(**tiny_hunyuan15_components(0))  # its own processors
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def picture(seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(HEIGHT, WIDTH, 3) * 255).astype(np.uint8))


def masks():
    left, right = np.zeros((HEIGHT, WIDTH), bool), np.zeros((HEIGHT, WIDTH), bool)
    left[4:28, 2:22], right[8:30, 26:46] = True, True
    return left, right


def objects(pipe, scale=30.0, family="hunyuanvideo15"):
    return [
        ObjectMotion(mask, random_motion(pipe.transformer, 4, seed=k + 1, scale=scale, family=family), WORDS[k])
        for k, mask in enumerate(masks())
    ]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the pipeline ---------------------------------------------------------------------------
def test_no_objects_is_diffusers_exactly_with_a_negative_prompt_and_glyphs(pipes):
    ours, theirs = pipes
    kw = dict(image=picture(), prompt=PROMPT, negative_prompt="blurry", **CALL)
    assert torch.equal(ours(**kw, generator=gen()).frames, theirs(**kw, generator=gen()).frames)


def test_objects_change_the_video_and_auto_equals_dense_with_padded_text(pipes):
    """Both branches of the guider run with objects; the negative prompt pads differently from the prompt and
    has no glyphs, so the rows' text forms differ: the fast path must equal the dense reference anyway."""
    ours, theirs = pipes
    kw = dict(image=picture(), prompt=PROMPT, negative_prompt="blurry, still", **CALL)
    plain = theirs(**kw, generator=gen()).frames
    auto = ours(**kw, generator=gen(), objects=objects(ours)).frames
    dense = ours(**kw, generator=gen(), objects=objects(ours), mask_kernel="dense").frames
    assert (auto - plain).abs().max() > 1e-3
    assert ((auto - dense).abs().max() / dense.abs().max()) < 1e-4


def test_rmpm_features_come_from_the_conditional_forward_only(pipes, monkeypatch):
    ours, _ = pipes
    seen = []
    observe = FlexiMMTState.observe

    def record(self, block, video_out, rows=None):
        seen.append((block, self.rows.feature_rows is not None))
        return observe(self, block, video_out, rows)

    monkeypatch.setattr(FlexiMMTState, "observe", record)
    out = ours(image=picture(), prompt=PROMPT, objects=objects(ours), return_masks=True, **CALL, generator=gen())
    blocks = ours.transformer.config.num_layers
    assert len(seen) == 2 * 2 * blocks  # 2 steps x (conditional, unconditional) forwards x blocks
    assert [capturing for _, capturing in seen] == ([True] * blocks + [False] * blocks) * 2
    assert out.masks.shape == (1, 2, 2, 3, 6, 9)  # videos, steps, objects, token frames, 24/4 x 36/4


def test_a_step_callback_runs_each_step_though_diffusers_pipeline_has_none(pipes):
    ours, _ = pipes
    steps = []
    ours(
        image=picture(),
        prompt=PROMPT,
        objects=objects(ours),
        **CALL,
        generator=gen(),
        callback_on_step_end=lambda pipe, step, t, kw: steps.append(step),
    )
    assert steps == [0, 1]
    with pytest.raises(ValueError, match="returned tensors"):
        ours(image=picture(), prompt=PROMPT, **CALL, callback_on_step_end=lambda *a: {"latents": 0})


def test_masks_are_cropped_as_the_image_is():
    """The pipeline resizes the image to cover the video's size and cuts the middle: a mask drawn as the
    image's own white region must land where the pipeline's resized image has it."""
    pipe = FlexiMMTHunyuanVideo15Pipeline(**tiny_hunyuan15_components(0))
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[5:20, 30:44] = True
    image = Image.fromarray((mask[..., None] * 255).repeat(3, 2).astype(np.uint8))
    height, width, _ = pipe.adapter.call_size({"image": image, "num_frames": 9})
    assert (height, width) == (24, 36)
    shown = np.asarray(pipe.video_processor.resize(image, height=height, width=width, resize_mode="crop"))[..., 0] > 127
    ours = pipe.adapter.frame_mask(torch.from_numpy(mask), height, width).numpy()
    assert ours.shape == shown.shape and (ours == shown).mean() > 0.97


# -- MDMA with padded text: docs/method.md#hunyuanvideo-15's table, brute force -------------------------------------
def brute_force_mask(member, owner, video_masks, valid, parts, context_text="open"):
    """Section 10's rules pair by pair over ``[text | motion | video]``: ``member`` [K, L] motion words,
    ``owner`` [K, M] motion tokens, ``video_masks`` [K, V], ``valid`` [L] text that is not padding."""
    _K, L = member.shape
    M, V = owner.shape[1], video_masks.shape[1]
    kind = ["text"] * L + ["motion"] * M + ["video"] * V
    objs = [set(member[:, i].nonzero().flatten().tolist()) for i in range(L)]
    objs += [set(owner[:, j].nonzero().flatten().tolist()) for j in range(M)]
    objs += [set(video_masks[:, v].nonzero().flatten().tolist()) for v in range(V)]
    n = L + M + V
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            pair = {kind[q], kind[k]}
            if (kind[q] == "text" and not valid[q]) or (kind[k] == "text" and not valid[k]):
                allowed = False  # padding: closed to and from everything
            elif pair == {"video"}:
                allowed = True
            elif pair == {"motion", "video"}:
                allowed = "m2v" not in parts or bool(objs[q] & objs[k])
            elif pair == {"motion"}:
                allowed = "m2m" not in parts
            elif pair == {"text", "video"}:
                word = objs[q] if kind[q] == "text" else objs[k]
                place = objs[k] if kind[q] == "text" else objs[q]
                allowed = "t2v" not in parts or (bool(word & place) if word else context_text == "open")
            elif pair == {"text"}:
                allowed = "t2t" not in parts or not (objs[q] and objs[k] and not objs[q] & objs[k])
            else:  # text and motion
                word = objs[q] if kind[q] == "text" else objs[k]
                motion = objs[k] if kind[q] == "text" else objs[q]
                allowed = "t2m" not in parts or bool(word & motion)
            out[q, k] = allowed
        if not out[q].any():
            out[q, q] = True
    return out


@pytest.mark.parametrize("parts", [("m2v", "m2m", "t2v", "t2t", "t2m"), ("m2v", "t2v")])
@pytest.mark.parametrize("context_text", ["open", "closed"])
def test_the_dense_mask_with_padded_text_is_the_brute_force_table(parts, context_text):
    generator = torch.Generator().manual_seed(3)
    K, prompt_len, text_len, d_m, V = 2, 7, 12, 2, 10
    member = torch.zeros(K, prompt_len, dtype=torch.bool)
    member[0, 2], member[1, 4:6], member[0, 5] = True, True, True  # token 5 belongs to both objects
    video_masks = torch.rand(K, V, generator=generator) > 0.5
    text = TextKeys(offset=3, valid=3 + 6)  # 3 image/glyph tokens, 6 prompt tokens, then 3 padding
    placed, valid = text.place(member, text_len)
    mdma = Mdma(placed, d_m, video_masks, frozenset(parts), context_text, valid)
    layout = mask_kernel("dense").layout("joint", mdma)
    owner = torch.arange(K * d_m)[None] // d_m == torch.arange(K)[:, None]
    assert torch.equal(placed[:, 3:9], member[:, :6]) and not placed[:, 9:].any()  # padding is never a motion word
    assert torch.equal(layout.dense, brute_force_mask(placed, owner, video_masks, valid, parts, context_text))


def text_keys_state(backend, num_frames=2):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 1, 1, 3, 16, generator=generator)  # K=2, 1 expert, 1 block, d_m=3, dim 16
    member = torch.zeros(2, 8, dtype=torch.bool)
    member[0, 1], member[1, 3:5] = True, True
    state = FlexiMMTState(
        [VideoMotions(tokens.requires_grad_(), member)],
        form="joint",
        mask_kernel=backend,
        text_keys=True,
        num_frames=num_frames,
    )
    state.set_video_masks(torch.rand(2, 24, generator=generator) > 0.4)
    return state


def test_padded_keys_are_closed_and_auto_equals_dense_in_values_and_gradients():
    """Two rows of one video with different text forms (the prompt after 2 or 4 other tokens, padded from
    8 or 6 on): auto equals dense (float32, values and gradients), and padded keys change nothing."""
    generator = torch.Generator().manual_seed(1)
    B, H, V, L, M, d = 2, 2, 24, 12, 6, 8
    texts = [TextKeys(2, 8), TextKeys(4, 10)]
    q, k, v = (
        torch.randn(B, H, V + L + M, d, generator=generator, dtype=torch.float64).float().requires_grad_()
        for _ in range(3)
    )
    results = {}
    for backend in ("auto", "dense"):
        state = text_keys_state(backend)
        out = state.joint_attention(0, q, k.clone(), v.clone(), L, texts=texts)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        keep = torch.ones(B, 1, V + L, 1, dtype=torch.bool)
        for row, text in enumerate(texts):
            keep[row, :, V + text.valid :] = False  # a padded query's output is nobody's business
        grads = torch.autograd.grad((out * weights * keep).sum(), (q, k, v))
        results[backend] = (out * keep, grads)
    (auto, auto_grads), (dense, dense_grads) = results["auto"], results["dense"]
    assert ((auto - dense).abs().max() / dense.abs().max()) < 1e-4
    for a, b in zip(auto_grads, dense_grads):
        assert ((a - b).abs().max() / b.abs().max()) < 1e-4
    # change every padded key and value: nothing the valid queries see moves
    k2, v2 = k.detach().clone(), v.detach().clone()
    for row, text in enumerate(texts):
        k2[row, :, V + text.valid : V + L] += 5.0
        v2[row, :, V + text.valid : V + L] -= 3.0
    state = text_keys_state("auto")
    moved = state.joint_attention(0, q.detach(), k2, v2, L, texts=texts)
    keep = torch.ones_like(moved, dtype=torch.bool)
    for row, text in enumerate(texts):
        keep[row, :, V + text.valid :] = False
    assert torch.allclose(moved[keep], auto.detach()[keep], atol=1e-6)


def test_no_n_by_n_mask_reaches_attention_with_objects(pipes, monkeypatch):
    """diffusers' own processor builds a full [N, N] bool mask for the padding; FlexiMMT's calls hand
    masks only for the few text queries (and small video groups), never N x N."""
    import diffusers.models.attention_dispatch as dispatch

    ours, _ = pipes
    shapes = []
    original = dispatch.dispatch_attention_fn

    def record(query, key, value, attn_mask=None, **kw):
        shapes.append((query.shape[1], key.shape[1], None if attn_mask is None else tuple(attn_mask.shape[-2:])))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(dispatch, "dispatch_attention_fn", record)
    ours(image=picture(), prompt=PROMPT, objects=objects(ours), **{**CALL, "num_inference_steps": 1}, generator=gen())
    joint = [s for s in shapes if s[1] > 500]  # the blocks' joint calls (the refiner's text-only calls are smaller)
    n = max(s[1] for s in joint)
    assert joint and all(mask is None or mask[0] < n // 2 for _, _, mask in joint)


# -- motion words ---------------------------------------------------------------------------
def test_motion_words_are_found_after_the_chat_template(pipes):
    """The prompt sits inside Qwen's chat template; the pipeline crops the template's first 108 tokens:
    the spans index the tokens the transformer sees, and decode back to the words."""
    ours, _ = pipes
    adapter = ours.adapter
    spans = adapter.word_spans(PROMPT, WORDS, adapter.default_text_length())
    text = ours.tokenizer.apply_chat_template(
        [{"role": "system", "content": ours.system_message}, {"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"][ours.prompt_template_encode_start_idx :]
    assert [ours.tokenizer.decode([text[i] for i in span]).strip() for span in spans] == WORDS


def test_motion_words_with_qwen25s_real_tokenizer():
    comfy = Path(os.environ.get("COMFYUI") or Path(__file__).resolve().parents[2] / "shared" / "comfyui")
    folder = comfy / "comfy" / "text_encoders" / "qwen25_tokenizer"
    if not folder.is_dir():
        pytest.skip(f"Qwen2.5's tokenizer is read from ComfyUI's source, not found at {folder}")
    from transformers import AutoTokenizer

    pipe = FlexiMMTHunyuanVideo15Pipeline(**tiny_hunyuan15_components(0))
    pipe.tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = "The cat (jumps) while the dog runs; the cat's tail-wagging friend jumps too."
    spans = pipe.adapter.word_spans(prompt, ["jumps", "runs", "jumps", "tail-wagging"], 1000)
    ids = pipe.tokenizer.apply_chat_template(
        [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"][108:]
    words = [pipe.tokenizer.decode([ids[i] for i in span]).strip() for span in spans]
    assert words == ["jumps", "runs", "jumps", "tail-wagging"] and spans[0] != spans[2]


# -- training -------------------------------------------------------------------------------
def moving_square(frames=9):
    video = np.full((frames, 32, 32, 3), 90, np.uint8)
    for t in range(frames):
        x = 2 + 2 * t % 18
        video[t, 10:22, x : x + 12] = 220
    return video


# -- bad input ------------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_fix(pipes):
    ours, _ = pipes
    kw = dict(prompt=PROMPT, **CALL)
    with pytest.raises(ValueError, match=r"learned on CogVideoX image-to-video.*HunyuanVideo 1.5"):
        ours(image=picture(), objects=objects(ours, family="cogvideox"), **kw)
    wan = tiny_wan_components(0, "2.1")["transformer"]
    wan_motion = random_motion(wan, 4)
    with pytest.raises(ValueError, match="object 1: this motion was learned on Wan"):
        ours(image=picture(), objects=[ObjectMotion(masks()[0], wan_motion, "jumps")], **kw)
    with pytest.raises(ValueError, match=r"num_frames=10: HunyuanVideo 1.5 makes 4k\+1 frames; use 9 or 13"):
        ours(image=picture(), objects=objects(ours), **{**kw, "num_frames": 10})
    with pytest.raises(ValueError, match="takes a PIL image"):
        ours(image=np.asarray(picture()), objects=objects(ours), **kw)
    with pytest.raises(ValueError, match="one image per call"):
        ours(image=[picture(), picture()], objects=objects(ours), **kw)
    with pytest.raises(ValueError, match="object 2: motion words 'flies'"):
        ours(
            image=picture(),
            objects=[objects(ours)[0], ObjectMotion(masks()[1], objects(ours)[1].motion, "flies")],
            **kw,
        )
    bad = FlexiMMTHunyuanVideo15Pipeline(**tiny_hunyuan15_components(0))
    bad.transformer.register_to_config(task_type="t2v")
    with pytest.raises(ValueError, match="load an image-to-video checkpoint: hunyuanvideo-community"):
        bad(image=picture(), objects=objects(bad), **kw)


# -- loading and the command line -------------------------------------------------------------
def test_save_load_and_the_command_line(pipes, tmp_path, capsys):
    from fleximmt.apps.cli import main

    ours, _ = pipes
    ours.save_pretrained(tmp_path / "model")
    assert (
        json.loads((tmp_path / "model" / "model_index.json").read_text())["_class_name"]
        == "HunyuanVideo15ImageToVideoPipeline"
    )
    loaded = load_pipeline(tmp_path / "model")
    assert isinstance(loaded, FlexiMMTHunyuanVideo15Pipeline) and isinstance(loaded.adapter, HunyuanVideo15Adapter)
    picture().save(tmp_path / "image.png")
    Image.fromarray(masks()[0]).save(tmp_path / "dog.png")
    objects(ours)[0].motion.save(tmp_path / "jump.safetensors")
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "model"),
            "--image",
            str(tmp_path / "image.png"),
            "--prompt",
            PROMPT,
            "--object",
            f"{tmp_path / 'dog.png'}:{tmp_path / 'jump.safetensors'}:jumps",
            "--frames",
            "9",
            "--steps",
            "1",
            "--guidance",
            "3",
            "--out",
            str(tmp_path / "out.mp4"),
        ]
    )
    assert code == 0 and (tmp_path / "out.mp4").stat().st_size > 0
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "model"),
            "--image",
            str(tmp_path / "image.png"),
            "--prompt",
            PROMPT,
            "--height",
            "64",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "bad.mp4"),
        ]
    )
    assert code != 0 and "takes no height" in capsys.readouterr().err
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "ref.mp4", moving_square(), fps=8, codec="libx264")
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "model"),
            "--video",
            str(tmp_path / "ref.mp4"),
            "--caption",
            "A red ball jumps up.",
            "--concept",
            "ball",
            "--motion-words",
            "jumps up",
            "--out",
            str(tmp_path / "hop.safetensors"),
            "--steps",
            "2",
            "--tokens",
            "2",
            "--frames",
            "9",
            "--height",
            "32",
            "--width",
            "32",
        ]
    )
    assert code == 0 and MotionTokens.load(tmp_path / "hop.safetensors").family == "hunyuanvideo15"


def test_the_web_app_transfers_and_learns(pipes, tmp_path):
    """The app fits image and masks to the model's default size, runs with its Stop/progress callback
    (FlexiMMT's, the pipeline has none) and trains through train_motion."""
    import imageio.v3 as iio

    from fleximmt.apps.app import MotionLibrary, ObjectInput, TransferApp

    ours, _ = pipes
    (tmp_path / "motions").mkdir()
    objects(ours)[0].motion.save(tmp_path / "motions" / "jump.safetensors")
    Image.fromarray(masks()[0]).save(tmp_path / "mask.png")
    app = TransferApp(ours, MotionLibrary(tmp_path / "motions"), tmp_path / "out")
    seen = []
    video, overlay = app.generate(
        np.asarray(picture()),
        PROMPT,
        [ObjectInput(mask_png=str(tmp_path / "mask.png"), motion="jump", motion_words="jumps")],
        steps=2,
        seed=0,
        progress=lambda share, desc: seen.append(share),
    )
    assert seen == pytest.approx([0.5, 1.0]) and iio.imread(video).shape[1:3] == iio.imread(overlay).shape[1:3] == (
        32,
        32,
    )
    iio.imwrite(tmp_path / "ref.mp4", moving_square(121), fps=24, codec="libx264")  # the model's 121 frames
    entry = app.learn(
        str(tmp_path / "ref.mp4"), "A ball jumps up.", "ball", "jumps up", "hop", 2, 2, lambda s, _loss: None
    )
    assert MotionTokens.load(entry.path).family == "hunyuanvideo15"


def test_dmem_scores_video_queries_against_the_concept_words_keys():
    """docs/method.md#hunyuanvideo-15: in training, DMEM's mask of a block comes from the video queries against the
    concept words' keys (text stream), each frame thresholded at its mean."""
    from fleximmt.method.masks import dmem_mask

    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(1, 1, 1, 2, 16, generator=generator)
    member = torch.zeros(1, 8, dtype=torch.bool)
    member[0, 2] = True
    concept = [torch.tensor([5])]  # the concept word: prompt token 5
    state = FlexiMMTState(
        [VideoMotions(tokens, member, concept)],
        form="joint",
        dmem=True,
        text_keys=True,
        dmem_video_queries=True,
        num_frames=2,
    )
    V, L, M = 24, 12, 2
    q, k, v = (torch.randn(1, 2, V + L + M, 8, generator=generator) for _ in range(3))
    text = TextKeys(3, 11)
    state.joint_attention(0, q, k.clone(), v.clone(), L, texts=[text])
    expected = dmem_mask(k[:, :, V + 3 + 5][:, :, None], q[:, :, :V], 2)[0]
    assert torch.equal(state.layouts.video_masks[0][0], expected)
    flipped = dmem_mask(q[:, :, V + 3 + 5][:, :, None], k[:, :, :V], 2)[0]
    assert not torch.equal(expected, flipped)  # the other reading (CogVideoX's) differs here


def test_every_attention_takes_the_backend_set_on_the_model(spy, restore_active_backend):  # noqa: F811 (fixtures)
    """As on the other families (tests/test_attention_backends.py): set_attention_backend reaches
    FlexiMMT's processors, masked calls included (the backend takes masks)."""
    pipe = FlexiMMTHunyuanVideo15Pipeline(**tiny_hunyuan15_components(0))
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.set_attention_backend("_native_math")
    pipe(image=picture(), prompt=PROMPT, objects=objects(pipe), **{**CALL, "num_inference_steps": 1}, generator=gen())
    assert spy and {backend for backend, _ in spy} == {"_native_math"} and any(masked for _, masked in spy)


def test_objects_with_context_parallelism_are_refused():
    """Its joint attention needs every video key in each process (diffusers has no context-parallel plan for
    HunyuanVideo 1.5); without objects the call is diffusers' own."""
    pipe = FlexiMMTHunyuanVideo15Pipeline(**tiny_hunyuan15_components(0))
    pipe.set_progress_bar_config(disable=True)
    pipe(image=picture(), prompt=PROMPT, objects=objects(pipe), **{**CALL, "num_inference_steps": 1}, generator=gen())
    for processor in pipe.transformer.attn_processors.values():
        processor._parallel_config = object()  # what enable_parallelism leaves on them
    with pytest.raises(FlexiMMTInputError, match=r"context parallelism .* on HunyuanVideo 1.5"):
        pipe(
            image=picture(), prompt=PROMPT, objects=objects(pipe), **{**CALL, "num_inference_steps": 1}, generator=gen()
        )
