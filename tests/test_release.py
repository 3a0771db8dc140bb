"""``preset="release"``: the authors' released inference and training, reproduced (docs/method.md#the-release-preset).

The references here are this file's own code, written from the release's logic (its ``compute_mask.py``,
the stop loop of ``my_pipeline_i2v_inf.py``, ``scripts/inference_mask_batch.py``'s mask loading, the
training loop of ``scripts/train_mask.py``), not fleximmt's functions. End to end they run on the toy
model that ``make demo`` uses, driven the release's way, against ``preset="release"`` with the same
latents, motion tokens and first masks."""

import contextlib
import math
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fleximmt import ObjectMotion
from fleximmt.errors import FlexiMMTInputError, ObjectInputError
from fleximmt.method.attention import motion_state_for
from fleximmt.method.masks import PARTS, mask_change, mask_to_token_grid, rmpm
from fleximmt.method.pipeline import TransferOptions
from fleximmt.toy import random_motion
from fleximmt.toy.lab import load_toy_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "A red circle moves left. A blue square bounces."
WORDS = ["moves left", "bounces"]
SCENE = os.path.join(os.path.dirname(__file__), "..", "src", "fleximmt", "toy", "assets", "examples", "scene_1.png")


# -- the release's mask propagation (compute_mask.py), written out -----------------------------------------
def release_label_propagation(feat_tar, frame_feats, segs, h, w, regions=None):
    """``label_propagation_nearby``: one target frame from its anchors (features ``[C, n]``, labels ``[1, n]``);
    ``regions`` (a list) collects the size of each threshold region."""
    segs_cat = torch.cat(segs, dim=-1)
    src_masks = [torch.from_numpy((seg[0].float().numpy() > 0.5).astype(np.uint8)) for seg in segs]
    src_all = torch.stack(src_masks).reshape(-1)
    region = src_masks[-1] > 0  # the last anchor's label
    sources = torch.cat(frame_feats, dim=-1)
    soft = torch.where(src_all > 0, torch.ones_like(src_all), torch.ones_like(src_all) * 0.01)
    sources = sources * soft.unsqueeze(0).to(dtype=sources.dtype)
    tar = F.normalize(feat_tar, dim=1, p=2).squeeze(0)
    sources = F.normalize(sources, dim=0, p=2)
    aff = torch.exp(torch.mm(tar, sources) / 0.013).transpose(1, 0)
    top, _ = torch.topk(aff, dim=0, k=min(15, aff.shape[0]))
    top_min, _ = torch.min(top, dim=0)
    aff[aff < top_min] = 0
    total = torch.sum(aff, dim=0, keepdim=True)
    valid = total.squeeze(0) > 0
    if valid.any():
        aff[:, valid] = aff[:, valid] / total[:, valid]
    seg_tar = torch.mm(segs_cat, aff)
    seg_2d = seg_tar.squeeze(0).reshape(h, w)
    region_2d = region.reshape(h, w)
    if regions is not None:
        regions.append(int(region_2d.sum()))
    if region_2d.sum() > 0:
        values = seg_2d[region_2d]
        ordered, _ = torch.sort(values)
        n = ordered.size(0)
        skip = int(n * 0.1)
        mean = ordered[skip:-skip].mean().item() if skip > 0 and n > skip * 2 else values.mean().item()
        threshold = max(0.3, mean * 0.98)
    else:
        threshold = 0.5
    return seg_2d > threshold, seg_tar


def release_compute_mask(first_mask, features, h, w, frames, regions=None):
    """``compute_mask``: one object's masks on every latent frame from ``features`` ``[frames * h * w, C]``
    (in the model's dtype); anchors are frame 0's mask and the two most recent frames' soft labels."""
    dtype = features.dtype
    grid = features.view(frames, h, w, -1).permute(0, 3, 1, 2)  # [frames, C, h, w]

    def frame_features(i):  # [(h w), C]
        return grid[i].permute(1, 2, 0).reshape(h * w, -1)

    first_label = first_mask.reshape(1, -1).to(dtype)  # the one-hot's foreground channel
    queue = []  # (features [C, n], soft label [1, n]) of the two most recent frames
    out = [first_mask]
    for frame in range(1, frames):
        feats = [frame_features(0).T] + [f for f, _ in queue]
        segs = [first_label] + [s for _, s in queue]
        mask, seg = release_label_propagation(frame_features(frame), feats, segs, h, w, regions)
        if len(queue) == 2:
            queue.pop(0)
        queue.append((frame_features(frame).T, seg))
        out.append(mask)
    return torch.stack(out)


def release_first_mask(path, h, w):
    """``inference_mask_batch.py``: the mask PNG as 'L', resized to the token grid by PIL's default, > 127."""
    return torch.from_numpy(np.array(Image.open(path).convert("L").resize((w, h))) > 127)


def release_token_indices(tokenizer, prompt, words):
    """``get_motion_token_indices``: where each phrase's tokens first occur among the prompt's."""
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    spans = []
    for phrase in words:
        ids = tokenizer.encode(phrase, add_special_tokens=False)
        start = next(i for i in range(len(tokens) - len(ids) + 1) if tokens[i : i + len(ids)] == ids)
        spans.append(list(range(start, start + len(ids))))
    return spans


def moving_features(frames=5, h=8, w=8, dim=32, seed=0, dtype=torch.float32):
    """Per-token features of a soft blob drifting over a noisy background: scores fall off gradually
    at its edge, so the last anchor's soft label and the previous binary mask are different regions."""
    gen = torch.Generator().manual_seed(seed)
    background = torch.randn(dim, generator=gen)
    blob = torch.randn(dim, generator=gen) * 1.5
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    feats = background + 0.5 * torch.randn(frames, h, w, dim, generator=gen)
    for t in range(frames):
        feats[t] += torch.exp(-((y - 3 - 0.3 * t) ** 2 + (x - 2 - 0.8 * t) ** 2) / 2.5**2)[..., None] * blob
    first = (y - 3) ** 2 + (x - 2) ** 2 <= 2.5**2
    return first, feats.to(dtype)


# -- 1. the released form -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_released_rmpm_is_the_releases_compute_mask_bit_for_bit(seed):
    first, feats = moving_features(seed=seed)
    corner = torch.zeros_like(first)
    corner[7, 7] = True  # one token: its later labels stay under 0.5, an empty region (threshold 0.5)
    frames, h, w, _ = feats.shape
    ours = rmpm(torch.stack([first, corner]), feats, anchors=3, method="released")
    regions = []
    for k, mask in enumerate([first, corner]):
        expected = release_compute_mask(mask, feats.reshape(frames * h * w, -1), h, w, frames, regions)
        assert torch.equal(ours[k], expected), (k, (ours[k] != expected).sum())
    assert ours[0, 1:].any() and 0 in regions  # the case holds propagated masks and an empty region


@pytest.mark.parametrize("seed", range(4))
def test_released_rmpm_runs_in_the_precision_it_is_given_as_the_release_does(seed):
    # bf16, as the release runs it: each object scales and normalises its own sources in bf16
    first, feats = moving_features(seed=seed, dtype=torch.bfloat16)
    second = torch.zeros_like(first)
    second[5:8, 4:8] = True
    frames, h, w, _ = feats.shape
    ours = rmpm(torch.stack([first, second]), feats, anchors=3, method="released", dtype=torch.bfloat16)
    for k, mask in enumerate([first, second]):
        expected = release_compute_mask(mask, feats.reshape(frames * h * w, -1), h, w, frames)
        assert torch.equal(ours[k], expected), (k, (ours[k] != expected).sum())


def test_an_empty_old_mask_changes_by_zero_in_the_release():
    empty, some = torch.zeros(6, dtype=torch.bool), torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)
    assert mask_change(empty, some) == float("inf")  # fleximmt's own measure
    assert mask_change(empty, some, empty=0.0) == 0.0
    assert mask_change(some, empty, empty=0.0) == 1.0


# -- 3. first-frame masks: PIL's resize -------------------------------------------------------------------
def shapes():
    y, x = np.mgrid[:64, :64]
    yield ((y - 30) / 11) ** 2 + ((x - 21) / 9) ** 2 <= 1
    yield ((y - 40) / 17) ** 2 + ((x - 40) / 6) ** 2 <= 1
    yield (np.abs(y - 20) + np.abs(x - 44)) <= 13
    yield (y > 0.7 * x + 9) & (y < 50)
    yield ((y // 5 + x // 7) % 2 == 0) & (x > 20)
    yield (x - 32) ** 2 + (y - 32) ** 2 <= 5**2


def test_the_releases_mask_resize_is_pils_default_above_127(tmp_path):
    differs = 0
    for i, shape in enumerate(shapes()):
        path = tmp_path / f"mask{i}.png"
        Image.fromarray(shape.astype(np.uint8) * 255).save(path)
        for h, w in [(8, 8), (6, 10)]:
            expected = release_first_mask(path, h, w)
            assert torch.equal(mask_to_token_grid(torch.from_numpy(shape), h, w, "released"), expected)
            differs += int(not torch.equal(mask_to_token_grid(torch.from_numpy(shape), h, w), expected))
    assert differs  # fleximmt's own area-coverage rule is another rule
    with pytest.raises(ValueError, match="mask resize"):
        mask_to_token_grid(torch.ones(4, 4, dtype=torch.bool), 2, 2, "nearest")


# -- the preset's options -----------------------------------------------------------------------------------
def test_the_preset_fills_only_the_options_the_caller_left_out():
    options = TransferOptions(preset="release")
    options.apply_preset(given={"objects"})
    assert (options.mask_source, options.rmpm_method, options.initial_masks, options.alpha, options.anchors) == (
        "rmpm",
        "released",
        "none",
        0.05,
        3,
    )
    assert options.mask_kernel == "dense" and options.release
    explicit = TransferOptions(rmpm_method="paper", alpha=None, anchors=5, preset="release")
    explicit.apply_preset(given={"rmpm_method", "alpha", "anchors"})
    assert (explicit.rmpm_method, explicit.alpha, explicit.anchors, explicit.initial_masks) == (
        "paper",
        None,
        5,
        "none",
    )
    plain = TransferOptions()
    plain.apply_preset(given=())
    assert (plain.rmpm_method, plain.initial_masks, plain.alpha, plain.release) == ("paper", "first_frame", None, False)
    with pytest.raises(FlexiMMTInputError, match="preset='authors'"):
        TransferOptions(preset="authors").apply_preset(given=())


# -- 2. end to end on the toy model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return load_toy_pipeline()


def ellipse(cy, cx, ry, rx):
    y, x = np.mgrid[:64, :64]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The demo's scene image and two mask PNGs, as the release reads them."""
    folder = tmp_path_factory.mktemp("scene")
    paths = []
    for k, mask in enumerate([ellipse(22, 20, 14, 12), ellipse(42, 44, 12, 16)]):
        paths.append(folder / f"object{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(paths[-1])
    return Image.open(SCENE).convert("RGB"), paths


def motions(pipe):
    return [random_motion(pipe.transformer, 4, seed=k + 1, scale=4.0) for k in range(2)]


class ReleaseProcessor:
    """The release's attention processors (``FlexiMMT_processor_mask_inf.py``, ``..._train.py``) for one block
    of the toy model, written out: the motion tokens ``[1, K * d_m, dim]`` appended after the text,
    ``[text | motion | video]`` through the block's projections and QK-norm, RoPE on the video rows only, one
    SDPA under the additive -inf mask that :meth:`bias` builds (as the release builds it), then ``to_out``."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        tokens = self.tokens.to(encoder_hidden_states.dtype).repeat(hidden_states.size(0), 1, 1)
        encoder_hidden_states = torch.cat([encoder_hidden_states, tokens], dim=1)
        head_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query[:, :, head_len:] = apply_rotary_emb(query[:, :, head_len:], image_rotary_emb)
        key[:, :, head_len:] = apply_rotary_emb(key[:, :, head_len:], image_rotary_emb)
        bias = torch.zeros((query.shape[-2], query.shape[-2]), dtype=query.dtype)
        self.bias(bias, query, key, text_len, head_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)))
        text_out, video_out = out.split([head_len, out.size(1) - head_len], dim=1)
        return video_out, text_out[:, :text_len]


class ReleaseInferenceProcessor(ReleaseProcessor):
    """Inference: each object's motion words ``words[k]`` (start, length) and ``masks.value`` (bool
    ``[K, N_v]``, None at step 0) shape the mask, object by object, as ``FlexiMMT_processor_mask_inf.py``."""

    def __init__(self, tokens, words, masks):
        super().__init__(tokens)
        self.words, self.masks = words, masks

    def bias(self, bias, query, key, text_len, head_len):
        inf, d_m = float("-inf"), (head_len - text_len) // len(self.words)
        masks = self.masks.value
        video = [None if masks is None else torch.where(m)[0] + head_len for m in masks] if masks is not None else None
        spans = [(start, start + length) for start, length in self.words]
        for i in range(len(spans)):  # motion words of different objects never attend to each other
            for j in range(i + 1, len(spans)):
                (si, ei), (sj, ej) = spans[i], spans[j]
                bias[si:ei, sj:ej] = inf
                bias[sj:ej, si:ei] = inf
        for k, (start, end) in enumerate(spans):
            tokens = slice(text_len + k * d_m, text_len + (k + 1) * d_m)
            if video is not None:  # the motion words attend to their object's video only
                bias[start:end, head_len:] = inf
                bias[head_len:, start:end] = inf
                bias[start:end, video[k]] = 0
                bias[video[k], start:end] = 0
            bias[:, tokens] = inf
            bias[tokens, :] = inf
            if video is not None:
                bias[tokens, video[k]] = 0
                bias[video[k], tokens] = 0
            bias[start:end, tokens] = 0
            bias[tokens, start:end] = 0


class ReleaseTrainingProcessor(ReleaseProcessor):
    """Training (stage 0, masks on): the DMEM mask from the concept words' queries of batch row 0 against the
    video keys, thresholded at each frame's mean, an exact share of its tokens dropped (in the order of
    ``draw``: the release's randperm), as ``FlexiMMT_processor_mask_train.py``."""

    def __init__(self, tokens, concept, motion, grid, draw):
        super().__init__(tokens)
        self.concept, self.motion, self.grid, self.draw = concept, motion, grid, draw

    def bias(self, bias, query, key, text_len, head_len):
        with torch.no_grad():
            q_object = query[0, :, self.concept[0] : self.concept[0] + self.concept[1]]
            scores = torch.mean(q_object @ key[0, :, head_len:].transpose(-2, -1), dim=(0, 1))
            scores = scores.reshape(self.grid.frames, self.grid.height, self.grid.width)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            for f in range(self.grid.frames):
                mask[f] = scores[f] > torch.mean(scores[f].flatten().float())
            mask = mask.reshape(-1)
            unmasked = torch.where(mask)[0]
            if len(unmasked) > 0:
                count = max(1, int(len(unmasked) * 0.3))
                mask[unmasked[self.draw[unmasked].argsort()[:count]]] = False
        motion, inf = slice(text_len, head_len), float("-inf")
        bias[:, motion] = inf
        bias[motion, :] = inf
        positives = torch.where(mask)[0] + head_len
        bias[motion, positives] = 0
        bias[positives, motion] = 0
        words = slice(self.motion[0], self.motion[0] + self.motion[1])
        bias[words, motion] = 0
        bias[motion, words] = 0
        bias[motion, motion] = 0  # the release lets motion tokens see each other in training


def release_processors(transformer, make):
    """Set ``make(block)`` as every block's processor; returns the processors before, to set back."""
    before = transformer.attn_processors
    transformer.set_attn_processor(
        {f"transformer_blocks.{b}.attn1.processor": make(b) for b in range(len(transformer.transformer_blocks))}
    )
    return before


class ReleaseStop:
    """The release's dynamic stop (``my_pipeline_i2v_inf.py``): the masks each step hands the next."""

    def __init__(self, alpha_percent=5):
        self.alpha_percent, self.masks, self.stopped, self.stop_step = alpha_percent, None, False, None

    def step(self, i, new):
        """Step ``i``'s new masks ``[K, n]``; returns the masks of step ``i + 1``."""
        if i < 5:
            self.masks = new
            return self.masks
        diff, total = (new != self.masks).sum(1), self.masks.sum(1)
        rates = torch.zeros(len(new))
        rates[total > 0] = diff[total > 0].float() / total[total > 0].float() * 100
        if not (rates >= self.alpha_percent).any().item():
            self.stopped, self.stop_step = True, i  # the previous masks stay, and nothing is computed again
        else:
            self.masks = new
        return self.masks


def release_run(pipe, image, mask_paths, tokens, steps, alpha_percent=5, seed=0):
    """The release's denoising loop on ``pipe``'s model, its attention :class:`ReleaseInferenceProcessor`:
    no masks at step 0; after every step, each object's ``compute_mask`` on the conditional branch's
    attention outputs of the feature blocks (stacked and averaged in the model's dtype), then
    :class:`ReleaseStop`. Returns the latents and the masks each step used ``[steps, K, frames, h, w]``."""
    grid = pipe.token_grid(64, 64, 17)
    num_objects = len(mask_paths)
    firsts = [release_first_mask(path, grid.height, grid.width) for path in mask_paths]
    words = [(span[0], len(span)) for span in release_token_indices(pipe.tokenizer, PROMPT, WORDS)]
    masks = types.SimpleNamespace(value=None)  # the concept masks the processors read (None: none yet)
    # the release's 30 of 42 blocks, carried to the toy's depth as that share
    transformer = pipe.transformer
    blocks = transformer.transformer_blocks[: round(len(transformer.transformer_blocks) * 30 / 42)]
    stop, captured, history = ReleaseStop(alpha_percent), [], []

    def capture(module, args, output):
        if not stop.stopped:
            captured.append(output[0][1])  # the video tokens' attention output, conditional row

    def step_end(pipeline, i, t, kwargs):
        used = torch.zeros(num_objects, grid.size, dtype=torch.bool) if masks.value is None else masks.value
        history.append(used.view(num_objects, grid.frames, grid.height, grid.width))
        if not stop.stopped and i < 50:
            features = torch.mean(torch.stack(captured, dim=0), dim=0)
            new = torch.stack(
                [
                    release_compute_mask(first, features, grid.height, grid.width, grid.frames).reshape(-1)
                    for first in firsts
                ]
            )
            masks.value = stop.step(i, new)
        captured.clear()
        return {}

    before = release_processors(
        transformer, lambda b: ReleaseInferenceProcessor(tokens[:, 0, b].reshape(1, -1, tokens.shape[-1]), words, masks)
    )
    hooks = [block.attn1.register_forward_hook(capture) for block in blocks]
    try:
        latents = generate(pipe, image, steps, seed, callback_on_step_end=step_end).frames
    finally:
        for hook in hooks:
            hook.remove()
        transformer.set_attn_processor(before)
    return latents, torch.stack(history)


def generate(pipe, image, steps, seed, **kw):
    """``steps`` denoising steps of the scene's prompt from ``seed``'s latents, latents out."""
    return pipe(
        image=image,
        prompt=PROMPT,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    )


def preset_run(pipe, image, mask_paths, motion_list, steps, seed=0, **kw):
    objs = [ObjectMotion(str(path), motion, words) for path, motion, words in zip(mask_paths, motion_list, WORDS)]
    return generate(pipe, image, steps, seed, objects=objs, return_masks=True, preset="release", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_the_preset_is_the_releases_inference_step_by_step(toy, scene, dtype, alpha):
    pipe = toy if dtype == torch.float32 else load_toy_pipeline().to(dtype)
    image, paths = scene
    motion_list = motions(pipe)
    tokens = torch.stack([m.expert_tokens() for m in motion_list])
    expected, expected_masks = release_run(pipe, image, paths, tokens, steps=12, alpha_percent=alpha * 100)
    given = {} if alpha == 0.05 else {"alpha": alpha}  # 0.05: the preset's own
    ours = preset_run(pipe, image, paths, motion_list, steps=12, **given)
    assert ours.masks.shape[1] == 12
    for step in range(12):
        assert torch.equal(ours.masks[0, step], expected_masks[step]), step
    assert torch.equal(ours.frames, expected)
    assert not ours.masks[0, 0].any() and ours.masks[0, 1:, :, 1:].any()  # no masks at step 0; RMPM from step 1


def scripted_schedule(monkeypatch, sequence, alpha, preset="release"):
    """A MaskSchedule whose RMPM returns ``sequence[step]`` (``[2, 40]``) after each step; the masks each step used."""
    from fleximmt.method import pipeline
    from fleximmt.method.adapter import TokenGrid

    grid = TokenGrid(1, 5, 8)
    state = motion_state_for(
        torch.zeros(2, 1, 1, 1, 4), torch.ones(2, 4, dtype=torch.bool), feature_blocks=frozenset({0})
    )
    options = TransferOptions(objects=[None, None], alpha=alpha, return_masks=True, preset=preset)
    options.apply_preset(given={"objects", "alpha", "return_masks"})
    options.parts = frozenset(PARTS)
    schedule = pipeline.MaskSchedule(state, [torch.ones(2, 5, 8, dtype=torch.bool)], grid, options, 1)
    monkeypatch.setattr(state.capture, "complete", lambda video=0: True)
    monkeypatch.setattr(state.capture, "take", lambda video=0: torch.zeros(grid.size, 1))
    steps = iter(sequence)
    monkeypatch.setattr(pipeline, "rmpm", lambda *args: next(steps).reshape(2, 1, 5, 8))
    for step in range(len(sequence)):
        if not schedule.updating:
            assert state.capture.blocks == frozenset()  # no features are captured once stopped
        schedule.step_end(step)
    return schedule.masks()[0].reshape(len(sequence), 2, -1)


def mask_sequence(moves):
    """Two objects' masks over 40 tokens, one set per step: object 0 (20 tokens) moves ``moves[i]``
    of its tokens at step i, a change of 10% each; object 1 stays."""
    masks = [torch.zeros(2, 40, dtype=torch.bool)]
    masks[0][0, :20] = True
    masks[0][1, 10:30] = True
    for move in moves[1:]:
        m = masks[-1].clone()
        on, off = m[0].nonzero().squeeze(1), (~m[0]).nonzero().squeeze(1)
        m[0, on[:move]], m[0, off[-move:] if move else off[:0]] = False, True
        masks.append(m)
    return masks


@pytest.mark.parametrize(
    "moves",
    [
        [0, 2, 2, 2, 2, 1, 0, 0, 0],  # first steady at step 5, still changing: step 4's masks stay
        [0, 2, 2, 2, 1, 2, 1, 0, 0],  # steady at step 4, which is not checked; changing at 5, steady at 6
        [0, 2, 2, 2, 2, 2, 2, 1, 2],  # steady at step 7 only: step 6's masks stay, step 7's are dropped
    ],
)
def test_the_stop_rule_checks_from_step_five_and_keeps_the_previous_masks(monkeypatch, moves):
    sequence = mask_sequence(moves)
    alpha = 0.15  # one token moved (10%) is under it, two (20%) are not
    ours = scripted_schedule(monkeypatch, sequence, alpha)
    stop = ReleaseStop(alpha * 100)
    expected = [torch.zeros(2, 40, dtype=torch.bool)]  # step 0: no masks
    for i, new in enumerate(sequence[:-1]):
        expected.append(expected[-1] if stop.stopped else stop.step(i, new))
    assert stop.stopped and not torch.equal(sequence[stop.stop_step], expected[-1])  # the kept masks are not the new
    assert torch.equal(ours, torch.stack(expected))


def test_the_release_computes_masks_after_its_first_fifty_steps_only(monkeypatch):
    sequence = mask_sequence([0] + [2] * 52)  # every step's masks differ from the last
    ours = scripted_schedule(monkeypatch, sequence, alpha=None)
    assert not torch.equal(ours[50], ours[49])  # step 49's masks, used at step 50
    assert torch.equal(ours[51], ours[50]) and torch.equal(ours[52], ours[50])  # nothing computed after step 49
    own = scripted_schedule(monkeypatch, sequence, alpha=None, preset=None)
    assert not torch.equal(own[52], own[51])


def test_an_empty_old_mask_does_not_hold_the_release_back(monkeypatch):
    # object 1's masks are empty until step 5, then gain tokens: the release counts that as no change
    sequence = mask_sequence([0, 0, 0, 0, 0, 0, 0, 0])
    for i, m in enumerate(sequence):
        m[1] = i >= 5
    ours = scripted_schedule(monkeypatch, sequence, 0.05)
    assert torch.equal(ours[6], ours[7]) and not ours[6, 1].any()  # stopped at step 5, step 4's masks kept
    own = scripted_schedule(monkeypatch, sequence, 0.05, preset=None)
    assert own[7, 1].all()  # fleximmt's own measure: an empty mask that gains tokens changed infinitely


# -- 2: empty masks are refused -----------------------------------------------------------------------------
def test_an_empty_object_mask_is_refused_naming_the_object(toy, scene, tmp_path):
    image, paths = scene
    motion_list = motions(toy)
    empty = np.zeros((64, 64), bool)
    objs = [ObjectMotion(str(paths[0]), motion_list[0], WORDS[0]), ObjectMotion(empty, motion_list[1], WORDS[1])]
    with pytest.raises(ObjectInputError, match=r"^object 2: the mask is empty") as err:
        toy(image=image, prompt=PROMPT, objects=objs, num_inference_steps=1, output_type="latent")
    assert err.value.number == 2
    speck = np.zeros((64, 64), bool)
    speck[30:32, 30:33] = True  # a few pixels: fleximmt's resize keeps a token, the release's none
    objs[1] = ObjectMotion(speck, motion_list[1], WORDS[1])
    toy(image=image, prompt=PROMPT, objects=objs, num_inference_steps=1, output_type="latent")
    with pytest.raises(ObjectInputError, match=r"^object 2: the mask covers too little"):
        toy(image=image, prompt=PROMPT, objects=objs, num_inference_steps=1, output_type="latent", preset="release")


# -- 4. training under the preset --------------------------------------------------------------------------
CAPTION = "A red circle moves left."


def reference_video(frames=20):
    from helpers import moving_square

    return moving_square(frames=frames, size=64, top=20, side=14, start=40, step=-1, value=220)


def test_the_preset_fills_only_the_training_settings_left_out():
    from fleximmt.training.train import RELEASE_SETTINGS, TrainSettings

    settings = TrainSettings(preset="release", frame_diff_scale=1.0, crops=3)
    settings.apply_preset(given={"frame_diff_scale", "crops"})
    assert (settings.frame_diff_scale, settings.crops) == (1.0, 3)
    assert (settings.lr_warmup_steps, settings.scale_lr, settings.caption_dropout, settings.reencode) == (
        0,
        True,
        0.1,
        True,
    )
    assert (settings.resize, settings.mixed_precision, settings.loss_precision, settings.token_init) == (
        "bicubic",
        "bf16",
        "model",
        "release",
    )
    assert settings.dmem_drop_exact and settings.vae_tiling and settings.vae_slicing
    assert settings.mask_kernel == "dense"
    assert set(RELEASE_SETTINGS) <= set(vars(settings))
    own = TrainSettings()
    own.apply_preset(given=())
    assert (own.lr_warmup_steps, own.crops, own.resize, own.token_init, own.dmem_drop_exact) == (
        100,
        0,
        "bilinear",
        "linear",
        False,
    )


def test_the_learning_rate_is_scaled_by_the_processes_as_the_releases_scale_lr():
    from fleximmt.training.train import TrainSettings, learning_rate

    release = TrainSettings(preset="release")
    release.apply_preset(given=())
    # scripts/train_mask.py: lr * gradient_accumulation_steps (1) * train_batch_size (1) * num_processes
    assert [learning_rate(release, n) for n in (1, 2, 4)] == [3e-3, 6e-3, 12e-3]
    assert learning_rate(TrainSettings(), 4) == 3e-3


def test_the_releases_tokens_are_each_blocks_kaiming_uniform_draw():
    from fleximmt.training.train import initial_tokens

    blocks, d_m, dim = 3, 54, 48  # fleximmt's bound over the release's is sqrt(d_m / 6): 3 here, 6.1 at d_m 226
    ours = initial_tokens(blocks, d_m, dim, "release", torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for block in range(blocks):  # the release: nn.Parameter(torch.zeros(1, d_m, 3072)), kaiming_uniform_, per block
        expected = torch.zeros(1, d_m, dim)
        torch.nn.init.kaiming_uniform_(expected, generator=gen)
        assert torch.equal(ours[block], expected[0])
    bound = (6 / (d_m * dim)) ** 0.5  # gain sqrt(2) x sqrt(3 / fan_in), fan_in = d_m x dim
    assert ours.abs().max() <= bound and ours.abs().max() > 0.9 * bound
    linear = initial_tokens(blocks, d_m, dim, "linear", torch.Generator().manual_seed(7))
    assert linear.abs().max() > 2 * bound  # fleximmt's: within 1 / sqrt(dim)


def test_bicubic_resize_is_torchvisions_on_the_uint8_frames():
    from fleximmt.training.data import to_model_tensor

    frames = (np.random.RandomState(0).rand(3, 37, 53, 3) * 255).astype(np.uint8)
    ours = to_model_tensor(frames, 24, 32, "bicubic")
    # torchvision.transforms.functional.resize(uint8 [T, C, H, W], [24, 32], BICUBIC, antialias=True): in float,
    # clamped to 0..255 and rounded back to uint8; then videovo_dataset.py's / 127.5 - 1
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    small = F.interpolate(video, size=[24, 32], mode="bicubic", align_corners=False, antialias=True)
    expected = small.clamp(min=0, max=255).round().to(torch.uint8).float() / 127.5 - 1.0
    assert torch.equal(ours, expected.permute(1, 0, 2, 3))
    assert not torch.allclose(to_model_tensor(frames, 24, 32), ours, atol=1e-3)  # fleximmt's bilinear


def test_the_exact_dmem_drop_removes_int_of_30_percent_at_least_one():
    from fleximmt.method.masks import drop_positives

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 90, generator=gen) < torch.tensor([[0.5], [0.05], [0.02], [0.0]])
    draw = torch.rand(4, 90, generator=gen)
    kept = drop_positives(masks, draw, 0.3, exact=True)
    for k in range(4):
        positives = masks[k].nonzero().squeeze(1)
        # the release: unmasked[torch.randperm(n)[: max(1, int(n * 0.3))]] dropped; here the draws order them
        count = max(1, int(len(positives) * 0.3)) if len(positives) else 0
        dropped = positives[draw[k, positives].argsort()[:count]]
        expected = masks[k].clone()
        expected[dropped] = False
        assert torch.equal(kept[k], expected)
    assert (masks.sum(1) - kept.sum(1)).tolist()[:3] == [max(1, int(n * 0.3)) for n in masks.sum(1).tolist()[:3]]
    assert torch.equal(drop_positives(masks, draw, 0.3), masks & (draw >= 0.3))  # fleximmt's own: each at random


def release_training_loss(pipe, cond, tokens, draws, generator_state, spans):
    """scripts/train_mask.py's loss for one step on ``cond`` (one window), with the run's draws replayed in
    its order: image dropout, timestep, noise, then the frame-difference frame. Returns the loss and the
    gradient of every block's tokens."""
    scheduler, transformer = pipe.scheduler, pipe.transformer
    gen = torch.Generator()
    gen.set_state(generator_state)
    x0 = cond["video_latents"][0:1]
    image = cond["image_latents"][0:1]
    if torch.rand((), generator=gen).item() < 0.05:  # noised_image_dropout
        image = torch.zeros_like(image)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(x0.dtype)  # randn_like(the latents): in their precision
    noisy = scheduler.add_noise(x0, noise, t)
    grid = pipe.token_grid(64, 64, 17)
    leaves = [block.clone().requires_grad_(True) for block in tokens]
    before = release_processors(
        transformer, lambda b: ReleaseTrainingProcessor(leaves[b][None], *spans, grid, draws[b])
    )
    try:
        rotary = pipe._prepare_rotary_positional_embeddings(64, 64, x0.shape[1], "cpu")
        output = transformer(
            hidden_states=torch.cat([noisy, image], dim=2),
            encoder_hidden_states=cond["prompt_embeds"],
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
    finally:
        transformer.set_attn_processor(before)
    pred = scheduler.get_velocity(output, noisy, t)
    weights = (1 / (1 - scheduler.alphas_cumprod[t])).view(1, 1, 1, 1, 1)
    loss = torch.mean((weights * (pred - x0) ** 2).reshape(1, -1), dim=1)
    k = int(torch.randint(0, x0.shape[1] - 1, (1,), generator=gen))  # random.randint(0, t - 2)
    gt_delta = math.sqrt(2) * x0[:, k + 1] - x0[:, k]
    pred_delta = math.sqrt(2) * pred[:, k + 1] - pred[:, k]
    loss = (loss + torch.mean(((gt_delta - pred_delta) ** 2).reshape(1, -1), dim=1) * 1.0).mean()
    loss.backward()
    return loss.item(), torch.stack([leaf.grad for leaf in leaves])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_training_step_under_the_preset_is_the_releases(toy, tmp_path, monkeypatch, dtype):
    from fleximmt.training import train

    pipe = toy if dtype == torch.float32 else load_toy_pipeline().to(dtype)
    seen = {}
    real_step, adamw = train.training_step, torch.optim.AdamW

    def spy_step(adapter, state, cond, window, generator, *args):
        seen.update(cond=cond.tensors, state=generator.get_state(), draws=state.layouts.drop[0, :, 0].clone())
        return real_step(adapter, state, cond, window, generator, *args)

    def spy_optimiser(params, **kw):
        seen["tokens"] = [p.detach().clone() for p in params]
        seen["params"] = params = list(params)
        return adamw(params, **kw)

    monkeypatch.setattr(train, "training_step", spy_step)
    monkeypatch.setattr(torch.optim, "AdamW", spy_optimiser)
    # float32: the release's arithmetic without its autocast; bf16: --mixed_precision bf16, the preset's own
    given = {"mixed_precision": "no"} if dtype == torch.float32 else {}
    result = train.train_motion(
        pipe,
        reference_video(),
        CAPTION,
        "circle",
        "moves left",
        tmp_path / "m.safetensors",
        steps=1,
        tokens_per_motion=4,
        preset="release",
        max_grad_norm=0.0,  # the gradient as computed, before clipping
        return_losses=True,
        **given,
    )
    spans = [(s[0], len(s)) for s in release_token_indices(pipe.tokenizer, CAPTION, ["circle", "moves left"])]
    cond = {name: t.to(dtype) if t.is_floating_point() else t for name, t in seen["cond"].items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, grads = release_training_loss(pipe, cond, seen["tokens"][0], seen["draws"], seen["state"], spans)
    assert result.losses[0] == pytest.approx(loss, rel=1e-6)  # the loss's last reduction: float32 rounding
    assert torch.equal(seen["params"][0].grad, grads)
    assert grads.abs().amax(dim=(1, 2)).min() > 0  # every block's tokens learn


@pytest.fixture()
def tiny():
    from fleximmt.toy import tiny_pipeline

    return tiny_pipeline(0)


def record_samples(monkeypatch, pipe):
    """Every sample train_motion encodes: the sample, its video latents and whether the VAE tiles."""
    from fleximmt.training import train

    seen, real = [], train.encode_sample

    def spy(adapter, frames, sample, *args):
        cond = real(adapter, frames, sample, *args)
        seen.append((sample, cond.tensors["video_latents"].clone(), pipe.vae.use_tiling))
        return cond

    monkeypatch.setattr(train, "encode_sample", spy)
    return seen


def test_the_preset_trains_on_twelve_crops_cycled_each_encoded_anew(tiny, tmp_path, monkeypatch):
    from helpers import moving_square

    from fleximmt.training.data import CROP_SMALLEST
    from fleximmt.training.train import train_motion

    seen = record_samples(monkeypatch, tiny)
    video = moving_square(frames=13)
    train_motion(
        tiny,
        video,
        "A red ball jumps up.",
        "ball",
        "jumps up",
        tmp_path / "m.safetensors",
        steps=14,
        tokens_per_motion=4,
        preset="release",
    )
    assert len(seen) == 14  # every step encodes its sample anew
    samples = [sample for sample, _, _ in seen]
    assert samples[12:] == samples[:2] and len({s.crop for s in samples[:12]}) == 12  # 12 crops, one order, cycled
    for sample in samples[:12]:
        top, left, h, w = sample.crop
        assert h == w and CROP_SMALLEST * 32 - 1 <= h <= 32 and top + h <= 32 and left + w <= 32  # the 32 x 32 aspect
        assert 0 <= sample.start <= len(video) - 9 and sample.caption in ("A red ball jumps up.", "")
    assert not torch.equal(seen[0][1], seen[12][1])  # the same sample, a fresh sample of the VAE's posterior
    assert all(tiling for _, _, tiling in seen) and not tiny.vae.use_tiling  # tiling on while training, as before after


def test_dropped_captions_are_drawn_once_per_sample_and_samples_are_encoded_once_without_reencode(
    tiny, tmp_path, monkeypatch
):
    from helpers import moving_square

    from fleximmt.training.train import train_motion

    seen = record_samples(monkeypatch, tiny)
    settings = dict(steps=3, tokens_per_motion=4, preset="release", reencode=False, caption_dropout=0.5)
    train_motion(
        tiny,
        moving_square(frames=13),
        "A red ball jumps up.",
        "ball",
        "jumps up",
        tmp_path / "m.safetensors",
        **settings,
    )
    assert len(seen) == 12  # each sample once, before training
    captions = [sample.caption for sample, _, _ in seen]
    assert set(captions) == {"", "A red ball jumps up."}


def test_the_releases_loss_terms_run_in_the_models_precision():
    # scripts/train_mask.py under --mixed_precision bf16: latents, noise and prediction in bf16 through the
    # scheduler's add_noise and get_velocity; the weight 1 / (1 - alphabar) in float32
    from fleximmt.method.attention import motion_state_for

    pipe = load_toy_pipeline().to(torch.bfloat16)
    adapter = pipe.adapter
    grid = pipe.token_grid(64, 64, 17)
    gen = torch.Generator().manual_seed(3)
    cond = {
        "video_latents": torch.randn(1, grid.frames, 8, 16, 16, generator=gen),
        "image_latents": torch.randn(1, grid.frames, 8, 16, 16, generator=gen),
        "prompt_embeds": torch.randn(1, 24, 128, generator=gen),
    }
    member = torch.zeros(1, 24, dtype=torch.bool)
    member[0, 3] = True
    state = motion_state_for(torch.zeros(1, 1, 4, 2, 256, dtype=torch.bfloat16), member, form="joint")
    state.set_video_masks(torch.ones(1, grid.size, dtype=torch.bool))
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    try:
        batch = adapter.training_prediction(
            state,
            cond,
            0,
            torch.Generator().manual_seed(5),
            0.0,
            contextlib.nullcontext,
            dtype=torch.bfloat16,
        )
        own = adapter.training_prediction(state, cond, 0, torch.Generator().manual_seed(5), 0.0, contextlib.nullcontext)
    finally:
        hook.remove()
    replay = torch.Generator().manual_seed(5)
    torch.rand((), generator=replay)
    t = torch.randint(0, 1000, (1,), generator=replay)
    noise = torch.randn(cond["video_latents"].shape, generator=replay).to(torch.bfloat16)
    x0 = cond["video_latents"].to(torch.bfloat16)
    noisy = pipe.scheduler.add_noise(x0, noise, t)
    expected = pipe.scheduler.get_velocity(outputs[0], noisy, t)
    assert batch.x0_hat.dtype == torch.bfloat16 and torch.equal(batch.x0_hat, expected)
    assert own.x0_hat.dtype == torch.float32 and not torch.equal(own.x0_hat, expected.float())
    assert batch.weight.dtype == torch.float32


def test_a_resumed_release_run_ends_on_the_tokens_of_an_uninterrupted_one(tmp_path):
    from helpers import moving_square, run_killed

    from fleximmt.toy import tiny_pipeline
    from fleximmt.training.train import train_motion

    video, words = moving_square(frames=13), ("A red ball jumps up.", "ball", "jumps up")
    settings = dict(steps=4, tokens_per_motion=4, preset="release", checkpoint_every=2)
    whole = train_motion(tiny_pipeline(0), video, *words, tmp_path / "a.safetensors", **settings)
    run_killed(2, train_motion, tiny_pipeline(0), video, *words, tmp_path / "b.safetensors", **settings)
    resumed = train_motion(tiny_pipeline(0), video, *words, tmp_path / "b.safetensors", resume=True, **settings)
    assert torch.equal(resumed.tokens, whole.tokens)  # the crops, their order and every step's encoding alike
