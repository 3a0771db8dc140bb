"""FlexiMMT on LTX-2 image-to-video (docs/method.md#ltx-2), on tiny random models built offline
(``fleximmt.toy.tiny_ltx2``): what is particular to it - video and audio made together (the audio left as
diffusers makes it), the guidance's three kinds of forward (CFG's rows, spatio-temporal guidance's perturbed
self-attention, modality guidance's isolated streams), the image as the first latent frame, the text
connectors' registers, motion words with a Gemma-style tokenizer under diffusers' padding and ComfyUI's, the
training step's clean first frame and silent audio, the release preset (inference options, training in the
model's precision), the two-stage flow through the latent upsampler, its messages, loading and the command line. What every family does (diffusers' result without objects, auto
against dense, training, the loss, resume, the signature, offload, save and load) is in test_contract.py's
ltx-2 row."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTX2ImageToVideoPipeline
from diffusers.pipelines.ltx2 import LTX2LatentUpsamplePipeline
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.pipeline_ltx2_image2video import calculate_shift
from PIL import Image
from test_attention_backends import restore_active_backend, spy  # noqa: F401 (fixtures)

from fleximmt import FlexiMMTLTX2ImageToVideoPipeline, MotionTokens, ObjectMotion, load_pipeline, train_motion
from fleximmt.errors import FlexiMMTInputError
from fleximmt.method.attention import FlexiMMTState
from fleximmt.models.ltx2 import LTX2Adapter, LTX2CrossAttnProcessor, LTX2SelfAttnProcessor
from fleximmt.toy.tiny import random_motion, tiny_pipeline
from fleximmt.toy.tiny_ltx2 import gemma_sentencepiece, tiny_gemma_tokenizer, tiny_ltx2_components

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
SIZE = 64
CALL = dict(height=SIZE, width=SIZE, num_frames=9, num_inference_steps=2, max_sequence_length=16, image_crf=0)
GRID = (5, 8, 8)  # latent frames x 64/8 x 64/8
COMFYUI = Path(os.environ.get("COMFYUI_033") or Path(__file__).resolve().parents[2] / "shared" / "comfyui-0.33")


def build(cls=FlexiMMTLTX2ImageToVideoPipeline, **config):
    pipe = cls(**tiny_ltx2_components(0, **config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return build(), build(LTX2ImageToVideoPipeline)  # diffusers' on components of its own


@pytest.fixture(scope="module")
def perturbed():
    """LTX-2.3's blocks (perturbed self-attention: spatio-temporal guidance acts), FlexiMMT's and diffusers'."""
    return build(perturbed_attn=True), build(LTX2ImageToVideoPipeline, perturbed_attn=True)


def picture(seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def masks():
    left, right = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    left[4:30, 4:30], right[20:60, 26:60] = True, True
    return left, right


def objects(pipe, scale=30.0, words=WORDS):
    return [
        ObjectMotion(mask, random_motion(pipe.transformer, 4, seed=k + 1, scale=scale, family="ltx2"), words[k])
        for k, mask in enumerate(masks())
    ]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- the pipeline: video and audio ------------------------------------------------------------------------
def test_no_objects_is_diffusers_video_and_audio_exactly(pipes):
    ours, theirs = pipes
    for extra in (dict(output_type="latent", negative_prompt="blurry"), dict(output_type="np")):
        kw = dict(image=picture(), prompt=PROMPT, **CALL, **extra)
        mine, ref = ours(**kw, generator=gen()), theirs(**kw, generator=gen())
        assert np.array_equal(np.asarray(mine.frames), np.asarray(ref.frames))
        assert torch.equal(mine.audio, ref.audio)


def test_objects_keep_the_audio_and_the_image_frame_and_auto_equals_dense_through_every_guidance(perturbed):
    """CFG, spatio-temporal guidance (block 1 perturbed) and modality guidance all run, with the objects; the
    audio comes back beside the masks; the first latent frame is the image's, untouched, as in diffusers."""
    ours, theirs = perturbed
    kw = dict(image=picture(), prompt=PROMPT, **CALL, output_type="latent", spatio_temporal_guidance_blocks=[1])
    plain = theirs(**kw, generator=gen())
    assert torch.equal(ours(**kw, generator=gen()).audio, plain.audio)  # diffusers' STG, through FlexiMMT's attn1
    auto = ours(**kw, generator=gen(), objects=objects(ours), return_masks=True)
    dense = ours(**kw, generator=gen(), objects=objects(ours), return_masks=True, mask_kernel="dense")
    assert rel(auto.frames, dense.frames) < 1e-4 and rel(auto.audio, dense.audio) < 1e-4
    assert torch.equal(auto.masks, dense.masks) and auto.masks.shape == (1, 2, 2, *GRID)
    assert (auto.frames[:, :, 1:] - plain.frames[:, :, 1:]).abs().max() > 1e-3
    assert torch.equal(auto.frames[:, :, 0], plain.frames[:, :, 0])  # the image's latents, never denoised
    assert auto.audio.shape == plain.audio.shape
    video, audio, step_masks = ours(**kw, generator=gen(), objects=objects(ours), return_masks=True, return_dict=False)
    assert torch.equal(video, auto.frames) and torch.equal(audio, auto.audio) and torch.equal(step_masks, auto.masks)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_rmpm_reads_the_positive_rows_of_each_steps_first_forward_only(pipes, monkeypatch, cfg):
    """A step runs CFG's forward ([negative | positive] rows; the positive alone without CFG), then spatio-
    temporal guidance's and modality guidance's forwards of the positive prompt: features come from the
    first forward's positive rows, every forward carries the objects, whose keys and values each block
    projects once in the call."""
    ours, _ = pipes
    seen, crossed, projected = [], [], []
    observe, cross, project = FlexiMMTState.observe, FlexiMMTState.cross_with, FlexiMMTState.motion_projections

    def record(self, block, video_out, rows=None):
        features = self.rows.of_batch(video_out.shape[0])[1] if self.capturing(block) else None
        seen.append((video_out.shape[0], features))
        return observe(self, block, video_out, rows)

    monkeypatch.setattr(FlexiMMTState, "observe", record)
    monkeypatch.setattr(FlexiMMTState, "cross_with", lambda self, *a, **k: crossed.append(1) or cross(self, *a, **k))
    monkeypatch.setattr(
        FlexiMMTState, "motion_projections", lambda self, *a, **k: projected.append(a[:2]) or project(self, *a, **k)
    )
    guidance = {} if cfg else dict(guidance_scale=1.0, audio_guidance_scale=1.0)
    ours(
        image=picture(), prompt=PROMPT, objects=objects(ours), **CALL, **guidance, output_type="latent", generator=gen()
    )
    blocks = ours.transformer.config.num_layers
    captured = max(1, round(0.7 * blocks))  # the first 70% of the blocks
    batch, positive = (2, [1]) if cfg else (1, [0])
    first = [(batch, positive)] * captured + [(batch, None)] * (blocks - captured)
    assert seen == (first + [(1, None)] * 2 * blocks) * 2  # 2 steps x (first, STG, modality) forwards
    assert len(crossed) == len(seen)  # the motion tokens in every forward's attn2
    assert sorted(projected) == [(0, block) for block in range(blocks)]  # once per block (of video 0) in the call


def test_the_audio_stream_and_the_audio_video_attentions_stay_diffusers(pipes):
    ours, _ = pipes
    ours(image=picture(), prompt=PROMPT, objects=objects(ours), **CALL, output_type="latent", generator=gen())
    for block in ours.transformer.transformer_blocks:
        assert isinstance(block.attn1.processor, LTX2SelfAttnProcessor)
        assert isinstance(block.attn2.processor, LTX2CrossAttnProcessor)
        for name in ("audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"):
            assert type(getattr(block, name).processor).__module__.startswith("diffusers.")


# -- motion words: Gemma's tokens, the connectors' registers, ComfyUI's padding --------------------------------
PUNCTUATED = {  # prompt (the pipeline strips it), phrases
    "brackets": ("The cat (jumps) while the dog runs.", ["jumps", "runs"]),
    "commas": ("A dog jumps, then rolls over!", ["jumps", "rolls over"]),
    "quotes": ('A "red" ball spins; a box slides left.', ["spins", "slides left"]),
    "spaces": ("  A ball  jumps up.  ", ["jumps up"]),
}


def holds_exactly(tokenizer, ids: list, span: list[int], phrase: str) -> bool:
    """Whether the tokens ``ids[span]`` are the fewest consecutive tokens whose text holds ``phrase``: it is in
    their decoded text, and not in it without the first token or without the last."""
    text = lambda part: tokenizer.decode([ids[i] for i in part])
    return (
        span == list(range(span[0], span[-1] + 1))
        and phrase in text(span)
        and not any(phrase in text(part) for part in (span[1:], span[:-1]))
    )


def test_the_tiny_gemma_tokenizer_tokenises_as_its_sentencepiece_model():
    """The independent check of the stand-in: transformers' tokenizer built from the pieces gives
    sentencepiece's own ids (``<bos>`` first, as Gemma's), byte fallback included."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=gemma_sentencepiece())
    tokenizer = tiny_gemma_tokenizer()
    for text in [p for p, _ in PUNCTUATED.values()] + ["Émile's 🐕 zigzags 42 times"]:
        assert tokenizer(text).input_ids == processor.encode(text, add_bos=True)
    assert processor.bos_id() == 2 and processor.pad_id() == 0 and processor.piece_to_id("<0xC3>") > 3


def connector_rows(pipe, text, length):
    """(left-padded ids, the video connector's input rows, its first block's input rows): where diffusers'
    connectors put each token, read from the connectors themselves."""
    rows = {}
    connector = pipe.connectors.video_connector

    def keep(name):
        def hook(module, args):
            rows.setdefault(name, args[0])

        return hook

    hooks = [
        connector.register_forward_pre_hook(keep("in")),
        connector.transformer_blocks[0].register_forward_pre_hook(keep("block")),
    ]
    try:
        embeds, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=length)
        pipe.connectors(embeds, mask, padding_side=pipe.tokenizer.padding_side)
    finally:
        for hook in hooks:
            hook.remove()
    ids = pipe.tokenizer(text.strip(), padding="max_length", max_length=length, truncation=True).input_ids
    return ids, rows["in"][0], rows["block"][0]


@pytest.mark.parametrize("registers", [8, None], ids=["registers", "no-registers"])
@pytest.mark.parametrize("case", PUNCTUATED.values(), ids=PUNCTUATED)
def test_motion_words_are_the_keys_diffusers_connectors_put_them_at(case, registers):
    """With registers the connectors move the prompt's tokens (``<bos>`` first) to the front and fill the rest
    with registers; without, the left padding stays in front. Each span holds exactly its phrase's tokens."""
    pipe = build(registers=registers)
    prompt, phrases = case
    length = 32
    spans = pipe.adapter.word_spans(prompt, phrases, length)
    ids, before, after = connector_rows(pipe, prompt, length)
    valid = sum(i != pipe.tokenizer.pad_token_id for i in ids)
    assert ids[length - valid] == pipe.tokenizer.bos_token_id  # left padding, then <bos>
    if registers:
        assert torch.equal(after[:valid], before[length - valid :])  # the prompt's rows, moved to the front
        keys = ids[length - valid :] + [None] * (length - valid)
    else:
        assert torch.equal(after, before)
        keys = ids
    assert all(holds_exactly(pipe.tokenizer, keys, span, phrase) for span, phrase in zip(spans, phrases))


def comfy_ids(prompt: str, min_length: int = 1024) -> list[int]:
    """The ids ComfyUI 0.33 gives LTX-2's Gemma for ``prompt``, with its own ``SPieceTokenizer`` (loaded from its
    source) over our sentencepiece model and its rules (comfy/text_encoders/lt.py ``Gemma3_12BTokenizer``:
    add_bos, no end token, ``pad_left``, ``min_length`` 1,024, no weights; comfy/sd1_clip.py: the start token
    from the empty text, each text's ids after its first, pad id 0)."""
    path = COMFYUI / "comfy" / "text_encoders" / "spiece_tokenizer.py"
    if not path.is_file():
        pytest.skip(f"{path} is absent: ComfyUI 0.33's source (set COMFYUI_033)")
    spec = importlib.util.spec_from_file_location("comfy_spiece_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    special = {"<image_soft_token>": 262144, "<end_of_turn>": 106}
    tokenizer = module.SPieceTokenizer(gemma_sentencepiece(), add_bos=True, add_eos=False, special_tokens=special)
    start = tokenizer("")["input_ids"][0]
    batch = [start, *tokenizer(prompt)["input_ids"][1:]]
    return [0] * max(0, min_length - len(batch)) + batch


@pytest.mark.parametrize("case", PUNCTUATED.values(), ids=PUNCTUATED)
def test_motion_words_sit_where_comfyuis_left_padding_to_1024_puts_them(case):
    """ComfyUI pads on the left to 1,024 tokens, keeps the attended (non-padding) ones and appends registers
    after them (comfy/ldm/lightricks/embeddings_connector.py): a span found by characters with diffusers'
    padding holds the same tokens there. What a real Gemma tokenizer could change: its 262k pieces merge more
    (a word with its space, often with punctuation: "▁(", "),"), so a span may hold a token that carries a
    bracket or comma with the word - it is still the word's token, found by its characters; the pipelines
    give the prompt without a chat template (only prompt enhancement uses one, refused with objects), so no
    template tokens come first; the ids differ, the method does not."""
    pipe = build()
    prompt, phrases = case
    ids = comfy_ids(prompt.strip())
    assert len(ids) == 1024 and ids[0] == 0
    kept = ids[ids.index(2) :]  # comfy/text_encoders/lt.py: out[:, :, -sum(attention_mask):]
    spans = pipe.adapter.word_spans(prompt, phrases, 1024)
    assert all(holds_exactly(pipe.tokenizer, kept, span, phrase) for span, phrase in zip(spans, phrases))
    assert kept == pipe.tokenizer(prompt.strip()).input_ids  # the same tokens as diffusers' connectors' front rows


def test_auto_equals_dense_without_registers_where_padding_is_open_text():
    """Without registers diffusers' connectors still open every key (the padding's rows too): FlexiMMT reads
    them as context text, the motion words at their left-padded positions."""
    ours, theirs = build(registers=None), build(LTX2ImageToVideoPipeline, registers=None)
    padding = 16 - len(ours.tokenizer(PROMPT).input_ids)
    fronted = build().adapter.word_spans(PROMPT, WORDS, 16)
    assert ours.adapter.word_spans(PROMPT, WORDS, 16) == [[i + padding for i in span] for span in fronted]
    kw = dict(image=picture(), prompt=PROMPT, **CALL, output_type="latent")
    plain = theirs(**kw, generator=gen()).frames
    auto = ours(**kw, generator=gen(), objects=objects(ours)).frames
    dense = ours(**kw, generator=gen(), objects=objects(ours), mask_kernel="dense").frames
    assert (auto - plain).abs().max() > 1e-3 and rel(auto, dense) < 1e-4


# -- training --------------------------------------------------------------------------------------------------
def moving_square(frames=9):
    video = np.full((frames, SIZE, SIZE, 3), 90, np.uint8)
    for t in range(frames):
        video[t, 20:36, 4 + 3 * t : 20 + 3 * t] = 220
    return video


def train(pipe, out, **kw):
    kw = {"steps": 1, "tokens_per_motion": 4, "height": SIZE, "width": SIZE, "num_frames": 9, "max_windows": 1, **kw}
    return train_motion(pipe, moving_square(), "A red ball jumps up.", "ball", "jumps up", out, **kw)


def forward_inputs(pipe):
    """Every transformer forward's keyword arguments (a pre-hook that changes nothing)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("image_dropout", [0.0, 0.999999], ids=["image", "dropped"])
def test_a_training_step_keeps_the_image_frame_clean_at_timestep_0_and_the_audio_silent(tmp_path, image_dropout):
    """The first latent frame goes in as the pipeline's own image latents with timestep 0 (LTX-2's per-token
    timesteps), the others noised at one timestep; the audio stream gets pure noise at timestep 1000. A dropped
    image is LTX-2's text-to-video mode: every frame noised, at the one timestep."""
    pipe = build()
    seen, handle = forward_inputs(pipe)
    try:
        train(pipe, tmp_path / "m.safetensors", image_dropout=image_dropout, gradient_checkpointing=False)
    finally:
        handle.remove()
    (kw,) = seen
    frame = GRID[1] * GRID[2]  # tokens of one latent frame
    timestep = kw["timestep"][0]
    assert torch.all(timestep[frame:] == timestep[-1]) and 0 < timestep[-1] < 1000
    assert kw["audio_timestep"].tolist() == [1000.0] and kw["audio_sigma"].tolist() == [1000.0]
    assert torch.equal(kw["sigma"], timestep[-1:])
    first = picture_tensor(moving_square()[0])
    image, _ = pipe.prepare_latents(first, 1, 4, SIZE, SIZE, 9, 0.0, torch.float32, torch.device("cpu"), gen(), None)
    if image_dropout:
        assert torch.all(timestep == timestep[-1])
        assert not torch.allclose(kw["hidden_states"][0, :frame], image[0, :frame], atol=1e-3)
    else:
        assert torch.all(timestep[:frame] == 0)
        assert torch.allclose(kw["hidden_states"][0, :frame], image[0, :frame], atol=1e-6)


def picture_tensor(frame: np.ndarray) -> torch.Tensor:
    """A frame as the pipeline's video processor hands the image to ``prepare_latents``: [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_training_noise_levels_are_the_schedulers_shifted_sigmas():
    """LTX shifts its schedule by the video's token count (``mu``): a training noise level drawn from u is the
    sigma the pipeline's scheduler makes of u for that many tokens."""
    pipe = build()
    adapter = pipe.adapter
    for tokens, seed in [(320, 0), (6144, 1), (40_000, 2)]:
        u = torch.rand((), generator=gen(seed)).item()
        cfg = pipe.scheduler.config
        mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        pipe.scheduler.set_timesteps(sigmas=[u], mu=mu)
        assert abs(adapter.training_sigma(gen(seed), tokens) - pipe.scheduler.sigmas[0].item()) < 1e-6


def test_train_motion_takes_diffusers_own_ltx2_pipeline_and_the_motion_is_ltx2s_alone(tmp_path):
    plain = build(LTX2ImageToVideoPipeline)
    motion = train(plain, tmp_path / "m.safetensors", steps=2)
    assert motion.family == "ltx2" and motion.tokens.shape == (2, 4, 16)
    ours = FlexiMMTLTX2ImageToVideoPipeline.from_pipe(plain)
    mask = masks()[0]
    out = ours(
        picture(), "A ball jumps up.", objects=[ObjectMotion(mask, motion, "jumps up")], **CALL, output_type="latent"
    )
    assert torch.isfinite(out.frames).all()
    cogvideox = tiny_pipeline(0)
    with pytest.raises(ValueError, match=r"object 1: this motion was learned on LTX-2 image-to-video .*CogVideoX"):
        cogvideox(
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)),
            "A ball jumps up.",
            objects=[ObjectMotion(np.ones((32, 32), bool), str(tmp_path / "m.safetensors"), "jumps up")],
            num_inference_steps=1,
            output_type="latent",
        )


def test_the_release_preset_trains_ltx2_with_its_latents_and_loss_in_the_models_precision(tmp_path, monkeypatch):
    """preset="release" trains under bf16 autocast with loss_precision "model", as it does every family: LTX-2's
    latents, noise and prediction outside the transformer come back in bf16; the same draws without a precision
    give the same latents in float32 (rounded, they are bf16's) and a prediction that differs from bf16's."""
    pipe = build()
    calls = []
    original = LTX2Adapter.training_prediction

    def both(self, state, cond, window, generator, image_dropout, autocast, dtype=None):
        replay = torch.Generator().set_state(generator.get_state())
        batch = original(self, state, cond, window, generator, image_dropout, autocast, dtype=dtype)
        with torch.no_grad():
            calls.append((dtype, batch, original(self, state, cond, window, replay, image_dropout, autocast)))
        return batch

    monkeypatch.setattr(LTX2Adapter, "training_prediction", both)
    train(pipe, tmp_path / "m.safetensors", preset="release", crops=1, gradient_checkpointing=False)
    ((dtype, batch, own),) = calls
    assert dtype == torch.bfloat16 and batch.x0.dtype == batch.x0_hat.dtype == torch.bfloat16
    assert own.x0.dtype == own.x0_hat.dtype == torch.float32 and batch.loss_frames == own.loss_frames
    assert torch.equal(batch.x0, own.x0.to(torch.bfloat16))
    assert not torch.equal(batch.x0_hat, own.x0_hat.to(torch.bfloat16))


def test_the_release_preset_on_ltx2_is_its_options_given_one_by_one(pipes):
    """preset="release" sets the release's inference options on LTX-2 as on every family (the mixin's): the same
    video, audio and masks as the options spelled out, and other masks than fleximmt's defaults (the release
    starts from no masks, fleximmt from the first-frame masks)."""
    from fleximmt.method.pipeline import RELEASE_OPTIONS

    ours, _ = pipes
    kw = dict(image=picture(), prompt=PROMPT, **CALL, output_type="latent", return_masks=True)
    preset = ours(**kw, objects=objects(ours), preset="release", generator=gen())
    spelled = ours(**kw, objects=objects(ours), **RELEASE_OPTIONS, generator=gen())
    default = ours(**kw, objects=objects(ours), generator=gen())
    assert torch.equal(preset.frames, spelled.frames) and torch.equal(preset.audio, spelled.audio)
    assert torch.equal(preset.masks, spelled.masks) and not torch.equal(preset.masks, default.masks)


def test_a_steps_packed_latents_unpack_to_the_video_latents_diffusers_returns(pipes):
    """The step callback gets LTX-2's packed tokens; the adapter's video layout of the last step's is the
    latent video diffusers returns (output_type "latent"), brought back by diffusers' own normalisation."""
    ours, _ = pipes
    last = []
    out = ours(
        image=picture(),
        prompt=PROMPT,
        **CALL,
        output_type="latent",
        generator=gen(),
        callback_on_step_end=lambda pipe, step, t, kw: last.append(kw["latents"]) or {},
    )
    vae = ours.vae
    expected = ours._normalize_latents(out.frames, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert last[-1].ndim == 3  # [B, tokens, channels]: no video layout of its own
    video = ours.adapter.video_latents(last[-1], SIZE, SIZE)
    assert video.shape == out.frames.shape and torch.allclose(video, expected, atol=1e-5)


def test_comfyuis_transfer_previews_fit_ltx2s_denoising_space_and_read_its_tokens_as_a_video():
    """ComfyUI's Transfer previews (apps/comfy/preview.py) fit their colours on the first frame brought into the
    space LTX-2 denoises in (the VAE's mean and std buffers) and read each step's packed tokens as a video: the
    first latent frame of every step is the image's, so it is the latents the colours were fitted on."""
    from fleximmt.apps.comfy.preview import channel_axis, denoising_latents

    pipe = build()
    vae = pipe.vae
    vae.latents_mean.copy_(torch.randn(vae.latents_mean.shape, generator=gen(1)))  # a checkpoint's, not 0 and 1
    vae.latents_std.copy_(torch.rand(vae.latents_std.shape, generator=gen(2)) + 0.5)
    steps = []
    pipe(
        image=picture(),
        prompt=PROMPT,
        **CALL,
        output_type="latent",
        generator=gen(),
        callback_on_step_end=lambda pipe_, step, t, kw: steps.append(kw["latents"]) or {},
    )
    pixels = torch.from_numpy(np.asarray(picture(), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        fitted = denoising_latents(vae, vae.encode(pixels[None, :, None]).latent_dist.mode())[0, :, 0]
    for latents in steps:
        video = pipe.adapter.video_latents(latents, SIZE, SIZE)
        assert channel_axis(video, fitted.shape[0]) == 1 and torch.allclose(video[0, :, 0], fitted, atol=1e-5)


@pytest.mark.comfy
def test_comfyuis_transfer_preview_of_ltx2_is_its_middle_latent_frame_through_the_fitted_colours():
    """A Transfer preview of an LTX-2 step, through ComfyUI's own Latent2RGBPreviewer: an image of the latent
    grid's size (packed tokens read as a video, not a row of channels), the fitted colours of its middle frame."""
    from comfy_wan import import_comfy

    import_comfy()
    from fleximmt.apps.comfy.preview import TransferPreview, rgb_factors

    pipe = build()
    steps = []
    pipe(
        image=picture(),
        prompt=PROMPT,
        **CALL,
        output_type="latent",
        generator=gen(),
        callback_on_step_end=lambda pipe_, step, t, kw: steps.append(kw["latents"]) or {},
    )
    kind, image, _ = TransferPreview(pipe, picture()).image(steps[-1])
    frames, height, width = 5, SIZE // 8, SIZE // 8  # the tiny VAE's 2x in time, 8x in space
    assert kind == "JPEG" and image.size == (width, height)
    factors, bias = rgb_factors(pipe.vae, picture())
    middle = pipe._unpack_latents(steps[-1], frames, *GRID[1:], 1, 1)[0, :, frames // 2]  # tokens are latent pixels
    expected = ((middle.permute(1, 2, 0) @ factors + bias + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    assert np.abs(np.asarray(image.convert("RGB"), int) - expected.numpy().astype(int)).max() <= 1


# -- the two-stage flow -------------------------------------------------------------------------------------------
def test_a_fleximmt_first_stage_feeds_diffusers_latent_upsampler_and_second_stage(pipes):
    """Stage 1 with objects at half size; diffusers' latent upsampler doubles its latents; stage 2 re-noises them
    to the distilled schedule's first sigma and refines. Without objects stage 2 is diffusers' own (video and
    audio); with them it runs on the upsampled token grid, masks from the first frame again, auto = dense."""
    from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES as SIGMAS

    ours, theirs = pipes
    half = dict(CALL, height=SIZE // 2, width=SIZE // 2)
    first = ours(picture(), PROMPT, objects=objects(ours), **half, output_type="latent", generator=gen())
    assert first.frames.shape == (1, 4, GRID[0], 4, 4)
    torch.manual_seed(0)
    upsampler = LTX2LatentUpsamplerModel(
        in_channels=4, mid_channels=32, num_blocks_per_stage=1, use_rational_resampler=False
    )
    upsample = LTX2LatentUpsamplePipeline(vae=ours.vae, latent_upsampler=upsampler)
    latents = upsample(latents=first.frames, output_type="latent").frames
    assert latents.shape == (1, 4, *GRID)
    second = dict(
        CALL,
        latents=latents,
        audio_latents=first.audio,
        noise_scale=SIGMAS[0],
        sigmas=SIGMAS,
        num_inference_steps=len(SIGMAS),
        guidance_scale=1.0,
        output_type="latent",
    )
    mine, ref = ours(picture(), PROMPT, **second, generator=gen()), theirs(picture(), PROMPT, **second, generator=gen())
    assert torch.equal(mine.frames, ref.frames) and torch.equal(mine.audio, ref.audio)
    auto = ours(picture(), PROMPT, **second, objects=objects(ours), return_masks=True, generator=gen())
    dense = ours(
        picture(),
        PROMPT,
        **second,
        objects=objects(ours),
        return_masks=True,
        mask_kernel="dense",
        generator=gen(),
    )
    assert auto.masks.shape == (1, len(SIGMAS), 2, *GRID) and torch.equal(auto.masks, dense.masks)
    assert rel(auto.frames, dense.frames) < 1e-4 and (auto.frames - ref.frames).abs().max() > 1e-3


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_fix(pipes):
    ours, _ = pipes
    kw = dict(image=picture(), prompt=PROMPT, objects=objects(ours), **{**CALL, "num_inference_steps": 1})
    with pytest.raises(ValueError, match=r"num_frames=10: LTX-2 makes 2k\+1 frames; use 9 or 11"):
        ours(**{**kw, "num_frames": 10})
    with pytest.raises(ValueError, match=r"height x width = 80 x 64: LTX-2 needs multiples of 32; use 64 x 64"):
        ours(**{**kw, "height": 80})
    with pytest.raises(ValueError, match="enable_prompt_enhancement=True: the pipeline would rewrite the prompt"):
        ours(**kw, enable_prompt_enhancement=True, system_prompt="Rewrite.")
    with pytest.raises(ValueError, match="object 2: motion words 'flies'"):
        ours(**{**kw, "objects": objects(ours, words=["jumps up", "flies"])})
    with pytest.raises(ValueError, match=r"m2m.*\(LTX-2\)"):
        ours(**kw, parts=("m2v", "m2m"))
    with pytest.raises(ValueError, match=r"learned on Wan image-to-video.*LTX-2"):
        ours(
            **{
                **kw,
                "objects": [ObjectMotion(masks()[0], random_motion(ours.transformer, 4, family="wan"), "jumps up")],
            }
        )


def test_a_predicted_length_is_refused_with_objects(pipes, monkeypatch):
    """LTX-2.5's duration head predicts the frame count from the encoded prompt, after the call began."""
    ours, _ = pipes
    monkeypatch.setattr(ours, "duration_head", torch.nn.Identity(), raising=False)
    with pytest.raises(ValueError, match=r"num_frames=None: .* give num_frames \(2k\+1, e.g. 121\)"):
        ours(picture(), PROMPT, objects=objects(ours), **{**CALL, "num_frames": None})


def test_objects_with_context_parallelism_are_refused():
    """diffusers' plan for LTX-2 splits the prompt's tokens between processes; without objects the call is diffusers'."""
    pipe = build()
    kw = dict(image=picture(), prompt=PROMPT, **{**CALL, "num_inference_steps": 1}, output_type="latent")
    pipe(**kw, objects=objects(pipe), generator=gen())
    for block in pipe.transformer.transformer_blocks:
        # what enable_parallelism leaves on every processor, here on attn2's alone: diffusers' own attentions
        # (attn1, the audio stream's) would need a real process mesh to run before attn2 is reached
        block.attn2.processor._parallel_config = object()
    with pytest.raises(FlexiMMTInputError, match=r"context parallelism .* on LTX-2"):
        pipe(**kw, objects=objects(pipe), generator=gen())


def test_every_attention_takes_the_backend_set_on_the_model(spy, restore_active_backend):  # noqa: F811 (fixtures)
    """As on the other families (tests/test_attention_backends.py): set_attention_backend reaches FlexiMMT's
    LTX-2 processors, and the audio stream's diffusers' ones."""
    pipe = build()
    pipe.transformer.set_attention_backend("_native_math")
    pipe(
        picture(),
        PROMPT,
        objects=objects(pipe),
        **{**CALL, "num_inference_steps": 1},
        output_type="latent",
        generator=gen(),
    )
    assert spy and {backend for backend, _ in spy} == {"_native_math"}


# -- loading and the command line ------------------------------------------------------------------------------------
def test_a_saved_folder_loads_as_fleximmt_and_the_command_line_trains_and_generates(tmp_path, monkeypatch):
    """``fleximmt train --model <folder>`` learns an LTX-2 motion and ``generate`` uses it. The command line runs
    the pipeline's default image re-compression (H.264, CRF 33), which needs PyAV; this environment has none,
    so the test turns it off as ``image_crf=0`` would."""
    import imageio.v3 as iio

    from fleximmt.apps.cli import main

    build().save_pretrained(tmp_path / "ltx2")
    assert json.loads((tmp_path / "ltx2" / "model_index.json").read_text())["_class_name"] == "LTX2ImageToVideoPipeline"
    loaded = load_pipeline(tmp_path / "ltx2")
    assert isinstance(loaded, FlexiMMTLTX2ImageToVideoPipeline) and isinstance(loaded.adapter, LTX2Adapter)
    iio.imwrite(tmp_path / "ref.mp4", moving_square(17), fps=8, codec="libx264")
    picture().save(tmp_path / "image.png")
    Image.fromarray(masks()[0].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    size = ["--height", SIZE, "--width", SIZE, "--frames", 9]
    args = ["--video", tmp_path / "ref.mp4", "--caption", "A ball jumps up.", "--concept", "ball"]
    code = main(
        [
            str(a)
            for a in [
                "train",
                "--model",
                tmp_path / "ltx2",
                *args,
                "--motion-words",
                "jumps up",
                "--out",
                tmp_path / "jump.safetensors",
                "--steps",
                2,
                "--tokens",
                4,
                *size,
            ]
        ]
    )
    assert code == 0 and MotionTokens.load(tmp_path / "jump.safetensors").family == "ltx2"
    monkeypatch.setattr("diffusers.pipelines.ltx2.pipeline_ltx2_image2video.resolve_default_image_crf", lambda _: 0)
    obj = f"{tmp_path / 'mask.png'}:{tmp_path / 'jump.safetensors'}:jumps up"
    code = main(
        [
            str(a)
            for a in [
                "generate",
                "--model",
                tmp_path / "ltx2",
                "--image",
                tmp_path / "image.png",
                "--prompt",
                PROMPT,
                "--object",
                obj,
                "--steps",
                2,
                "--out",
                tmp_path / "out.mp4",
                "--masks-out",
                tmp_path / "masks.mp4",
                *size,
            ]
        ]
    )
    assert code == 0 and (tmp_path / "masks.mp4").is_file()
    assert iio.imread(tmp_path / "out.mp4").shape[:3] == (9, SIZE, SIZE)
