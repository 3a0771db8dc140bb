"""Learning a motion (Sec. 4.1, docs/method.md#dmem, docs/method.md#training): train only motion tokens on one
reference video, the video model frozen, DMEM's mask applied inside the attention processors.

The loop is the same for every base model; what differs - how conditions are encoded, how a step
noises the latents and predicts x0 - is the model's adapter (``fleximmt.models``). Stages, each its
own function: ``prepare_conditions`` (encode caption and video windows once, cached on disk),
``training_step`` (loss of docs/method.md#training), checkpoints (atomic, resumable), ``fit_tokens``
(the optimisation loop, which also trains on ComfyUI's own models: ``fleximmt.apps.comfy.learn``), and
``train_motion`` which ties them together and leaves the pipeline as it found it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Collection
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FlexiMMTInputError
from ..method.adapter import ModelAdapter, module_placement
from ..method.attention import FlexiMMTState, motion_state_for
from ..method.kernels import DEFAULT_KERNEL, MASK_KERNELS
from ..method.kernels import check as check_kernel
from ..method.kernels import mask_kernel as kernel_named
from ..method.masks import span_membership
from ..method.motion import MotionTokens, atomic_write
from ..method.pipeline import rename_options, renamed_option
from ..method.presets import fill_preset
from ..models import adapter_for
from .checkpoint import load_checkpoint, save_checkpoint
from .data import RESIZES, as_frames, random_crop, read_video, subsample, to_model_tensor, window_starts

logger = logging.getLogger(__name__)

TRAIN_PARTS = frozenset({"m2v", "m2m", "t2m"})  # one object in training: docs/method.md#mdma
# A block keeps about 24 bytes per token and channel for its backward in bf16 (measured at CogVideoX-5B's
# size: 1,263 MiB for 17,776 tokens x 3,072, BENCHMARKS.md); past this total, gradient checkpointing is on
CHECKPOINT_ABOVE = 8 * 2**30
SAVED_BYTES_PER_TOKEN_CHANNEL = 24
MIXED_PRECISION = ("no", "bf16", "fp16")
LOSS_PRECISIONS = ("float32", "model")
TOKEN_INITS = ("linear", "release")
# what preset="release" sets where the caller did not: the authors' scripts/train_mask.py, its shell scripts and
# data/videovo_dataset.py (docs/method.md#the-releases-recipe)
RELEASE_SETTINGS = {
    "lr_warmup_steps": 0,
    "scale_lr": True,
    "crops": 12,
    "caption_dropout": 0.1,
    "reencode": True,
    "resize": "bicubic",
    "mixed_precision": "bf16",
    "loss_precision": "model",
    "token_init": "release",
    "dmem_drop_exact": True,
    "mask_kernel": "dense",
    "frame_diff_scale": math.sqrt(2),
    "vae_tiling": True,
    "vae_slicing": True,
}


@dataclass
class TrainSettings:
    """Every setting of motion training (docs/method.md#training). The defaults are fleximmt's;
    ``preset="release"`` sets the authors' released recipe wherever a setting is not given
    (docs/method.md#the-releases-recipe: each setting, the release's value and why fleximmt's differs)."""

    steps: int = 2000
    tokens_per_motion: int = 226
    seed: int = 0
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    lr_warmup_steps: int = 100
    lr_cycles: int = 1  # cosine with hard restarts
    max_grad_norm: float = 1.0
    num_frames: int | None = None  # None: the model's own (49 for CogVideoX-5B)
    height: int | None = None
    width: int | None = None
    fps: float | None = 8.0  # subsample the reference to about this rate
    max_windows: int = 4  # num_frames-long windows of the reference, encoded once
    train_mask: bool = True  # DMEM's mask in training; False is Table 3's "w/o Train" ablation
    dmem_drop: float = 0.3  # DMEM: fraction of mask positives dropped per call
    image_dropout: float = 0.05  # probability of a zeroed image condition
    frame_diff_weight: float = 1.0
    frame_diff_scale: float = 1.0  # the release multiplies x[k+1] by sqrt(2); docs/method.md#training: a setting, 1
    checkpoint_every: int = 200
    mixed_precision: str = "no"
    gradient_checkpointing: bool | None = None  # None: on when activations would pass CHECKPOINT_ABOVE (real sizes)
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload_after_caching: bool = (
        True  # encoders (adapter.conditioning_modules) and VAE to the CPU while the tokens train; put back after
    )
    preset: str | None = None  # "release": the authors' recipe where a setting is not given
    scale_lr: bool = False  # lr times the processes sharing the motion (batch 1, no accumulation), as the release
    crops: int = 0  # train on this many random spatial crops of the reference, cycled (the release: 12); 0: none
    caption_dropout: float = 0.0  # probability that a sample's caption is empty, drawn once per sample
    reencode: bool = False  # encode each step's sample anew (a fresh VAE posterior sample); False: encode once
    resize: str = "bilinear"  # frames to the training size: "bilinear", or "bicubic" on the uint8 frames
    loss_precision: str = "float32"  # "model": latents, noise and loss terms in the model's precision
    token_init: str = "linear"  # "release": kaiming_uniform_ over each block's [1, d_m, dim], about 6x narrower
    dmem_drop_exact: bool = False  # drop exactly int(dmem_drop x positives), at least one; False: each at random
    # how MDMA is computed (TransferOptions.mask_kernel): "auto" (grouped), "dense" (the release's masked attention,
    # bit for bit) or "flex" (a GPU only: no FlexAttention backward on a CPU)
    mask_kernel: str = DEFAULT_KERNEL
    attention_backend: InitVar[str | None] = None  # mask_kernel's old name, until fleximmt 0.2

    def __post_init__(self, attention_backend: str | None) -> None:
        if attention_backend is not None:
            self.mask_kernel = renamed_option("attention_backend", attention_backend)

    def apply_preset(self, given: Collection[str]) -> None:
        """Fill the settings the caller did not pass (``given``: the names passed) from ``preset``."""
        fill_preset(self, self.preset, RELEASE_SETTINGS, given)

    def validate(self) -> None:
        if self.steps < 1 or self.tokens_per_motion < 1:
            raise FlexiMMTInputError(f"steps={self.steps} and tokens_per_motion={self.tokens_per_motion} must be >= 1")
        if not 0 <= self.dmem_drop < 1 or not 0 <= self.image_dropout < 1:
            raise FlexiMMTInputError("dmem_drop and image_dropout are probabilities in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise FlexiMMTInputError(f"mixed_precision={self.mixed_precision!r}: choose from {list(MIXED_PRECISION)}")
        if self.checkpoint_every < 1:
            raise FlexiMMTInputError(f"checkpoint_every={self.checkpoint_every}: give a number of steps >= 1")
        for name, value, choices in (
            ("resize", self.resize, RESIZES),
            ("loss_precision", self.loss_precision, LOSS_PRECISIONS),
            ("token_init", self.token_init, TOKEN_INITS),
            ("mask_kernel", self.mask_kernel, MASK_KERNELS),
        ):
            if value not in choices:
                raise FlexiMMTInputError(f"{name}={value!r}: choose from {list(choices)}")
        if self.crops < 0 or not 0 <= self.caption_dropout < 1:
            raise FlexiMMTInputError(
                f"crops={self.crops} and caption_dropout={self.caption_dropout}: give crops >= 0 (0: none) "
                "and a probability in [0, 1)"
            )

    def fingerprint(self) -> str:
        """What a resumed run must share with the run that wrote the checkpoint."""
        skip = ("checkpoint_every", "offload_after_caching", "gradient_checkpointing", "vae_slicing", "vae_tiling")
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(pipe) -> str:
    """``name@hash`` of the (first) transformer: its config and a checksum of its output projection.

    ``name`` is the hub id, or the folder's own name for a local model (not its absolute path, so
    a motion learned in one checkout names the same model in another)."""
    transformer = adapter_for(pipe).transformers()[0]
    cfg = transformer.config
    keep = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    weight = linear_weight(transformer.proj_out)
    blob = json.dumps(keep, sort_keys=True, default=str) + f"{weight.sum().item():.6e}{weight.abs().sum().item():.6e}"
    name = str(getattr(pipe, "name_or_path", None) or cfg.get("_name_or_path") or "model")
    if os.path.isdir(name):
        name = Path(name).resolve().name
    return f"{name}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@torch.no_grad()
def linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as float32 ``[out, in]``: the tensor itself, or for a quantized (optimum-quanto,
    torchao, GGUF, bitsandbytes) or offloaded one, what the layer computes from it - its output on the
    identity, less its bias."""
    weight = layer.weight
    if type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.device.type != "meta":
        return weight.detach().float()
    bias = getattr(layer, "bias", None)
    like = bias if isinstance(bias, torch.Tensor) and bias.is_floating_point() else None
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None and like.device.type != "meta" else None
    out = layer(torch.eye(layer.in_features, dtype=dtype, device=device))
    if like is not None:
        out = out - bias.to(out.device, out.dtype)
    return out.float().t()


def base_loras(pipe) -> list[dict[str, Any]]:
    """The LoRAs acting on the denoisers of ``pipe`` (diffusers' ``load_lora_weights`` / ``set_adapters`` /
    ``fuse_lora`` leave peft layers there): for each component and adapter, its weight (one number, or the
    distinct ones where blocks differ) and whether it is fused. A motion trained through them records them."""
    adapter = adapter_for(pipe)
    names = {id(module): name for name, module in pipe.components.items()}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for transformer in adapter.transformers():
        component = names.get(id(transformer), "transformer")
        for module in transformer.modules():
            scaling = getattr(module, "scaling", None)
            if not isinstance(scaling, dict) or not hasattr(module, "merged_adapters"):
                continue  # not a peft LoRA layer
            merged = set(module.merged_adapters)
            active = set() if getattr(module, "disable_adapters", False) else set(module.active_adapters)
            for name in sorted((merged | active) & set(scaling)):
                rank = module.r[name] ** 0.5 if module.use_rslora.get(name) else module.r[name]
                entry = found.setdefault(
                    (component, name),
                    {"component": component, "adapter": name, "weights": set(), "fused": name in merged},
                )
                entry["weights"].add(round(scaling[name] * rank / module.lora_alpha[name], 6))
    loras = []
    for entry in found.values():
        weights = sorted(entry.pop("weights"))
        loras.append({**entry, "weight": weights[0] if len(weights) == 1 else weights})
    return loras


def process_state():
    """accelerate's view of this process (rank, world size); CPU-only machines use gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


# -- stage 1: conditions, encoded once and cached -----------------------------------------
@dataclass
class Conditions:
    """A reference's encoded caption and windows (``tensors``: the model adapter's names, among them
    ``prompt_embeds`` and ``video_latents [W, F, C, h, w]``), and where its words are."""

    tensors: dict[str, torch.Tensor]
    member: torch.Tensor  # bool [1, L_y]: motion words
    concept_member: torch.Tensor  # bool [1, L_y]: concept words

    @property
    def windows(self) -> int:
        return self.tensors["video_latents"].shape[0]


def load_reference(
    video,
    num_frames: int,
    fps: float | None,
    start: int | None = None,
    end: int | None = None,
    video_fps: float | None = None,
) -> np.ndarray:
    """The reference frames between ``start`` and ``end``, subsampled to about ``fps``; frames given
    as an array are at ``video_fps`` (None: already at ``fps``)."""
    if isinstance(video, (str, os.PathLike)):
        frames, native_fps = read_video(video)
    else:
        if video_fps is not None and not video_fps > 0:
            raise FlexiMMTInputError(f"video_fps={video_fps}: give the reference frames' rate in frames per second")
        frames, native_fps = as_frames(video, "reference video"), video_fps or fps or 8.0
    return subsample(frames[start:end], native_fps, fps, num_frames)


@torch.no_grad()
def prepare_conditions(
    adapter: ModelAdapter,
    frames: np.ndarray,
    caption: str,
    concept_words: str,
    motion_words: str,
    settings: TrainSettings,
    geometry: tuple[int, int, int],
    cache: Path | None,
    seed: int,
) -> Conditions:
    """Encode the caption and every training window of the reference video (cached in ``cache``; None: not
    cached, and ``adapter`` may be any with ``encode_conditions``, ``word_spans`` and ``default_text_length``)."""
    height, width, num_frames = geometry
    text_len = adapter.default_text_length()
    member, concept_member = word_members(adapter, caption, concept_words, motion_words)
    starts = window_starts(len(frames), num_frames, settings.max_windows)
    key = None
    if cache is not None:
        fingerprint = [caption, geometry, starts, model_fingerprint(adapter.pipe), seed, settings.resize]
        key = hashlib.sha256(frames.tobytes() + json.dumps(fingerprint).encode()).hexdigest()
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                logger.info("reusing cached latents %s", cache)
                return Conditions({name: f.get_tensor(name) for name in f.keys()}, member, concept_member)
    clips = [
        to_model_tensor(frames[start : start + num_frames], height, width, settings.resize)
        for start in tqdm(starts, desc="reading reference windows", disable=len(starts) < 2)
    ]
    tensors = adapter.encode_conditions(clips, caption, text_len, torch.Generator().manual_seed(seed))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if cache is not None:
        from safetensors.torch import save_file

        atomic_write(cache, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
    return Conditions(tensors, member, concept_member)


def word_members(adapter: ModelAdapter, caption: str, concept_words: str, motion_words: str):
    """Bool ``[1, L_y]`` each: where the caption's motion words and concept words are among the text tokens."""
    text_len = adapter.default_text_length()
    motion = adapter.word_spans(caption, [motion_words], text_len)
    concept = adapter.word_spans(caption, [concept_words], text_len)
    return span_membership(text_len, motion), span_membership(text_len, concept)


@dataclass
class Sample:
    """One training sample of the release's recipe (docs/method.md#the-releases-recipe): a window of the
    reference, from one crop of it or the whole frame, and the caption it trains with (empty when dropped)."""

    start: int
    crop: tuple[int, int, int, int] | None  # top, left, height, width; None: the whole frame
    caption: str

    def clip(self, frames: np.ndarray, geometry: tuple[int, int, int], resize: str) -> torch.Tensor:
        """The sample's frames as the model takes them, ``[3, T, height, width]`` in [-1, 1]."""
        height, width, num_frames = geometry
        window = frames[self.start : self.start + num_frames]
        if self.crop is not None:
            top, left, h, w = self.crop
            window = window[:, top : top + h, left : left + w]
        return to_model_tensor(window, height, width, resize)


def draw_samples(
    frames: np.ndarray, caption: str, settings: TrainSettings, geometry: tuple[int, int, int], generator
) -> list[Sample]:
    """The samples a run trains on, drawn once, in the order a run with ``crops`` cycles through them.

    With ``crops``, that many random crops of the reference (:func:`data.random_crop`, the training size's
    aspect), each with a random window, shuffled once: the release's data loader, cycled, replays its first
    pass. Without, the windows of :func:`data.window_starts`. Each sample's caption is dropped with
    probability ``caption_dropout``, once, as the release's first pass drops it."""
    height, width, num_frames = geometry
    if settings.crops:
        window_starts(len(frames), num_frames, 1)  # refuses a reference shorter than a window
        last = len(frames) - num_frames
        boxes = [random_crop(*frames.shape[1:3], height / width, generator) for _ in range(settings.crops)]
        starts = [int(torch.randint(0, last + 1, (1,), generator=generator)) for _ in boxes]
        order = torch.randperm(settings.crops, generator=generator).tolist()
        picks = [(starts[i], boxes[i]) for i in order]
    else:
        picks = [(start, None) for start in window_starts(len(frames), num_frames, settings.max_windows)]
    dropped = [torch.rand((), generator=generator).item() < settings.caption_dropout for _ in picks]
    return [Sample(start, box, "" if drop else caption) for (start, box), drop in zip(picks, dropped)]


def encode_sample(
    adapter: ModelAdapter,
    frames: np.ndarray,
    sample: Sample,
    members: tuple[torch.Tensor, torch.Tensor],
    settings: TrainSettings,
    geometry: tuple[int, int, int],
    generator: torch.Generator,
) -> Conditions:
    """One sample's conditions (one window), its latents a sample of the VAE's posterior drawn from
    ``generator``. The motion and concept words stay where the caption has them, also when the sample's
    caption is dropped, as in the release."""
    with torch.no_grad():
        tensors = adapter.encode_conditions(
            [sample.clip(frames, geometry, settings.resize)], sample.caption, adapter.default_text_length(), generator
        )
    return Conditions(tensors, *members)


# -- stage 2: the loss ------------------------------------------------------------------------
def training_step(
    adapter: ModelAdapter,
    state: FlexiMMTState,
    cond: Conditions,
    window: int,
    generator: torch.Generator,
    settings: TrainSettings,
    autocast,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """One loss of docs/method.md#training: the weighted x0 error (the model's own objective) plus a
    frame-difference term at a random latent frame; returns it and the expert that computed it. ``dtype``:
    the precision of the latents and the loss terms (None: float32; docs/method.md#the-releases-recipe)."""
    batch = adapter.training_prediction(
        state, cond.tensors, window, generator, settings.image_dropout, autocast, dtype=dtype
    )
    x0, x0_hat = batch.x0[:, batch.loss_frames], batch.x0_hat[:, batch.loss_frames]
    loss = (batch.weight * (x0_hat - x0) ** 2).mean()
    if settings.frame_diff_weight and x0.shape[1] > 1:
        frame = int(torch.randint(0, x0.shape[1] - 1, (1,), generator=generator))
        s = settings.frame_diff_scale
        d_gt = s * x0[:, frame + 1] - x0[:, frame]
        d_pred = s * x0_hat[:, frame + 1] - x0_hat[:, frame]
        loss = loss + settings.frame_diff_weight * ((d_gt - d_pred) ** 2).mean()
    return loss, batch.expert


# -- stage 3: checkpoints (fleximmt.training.checkpoint) ----------------------------------------------
def learning_rate(settings: TrainSettings, processes: int) -> float:
    """The optimiser's learning rate for ``processes`` processes training one motion: ``lr``, or with
    ``scale_lr`` the release's scaling, lr x processes x batch size (1) x gradient accumulation (1)."""
    return settings.lr * processes if settings.scale_lr else settings.lr


def initial_tokens(num_blocks: int, d_m: int, dim: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """A motion's first tokens ``[blocks, d_m, dim]``. ``"linear"``: every token as PyTorch initialises a linear
    layer's weight rows, Kaiming-uniform with a = sqrt(5) over ``dim``, uniform within 1 / sqrt(dim).
    ``"release"``: each block's ``[1, d_m, dim]`` tensor Kaiming-uniform with PyTorch's defaults (a = 0, fan-in
    d_m x dim), uniform within sqrt(6 / (d_m dim)), as the release's processors draw theirs."""
    tokens = torch.empty(num_blocks, d_m, dim)
    if init == "release":
        for block in tokens:
            torch.nn.init.kaiming_uniform_(block[None], generator=generator)
    else:
        torch.nn.init.kaiming_uniform_(tokens.view(-1, dim), a=math.sqrt(5), generator=generator)
    return tokens


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.stem + ".ckpt.safetensors")


def cache_path(output: Path) -> Path:
    return output.with_name(output.stem + ".latents.safetensors")


def placed_by_hooks(module: torch.nn.Module) -> bool:
    """Whether offload hooks move ``module`` (accelerate's model or sequential offload, diffusers' group
    offloading): training then runs on the pipeline's execution device and leaves the module where it is."""
    if hasattr(module, "_hf_hook"):
        return True
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(module)


@contextlib.contextmanager
def placement_kept(pipe):
    """Put every module component back on the device and dtype it had, however the block ends
    (training offloads the encoders and the VAE while the tokens train)."""
    before = module_placement(pipe)
    try:
        yield
    finally:
        now = module_placement(pipe)
        for name, (device, dtype) in before.items():
            module = pipe.components[name]
            if placed_by_hooks(module):
                continue  # offload hooks own such a module's placement
            # the dtype only where it changed: ``.to(dtype)`` also casts buffers kept in another dtype
            # on purpose (CogVideoX's float64 positional table)
            if now.get(name, (device, dtype))[1] == dtype:
                module.to(device=device)
            else:
                module.to(device=device, dtype=dtype)


def checkpointing_needed(adapter: ModelAdapter, grid, text_len: int) -> bool:
    """``gradient_checkpointing=None``: whether the blocks' saved activations would pass
    ``CHECKPOINT_ABOVE`` (CogVideoX-5B at 480x720x49: about 51 GiB - on; the toy model: 8 MiB - off)."""
    blocks, dim = adapter.motion_shape()
    saved = blocks * (grid.size + text_len) * dim * SAVED_BYTES_PER_TOKEN_CHANNEL
    return saved > CHECKPOINT_ABOVE


def checkpoint_interval(steps: int) -> int:
    """How often a run started from a page or a node graph (the web app, ComfyUI) saves its
    checkpoint: about 20 times a run, at least every 50 steps."""
    return max(1, min(50, int(steps) // 20))


def offload_target(device: torch.device) -> str | None:
    """Where the encoders and the VAE wait while the tokens train on ``device`` (None: stay)."""
    return "cpu" if device.type != "cpu" else None


# -- stage 4: the tokens' optimisation, on any model the adapter runs ----------------------------
@dataclass
class Reference:
    """The reference a motion learns from: its frames (uint8 ``[T, H, W, 3]``, subsampled) and its words."""

    frames: np.ndarray
    caption: str
    concept_words: str
    motion_words: str


def fit_tokens(
    adapter,
    cfg: TrainSettings,
    geometry: tuple[int, int, int],
    checkpoint: Path,
    fingerprints: dict[str, Any],
    device: torch.device,
    *,
    cond: Conditions | None,
    reference: Reference | None = None,
    resume: bool = False,
    callback: Callable[[int, float], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_dtype: torch.dtype | None = None,
    proc=None,
    distributed: bool = False,
    after_encoding: Callable[[], None] = lambda: None,
    desc: str = "training",
) -> tuple[list[torch.nn.Parameter], list[float]]:
    """Optimise one token set per expert of ``adapter`` from ``cond`` (the windows, encoded once) or, with
    ``cond`` None, from the samples of ``reference`` (crops, dropped captions, fresh encodings); returns the
    tokens and each step's loss. This is the loop of :func:`train_motion`, shared by every model a training
    adapter runs: fleximmt's diffusers pipelines and ComfyUI's own models (``fleximmt.apps.comfy.learn``).

    ``adapter`` gives ``motion_shape()``, ``transformers()`` (one per expert), ``token_grid``,
    ``state_settings()``, ``parts``, ``training_attached(state)`` and ``training_prediction(...)``
    (``ModelAdapter``'s training half); per-sample runs also ``encode_conditions``, ``word_spans`` and ``default_text_length``.
    ``checkpoint`` is resumed when ``resume`` (refused where ``fingerprints`` differ) and written every
    ``cfg.checkpoint_every`` steps and when ``callback(step, loss)`` raises. ``proc``: accelerate's
    process state (None: one process); ``distributed``: the processes share this motion, gradients averaged.
    ``after_encoding`` runs once every sample is encoded (the encoders may leave the device then)."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    rank, world = (proc.process_index, proc.num_processes) if proc is not None else (0, 1)
    transformers = adapter.transformers()
    grid = adapter.token_grid(*geometry)
    num_blocks, dim = adapter.motion_shape()
    generator = torch.Generator().manual_seed(cfg.seed)
    params = {}
    for expert in range(len(transformers)):  # one token set per expert; checkpoints name them tokens, tokens_2, ...
        tokens = initial_tokens(num_blocks, cfg.tokens_per_motion, dim, cfg.token_init, generator)
        params["tokens" if expert == 0 else f"tokens_{expert + 1}"] = torch.nn.Parameter(tokens.to(device))
    experts = list(params.values())
    lr = learning_rate(cfg, world if distributed else 1)
    optimizer = torch.optim.AdamW(experts, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, min(cfg.lr_warmup_steps, cfg.steps // 10), cfg.steps, cfg.lr_cycles
    )
    # the training randomness lives in one generator per process (saved in checkpoints)
    generator.manual_seed(cfg.seed * 1000 + rank + 1)
    samples, encoded = None, {}
    if cond is None:
        frames = reference.frames
        members = word_members(adapter, reference.caption, reference.concept_words, reference.motion_words)
        samples = draw_samples(frames, reference.caption, cfg, geometry, generator)
        if distributed and len(samples) >= world:
            samples = samples[rank::world]
        if not cfg.reencode:  # each sample encoded once; the encoders may leave after
            for i, sample in enumerate(samples):
                encoded[i] = encode_sample(adapter, frames, sample, members, cfg, geometry, generator)
            after_encoding()
    else:
        members = cond.member, cond.concept_member
    start = 0
    if resume and checkpoint.is_file():
        start = load_checkpoint(checkpoint, params, optimizer, scheduler, generator, fingerprints)
        logger.info("resumed %s at step %d", checkpoint, start)

    state = motion_state_for(
        torch.stack(experts)[None],
        members[0].to(device),
        **adapter.state_settings(),
        parts=(TRAIN_PARTS & set(adapter.parts)) if cfg.train_mask else frozenset(),
        num_frames=grid.frames,
        dmem=cfg.train_mask,
        concept_member=members[1].to(device),
        dmem_drop=cfg.dmem_drop,
        dmem_drop_exact=cfg.dmem_drop_exact,
        generator=generator,
        mask_kernel=cfg.mask_kernel,
    )
    if not cfg.train_mask:  # w/o Train: motion tokens reach every video token
        state.set_video_masks(torch.ones(1, grid.size, dtype=torch.bool, device=device))
    windows = list(range(cond.windows)) if samples is None else []
    if distributed and len(windows) >= world:
        windows = windows[rank::world]
    losses: list[float] = []
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc=desc,
        disable=proc is not None and not proc.is_local_main_process,
    )
    for transformer in transformers:
        transformer.train(False)
    # the state stays attached through each backward pass too: gradient checkpointing recomputes blocks there
    with adapter.training_attached(state):
        for step in bar:
            if samples is None:
                step_cond, window = cond, windows[int(torch.randint(0, len(windows), (1,), generator=generator))]
            else:  # with crops, the samples in their order, cycled; else one at random
                index = (
                    step % len(samples) if cfg.crops else int(torch.randint(0, len(samples), (1,), generator=generator))
                )
                step_cond = encoded.get(index) or encode_sample(
                    adapter, frames, samples[index], members, cfg, geometry, generator
                )
                window = 0
            state.set_motion_tokens(torch.stack(experts)[None])
            state.begin_step(grid.size, num_blocks)
            loss, expert = training_step(adapter, state, step_cond, window, generator, cfg, autocast, loss_dtype)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            used = torch.tensor([float(e == expert) for e in range(len(experts))], device=device)
            if distributed:
                from accelerate.utils import reduce

                used = reduce(used, reduction="sum")
                for param in experts:
                    param.grad = reduce(param.grad, reduction="mean")
            for param, was_used in zip(experts, used.tolist()):
                if not was_used:  # an expert no process used this step keeps its tokens and optimiser state
                    param.grad = None
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in experts if p.grad is not None], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            value = loss.item()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            done = step + 1
            saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if saved:
                save_checkpoint(checkpoint, done, params, optimizer, scheduler, generator, fingerprints)
            if callback is not None:
                try:
                    callback(done, value)
                except BaseException:  # a callback that raises stops the run: resume=True continues after this step
                    if not saved:
                        save_checkpoint(checkpoint, done, params, optimizer, scheduler, generator, fingerprints)
                    raise
    bar.close()
    return experts, losses


# -- the whole job -------------------------------------------------------------------------
@dataclass
class TrainResult:
    motion: MotionTokens
    losses: list[float] = field(default_factory=list)


def learned_motion(
    experts: list[torch.Tensor],
    output: Path,
    caption: str,
    concept_words: str,
    motion_words: str,
    fingerprints: dict[str, Any],
    cfg: TrainSettings,
    family: str,
    loras: list[dict[str, Any]] | None = None,
) -> MotionTokens:
    """The motion :func:`fit_tokens` learned (its experts' tokens, on the CPU), named after ``output`` and stamped
    with what it was learned from: the caption and its words, the base model's fingerprint and family, the steps
    and the LoRAs fused into the model (``base_loras``; None: none known)."""
    return MotionTokens(
        [p.detach().cpu().clone() for p in experts],
        name=output.stem,
        caption=caption,
        concept_words=concept_words,
        motion_words=motion_words,
        base_model=fingerprints["model"],
        steps=cfg.steps,
        family=family,
        **({} if loras is None else {"base_loras": loras}),
    )


def train_motion(
    pipe,
    video,
    caption: str,
    concept_words: str,
    motion_words: str,
    output: str | os.PathLike,
    steps: int = 2000,
    tokens_per_motion: int = 226,
    seed: int = 0,
    *,
    resume: bool = False,
    start_frame: int | None = None,
    end_frame: int | None = None,
    video_fps: float | None = None,
    callback: Callable[[int, float], None] | None = None,
    shard_windows: bool = True,
    return_losses: bool = False,
    **settings: Any,
) -> MotionTokens | TrainResult:
    """Learn motion tokens from one reference video and write them to ``output`` (safetensors).

    ``pipe`` is a FlexiMMT pipeline or diffusers' own pipeline of a supported model (CogVideoX or
    Wan image-to-video); ``video`` a path or uint8 ``[T, H, W, 3]`` (at ``video_fps`` frames a second;
    None: at the ``fps`` training subsamples to); ``concept_words`` name the
    object in ``caption`` and ``motion_words`` describe its motion. Every other setting of
    :class:`TrainSettings` is a keyword. ``resume=True`` continues from the checkpoint beside
    ``output``; ``callback(step, loss)`` is called after every step, and a callback that raises
    stops the run there, with a checkpoint of that step saved first (a cancel button). Under ``accelerate launch``
    the processes share one motion: each trains on its own windows of the video and gradients are
    averaged (``shard_windows``). Every component of ``pipe`` is back on its device and dtype, and
    its attention still FlexiMMT's, when this returns, so the same pipeline generates next. A quantized
    transformer, or one carrying LoRAs (``load_lora_weights``), stays frozen as it is: gradients reach
    only the motion tokens, and the motion file records the LoRAs (``base_loras``).
    """
    settings = rename_options(settings)  # an old setting name warns and gives its new one
    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainSettings)}
    if unknown:
        raise FlexiMMTInputError(
            f"unknown training setting(s) {sorted(unknown)}: see fleximmt.training.train.TrainSettings"
        )
    cfg = TrainSettings(steps=steps, tokens_per_motion=tokens_per_motion, seed=seed, **settings)
    cfg.apply_preset(given=settings)
    cfg.validate()
    adapter = adapter_for(pipe)
    adapter.check_model()
    transformers = adapter.transformers()
    was_training = [t.training for t in transformers]
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    trainable = [[p.requires_grad for p in m.parameters()] for m in modules]  # frozen while the tokens train
    checkpointing = [getattr(t, "gradient_checkpointing", False) for t in transformers]
    vae_flags = (getattr(pipe.vae, "use_slicing", False), getattr(pipe.vae, "use_tiling", False))
    try:
        with placement_kept(pipe):
            return _train(
                adapter,
                video,
                caption,
                concept_words,
                motion_words,
                Path(output),
                cfg,
                resume,
                start_frame,
                end_frame,
                video_fps,
                callback,
                shard_windows,
                return_losses,
            )
    finally:
        for module, flags in zip(modules, trainable):
            for param, flag in zip(module.parameters(), flags):
                param.requires_grad_(flag)
        for transformer, training, checkpointed in zip(transformers, was_training, checkpointing):
            transformer.train(training)
            if not checkpointed and getattr(transformer, "gradient_checkpointing", False):
                transformer.disable_gradient_checkpointing()
        _set_vae_flags(pipe.vae, *vae_flags)


def _set_vae_flags(vae, slicing: bool, tiling: bool) -> None:
    for flag, on, off in (
        ("use_slicing", "enable_slicing", "disable_slicing"),
        ("use_tiling", "enable_tiling", "disable_tiling"),
    ):
        want = slicing if flag == "use_slicing" else tiling
        if hasattr(vae, flag) and getattr(vae, flag) != want:
            getattr(vae, on if want else off)()


def _train(
    adapter: ModelAdapter,
    video,
    caption: str,
    concept_words: str,
    motion_words: str,
    output: Path,
    cfg: TrainSettings,
    resume: bool,
    start_frame,
    end_frame,
    video_fps,
    callback,
    shard_windows: bool,
    return_losses: bool,
) -> MotionTokens | TrainResult:
    pipe = adapter.pipe
    proc = process_state()  # rank and world size under `accelerate launch`, else one process
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)

    def autocast():
        return torch.autocast(proc.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    default_h, default_w, default_f = adapter.default_size()
    geometry = (cfg.height or default_h, cfg.width or default_w, cfg.num_frames or default_f)
    adapter.check_geometry(*geometry)
    if adapter.video_shard(adapter.token_grid(*geometry).size) is not None:
        raise FlexiMMTInputError(
            "training a motion with context parallelism (transformer.enable_parallelism): each process would hold "
            "the gradients of its share of the video tokens only; train without it (`accelerate launch` runs "
            "training data-parallel, each process on whole windows)"
        )
    offloaded = any(placed_by_hooks(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    device = pipe._execution_device if offloaded else proc.device
    check_kernel(kernel_named(cfg.mask_kernel), device, grad=True)  # before any encoding: flex trains on a GPU only
    if not offloaded and pipe.device != device:
        pipe.to(device)
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()

    frames = load_reference(video, geometry[2], cfg.fps, start_frame, end_frame, video_fps)
    # the release's data (crops, dropped captions, a fresh encoding each step) runs on samples; else the
    # windows are encoded once and cached on disk
    by_sample = bool(cfg.crops or cfg.caption_dropout or cfg.reencode)
    encoders = [getattr(pipe, name) for name in adapter.conditioning_modules()]
    target = None if offloaded else offload_target(device)

    def offload_encoders() -> None:
        if cfg.offload_after_caching and target is not None:
            for module in (*encoders, pipe.vae):
                module.to(target)

    if not by_sample:
        with proc.main_process_first():  # the main process encodes, the others read its cache
            cond = prepare_conditions(
                adapter, frames, caption, concept_words, motion_words, cfg, geometry, cache_path(output), cfg.seed
            )
        offload_encoders()

    transformers = adapter.transformers()
    for module in (*transformers, pipe.vae, *encoders):
        module.requires_grad_(False)
    adapter.install_processors()
    grid = adapter.token_grid(*geometry)
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        checkpointing = checkpointing_needed(adapter, grid, adapter.default_text_length())
        logger.info(
            "gradient checkpointing %s (gradient_checkpointing=None decides by size)", "on" if checkpointing else "off"
        )
    if checkpointing:
        for transformer in transformers:
            transformer.enable_gradient_checkpointing()
    distributed = shard_windows and proc.num_processes > 1  # one motion, windows shared out
    ckpt = checkpoint_path(output)
    if distributed and proc.process_index:  # every rank keeps its own RNG state
        ckpt = ckpt.with_name(ckpt.stem + f".rank{proc.process_index}.safetensors")
    fingerprints = {
        "model": model_fingerprint(pipe),
        "settings": cfg.fingerprint(),
        "caption": caption,
        "words": f"{concept_words}|{motion_words}",
        "processes": proc.num_processes if distributed else 1,
    }
    loss_dtype = (autocast_dtype or transformers[0].dtype) if cfg.loss_precision == "model" else None
    experts, losses = fit_tokens(
        adapter,
        cfg,
        geometry,
        ckpt,
        fingerprints,
        device,
        cond=None if by_sample else cond,
        reference=Reference(frames, caption, concept_words, motion_words),
        resume=resume,
        callback=callback,
        autocast=autocast,
        loss_dtype=loss_dtype,
        proc=proc,
        distributed=distributed,
        after_encoding=offload_encoders,
        desc=f"training {output.name}",
    )

    motion = learned_motion(
        experts, output, caption, concept_words, motion_words, fingerprints, cfg, adapter.family, base_loras(pipe)
    )
    if proc.is_main_process or not distributed:
        motion.save(output)
    if distributed:
        proc.wait_for_everyone()
    return TrainResult(motion, losses) if return_losses else motion


# -- many motions: one per row of a dataset file ----------------------------------------------
@dataclass
class DatasetRow:
    """One motion to learn: a reference video and its words (a row of ``--dataset``)."""

    video: str
    caption: str
    concept_words: str
    motion_words: str
    start: int | None = None
    end: int | None = None
    fps: float | None = None
    name: str | None = None

    @property
    def output_name(self) -> str:
        return (self.name or Path(self.video).stem) + ".safetensors"


def read_dataset(path: str | os.PathLike) -> list[DatasetRow]:
    """Rows of a CSV (with a header) or JSON-lines file: video, caption, concept_words,
    motion_words, and optionally start, end (frames), fps and name. Relative video paths are
    taken from the dataset file's folder."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FlexiMMTInputError(f"dataset {str(path)!r} does not exist: give a .csv or .jsonl file")
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json"):
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise FlexiMMTInputError(f"dataset {str(path)!r} is not valid JSON lines ({err})") from None
    else:
        records = list(csv.DictReader(text.splitlines()))
    aliases = {"concept": "concept_words", "motion": "motion_words", "start_frame": "start", "end_frame": "end"}
    fields = {f.name: f.type for f in dataclasses.fields(DatasetRow)}
    rows = []
    for number, record in enumerate(records, 1):
        record = {aliases.get(k.strip(), k.strip()): v for k, v in record.items() if v not in (None, "")}
        missing = [k for k in ("video", "caption", "concept_words", "motion_words") if k not in record]
        unknown = [k for k in record if k not in fields]
        if missing or unknown:
            raise FlexiMMTInputError(
                f"dataset {str(path)!r} row {number}: missing {missing} / unknown {unknown} columns; "
                "columns are video, caption, concept_words, motion_words, start, end, fps, name"
            )
        for key, cast in (("start", int), ("end", int), ("fps", float)):
            if key in record:
                try:
                    record[key] = cast(record[key])
                except ValueError:
                    raise FlexiMMTInputError(f"dataset row {number}: {key}={record[key]!r} is not a number") from None
        video = Path(str(record["video"]))
        record["video"] = str(video if video.is_absolute() else path.parent / video)
        rows.append(DatasetRow(**record))
    if not rows:
        raise FlexiMMTInputError(f"dataset {str(path)!r} has no rows")
    return rows


def train_dataset(pipe, rows: list[DatasetRow], out_dir: str | os.PathLike, **kwargs: Any) -> list[Path]:
    """Train one motion per row into ``out_dir``. Under ``accelerate launch`` each process takes its
    own share of the rows (rank, rank + world, ...), so every row is trained exactly once."""
    state = process_state()
    out_dir = Path(out_dir)
    done = []
    for row in rows[state.process_index :: state.num_processes]:
        settings = dict(kwargs)
        if row.fps is not None:
            settings["fps"] = row.fps
        output = out_dir / row.output_name
        logger.info("process %d trains %s -> %s", state.process_index, row.video, output)
        train_motion(
            pipe,
            row.video,
            row.caption,
            row.concept_words,
            row.motion_words,
            output,
            start_frame=row.start,
            end_frame=row.end,
            shard_windows=False,
            **settings,
        )
        done.append(output)
    return done
