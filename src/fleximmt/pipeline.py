"""``FlexiMMTPipeline``: CogVideoX image-to-video with K motions, each confined to its object.

The pipeline is diffusers' own ``CogVideoXImageToVideoPipeline``; FlexiMMT adds, around its
denoising loop, (1) the MDMA processor in every block (``attention.py``), (2) a per-call
``FlexiMMTState`` passed through ``attention_kwargs``, and (3) a step-end callback that runs RMPM
on the features captured during the step and prepares the next step's masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import CogVideoXImageToVideoPipeline
from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput

from .attention import BACKENDS, FlexiMMTState, install_processors
from .errors import FlexiMMTInputError
from .masks import PARTS, RMPM_METHODS, check_context_text, check_parts, mask_change, mask_to_token_grid, rmpm, span_membership
from .motion import ObjectMotion
from .prompt import find_word_spans

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "THUDM/CogVideoX-5b-I2V"
MAX_OBJECTS = 8
MASK_SOURCES = ("rmpm", "static", "qk", "none")
INITIAL_MASKS = ("first_frame", "none")  # RMPM's step 0: first-frame masks everywhere, or the release's none
ALWAYS_UPDATE_STEPS = 5  # dynamic RMPM: the release always updates masks in the first 5 steps
FEATURE_BLOCK_SHARE = 30 / 42  # the release averages features over the first 30 of 42 blocks


@dataclass
class FlexiMMTPipelineOutput(CogVideoXPipelineOutput):
    """diffusers' output plus ``masks``: bool ``[steps, K, L, h, w]``, the object masks on the latent
    token grid that each denoising step used (None unless ``return_masks=True``)."""

    masks: torch.Tensor | None = None


@dataclass
class TokenGrid:
    """The video token grid of one generation: ``frames x height x width`` tokens."""

    frames: int
    height: int
    width: int

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an array ``[H, W, C]`` or a tensor ``[C, H, W]``/``[B, C, H, W]``."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    if isinstance(image, np.ndarray):
        return tuple(image.shape[:2])
    if isinstance(image, list) and image:
        return image_size(image[0])
    raise FlexiMMTInputError(f"image must be a PIL image, an array or a tensor, got {type(image).__name__}")


class FlexiMMTPipeline(CogVideoXImageToVideoPipeline):
    """Multi-object multi-motion image-to-video (FlexiMMT) on diffusers' CogVideoX I2V."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str = DEFAULT_MODEL, **kwargs):
        """Load CogVideoX-I2V components (default ``THUDM/CogVideoX-5b-I2V``, or a local folder)."""
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # -- geometry taken from the model's config --------------------------------------------
    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        cfg = self.transformer.config
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        if cfg.patch_size_t is not None:
            latent_frames = -(-latent_frames // cfg.patch_size_t)
        per_token = self.vae_scale_factor_spatial * cfg.patch_size
        return TokenGrid(latent_frames, height // per_token, width // per_token)

    def default_size(self) -> tuple[int, int, int]:
        """(height, width, num_frames) the transformer was built for."""
        cfg = self.transformer.config
        scale = self.vae_scale_factor_spatial
        return cfg.sample_height * scale, cfg.sample_width * scale, cfg.sample_frames

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        cfg = self.transformer.config
        step = 2 * self.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % step:
            lower = max(1, (num_frames - 1) // step * step + 1)
            raise FlexiMMTInputError(
                f"num_frames={num_frames} cannot be produced by this model: use {step}k+1 frames, e.g. {lower} or {lower + step}"
            )
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        max_latent = (cfg.sample_frames - 1) // self.vae_scale_factor_temporal + 1
        if cfg.use_learned_positional_embeddings and latent_frames > max_latent:
            raise FlexiMMTInputError(
                f"num_frames={num_frames} is longer than this model's learned positional embeddings allow: "
                f"use at most {cfg.sample_frames} frames"
            )
        multiple = self.vae_scale_factor_spatial * cfg.patch_size
        sample = (cfg.sample_height * self.vae_scale_factor_spatial, cfg.sample_width * self.vae_scale_factor_spatial)
        if height % multiple or width % multiple:
            raise FlexiMMTInputError(f"height x width = {height} x {width}: both must be multiples of {multiple}")
        if cfg.use_learned_positional_embeddings and (height, width) != sample:
            raise FlexiMMTInputError(
                f"height x width = {height} x {width}, but this model has learned positional embeddings for "
                f"{sample[0]} x {sample[1]} only: leave height and width unset or use those"
            )

    # -- FlexiMMT set-up for one call ------------------------------------------------------
    def prepare_state(
        self,
        image,
        prompt: str,
        objects: Sequence[ObjectMotion],
        grid: TokenGrid,
        *,
        mask_source: str,
        parts: Sequence[str],
        context_text: str,
        attention_backend: str,
        feature_blocks: Sequence[int] | None,
        max_sequence_length: int,
        do_cfg: bool,
        initial_masks: str = "first_frame",
    ) -> tuple[FlexiMMTState, torch.Tensor]:
        """Validate the objects against image, prompt and model; return the state and the
        first-frame masks on the token grid (bool ``[K, h, w]``)."""
        if len(objects) > MAX_OBJECTS:
            raise FlexiMMTInputError(f"{len(objects)} objects given: FlexiMMT takes at most {MAX_OBJECTS}")
        if not isinstance(prompt, str):
            raise FlexiMMTInputError("objects need one text prompt (a str) that holds each object's motion words")
        if mask_source not in MASK_SOURCES:
            raise FlexiMMTInputError(f"mask_source={mask_source!r}: choose from {list(MASK_SOURCES)}")
        if attention_backend not in BACKENDS:
            raise FlexiMMTInputError(f"attention_backend={attention_backend!r}: choose from {list(BACKENDS)}")
        parts, context_text = check_parts(parts), check_context_text(context_text)
        cfg = self.transformer.config
        num_blocks, dim = cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim
        img_h, img_w = image_size(image)
        first = []
        for k, obj in enumerate(objects):
            if not isinstance(obj, ObjectMotion):
                raise FlexiMMTInputError(f"objects[{k}] is a {type(obj).__name__}: give fleximmt.ObjectMotion(mask, motion, motion_text)")
            obj.motion.check_model(num_blocks, dim, source=f"objects[{k}]")
            mask = obj.mask_tensor
            if tuple(mask.shape) != (img_h, img_w):
                raise FlexiMMTInputError(
                    f"objects[{k}]: the mask is {mask.shape[0]} x {mask.shape[1]} but the image is {img_h} x {img_w}: "
                    "give a mask of the image's size"
                )
            grid_mask = mask_to_token_grid(mask, grid.height, grid.width)
            if not grid_mask.any():
                logger.warning("objects[%d] has an empty mask: its motion will reach no video token", k)
            first.append(grid_mask)
        d_ms = {obj.motion.d_m for obj in objects}
        if len(d_ms) > 1:
            raise FlexiMMTInputError(f"the motions have different token counts d_m {sorted(d_ms)}: use motions trained with one d_m")
        spans = find_word_spans(self.tokenizer, prompt, [o.motion_text for o in objects], max_sequence_length)
        member = span_membership(max_sequence_length, spans)
        concept_member = None
        if mask_source == "qk":
            concepts = [o.concept_text or o.motion_text for o in objects]
            concept_member = span_membership(max_sequence_length, find_word_spans(self.tokenizer, prompt, concepts, max_sequence_length))
        if feature_blocks is None:
            feature_blocks = range(max(1, round(num_blocks * FEATURE_BLOCK_SHARE)))
        bad = [b for b in feature_blocks if not 0 <= b < num_blocks]
        if bad:
            raise FlexiMMTInputError(f"feature_blocks {bad} are outside the model's {num_blocks} blocks")
        device = self._execution_device
        state = FlexiMMTState(
            motion_tokens=torch.stack([o.motion.tokens for o in objects]).to(device),
            member=member.to(device),
            parts=parts,
            context_text=context_text,
            backend=attention_backend,
            num_frames=grid.frames,
            concept_member=None if concept_member is None else concept_member.to(device),
            feature_blocks=frozenset(feature_blocks) if mask_source == "rmpm" else frozenset(),
            feature_row=1 if do_cfg else 0,
        )
        first_masks = torch.stack(first).to(device)
        if mask_source == "none":
            state.set_video_masks(torch.ones(len(objects), grid.size, dtype=torch.bool, device=device))
        elif mask_source == "rmpm" and initial_masks == "none":
            # the release's step 0: no masks yet - motion tokens reach only their motion words, and
            # those words see all video (T2V open); RMPM's first masks arrive after step 0
            state.parts = parts - {"t2v"}
            state.set_video_masks(torch.zeros(len(objects), grid.size, dtype=torch.bool, device=device))
        elif mask_source in ("rmpm", "static"):
            state.set_video_masks(first_masks[:, None].expand(-1, grid.frames, -1, -1).reshape(len(objects), -1))
        return state, first_masks

    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 6,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        max_sequence_length: int | None = None,
        *,
        objects: Sequence[ObjectMotion] = (),
        mask_source: str = "rmpm",
        rmpm_method: str = "paper",
        anchors: int = 3,
        alpha: float | None = None,
        feature_blocks: Sequence[int] | None = None,
        parts: Sequence[str] = PARTS,
        context_text: str = "open",
        attention_backend: str = "auto",
        return_masks: bool = False,
        initial_masks: str = "first_frame",
        **kwargs: Any,
    ):
        """Generate a video in which each object of ``objects`` moves with its own motion.

        Takes every argument of ``CogVideoXImageToVideoPipeline.__call__`` (others pass through
        ``kwargs``; height, width, num_frames and max_sequence_length default to the model's own) plus: ``objects`` (``ObjectMotion`` list; empty = plain CogVideoX I2V),
        ``mask_source`` ("rmpm": propagated masks, "static": first-frame masks on every frame,
        "qk": DMEM's QK masks, "none": every object covers all video), ``rmpm_method``
        ("paper" | "released"), ``anchors`` (RMPM's W), ``alpha`` (dynamic RMPM threshold; None =
        update every step), ``feature_blocks`` (blocks whose attention outputs feed RMPM; default
        the first 30/42 of them), ``parts`` (MDMA parts on), ``context_text`` ("open" | "closed"),
        ``attention_backend`` ("auto": grouped SDPA, no N x N mask; "dense": the reference),
        ``return_masks`` (add the per-step masks to the output) and ``initial_masks`` (RMPM's step 0:
        "first_frame" copies the first-frame masks to every latent frame; "none" is the release:
        no masks until RMPM's first update).
        """
        default_h, default_w, default_frames = self.default_size()
        height, width, num_frames = height or default_h, width or default_w, num_frames or default_frames
        self.check_geometry(height, width, num_frames)
        # the text length the transformer was built for (226 for CogVideoX-5B)
        max_sequence_length = max_sequence_length or self.transformer.config.max_text_seq_length
        call = dict(
            image=image, prompt=prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            max_sequence_length=max_sequence_length, **kwargs,
        )  # fmt: skip
        objects = list(objects)
        if not objects:
            return super().__call__(attention_kwargs=attention_kwargs, **call)
        if rmpm_method not in RMPM_METHODS:
            raise FlexiMMTInputError(f"rmpm_method={rmpm_method!r}: choose from {list(RMPM_METHODS)}")
        if anchors < 1:
            raise FlexiMMTInputError(f"anchors={anchors}: RMPM needs at least 1 anchor frame")
        if initial_masks not in INITIAL_MASKS:
            raise FlexiMMTInputError(f"initial_masks={initial_masks!r}: choose from {list(INITIAL_MASKS)}")
        if alpha is not None and not 0 <= alpha < 1:
            raise FlexiMMTInputError(f"alpha={alpha}: give a fraction in [0, 1), e.g. 0.05, or None")
        if kwargs.get("num_videos_per_prompt", 1) != 1:
            raise FlexiMMTInputError("FlexiMMT generates one video per prompt: leave num_videos_per_prompt at 1")

        grid = self.token_grid(height, width, num_frames)
        state, first_masks = self.prepare_state(
            image, prompt, objects, grid,
            mask_source=mask_source, parts=parts, context_text=context_text,
            attention_backend=attention_backend, feature_blocks=feature_blocks,
            max_sequence_length=max_sequence_length, do_cfg=guidance_scale > 1, initial_masks=initial_masks,
        )  # fmt: skip
        install_processors(self.transformer)
        history: list[torch.Tensor] = []
        updating = mask_source == "rmpm"

        def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            nonlocal updating
            state.begin_step()
            if return_masks and state.layout is not None:
                history.append(state.layout.video_masks.view(len(objects), grid.frames, grid.height, grid.width).cpu())
            features = state.take_features()
            if updating and features is not None:
                new = rmpm(first_masks, features.view(grid.frames, grid.height, grid.width, -1), anchors, rmpm_method)
                new = new.reshape(len(objects), -1)
                old = state.layout.video_masks
                state.parts = check_parts(parts)  # after a release-style step 0, every part is on again
                state.set_video_masks(new)
                if alpha is not None and step + 1 >= ALWAYS_UPDATE_STEPS:
                    if all(mask_change(o, n) < alpha for o, n in zip(old, new)):
                        updating = False
                        state.feature_blocks = frozenset()
                        logger.info("dynamic RMPM: masks frozen after step %d", step)
            if callback_on_step_end is not None:
                return callback_on_step_end(pipe, step, timestep, callback_kwargs)
            return {}

        call["callback_on_step_end"] = step_end
        output = super().__call__(attention_kwargs={**(attention_kwargs or {}), "fleximmt": state}, **call)
        masks = torch.stack(history) if history else None
        if not return_masks:
            return output
        if not return_dict:
            return (*output, masks)
        return FlexiMMTPipelineOutput(frames=output.frames, masks=masks)
