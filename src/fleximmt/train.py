"""Learning a motion (Sec. 4.1, METHOD.md sections 4 and 6): train only motion tokens on one
reference video, the video model frozen, DMEM's mask applied inside the one attention processor.

Stages, each its own function: ``prepare_conditions`` (encode caption and video windows once,
cached on disk), ``training_step`` (loss of METHOD.md section 6), checkpoints (atomic, resumable),
and ``train_motion`` which ties them together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import FlexiMMTState, install_processors
from .checkpoint import load_checkpoint, save_checkpoint
from .data import as_frames, read_video, subsample, to_model_tensor, window_starts
from .errors import FlexiMMTInputError
from .masks import span_membership
from .motion import MotionTokens, atomic_write
from .prompt import find_word_spans

logger = logging.getLogger(__name__)

TRAIN_PARTS = frozenset({"m2v", "m2m", "t2m"})  # one object in training: METHOD.md section 3
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainSettings:
    """Every setting of motion training; defaults are the authors' release (METHOD.md section 6)."""

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
    frame_diff_scale: float = 1.0  # the release multiplies x[k+1] by sqrt(2); METHOD.md: a setting, 1
    checkpoint_every: int = 200
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload_after_caching: bool = True  # move text encoder and VAE to the CPU once latents are cached

    def validate(self) -> None:
        if self.steps < 1 or self.tokens_per_motion < 1:
            raise FlexiMMTInputError(f"steps={self.steps} and tokens_per_motion={self.tokens_per_motion} must be >= 1")
        if not 0 <= self.dmem_drop < 1 or not 0 <= self.image_dropout < 1:
            raise FlexiMMTInputError("dmem_drop and image_dropout are probabilities in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise FlexiMMTInputError(f"mixed_precision={self.mixed_precision!r}: choose from {list(MIXED_PRECISION)}")
        if self.checkpoint_every < 1:
            raise FlexiMMTInputError(f"checkpoint_every={self.checkpoint_every}: give a number of steps >= 1")

    def fingerprint(self) -> str:
        """What a resumed run must share with the run that wrote the checkpoint."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("checkpoint_every", "offload_after_caching")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(pipe) -> str:
    """``name@hash`` of the transformer: its config and a checksum of its output projection.

    ``name`` is the hub id, or the folder's own name for a local model (not its absolute path, so
    a motion learned in one checkout names the same model in another)."""
    cfg = pipe.transformer.config
    keep = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    weight = pipe.transformer.proj_out.weight.detach().float()
    blob = json.dumps(keep, sort_keys=True, default=str) + f"{weight.sum().item():.6e}{weight.abs().sum().item():.6e}"
    name = str(getattr(pipe, "name_or_path", None) or cfg.get("_name_or_path") or "model")
    if os.path.isdir(name):
        name = Path(name).resolve().name
    return f"{name}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def process_state():
    """accelerate's view of this process (rank, world size); CPU-only machines use gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


# -- stage 1: conditions, encoded once and cached -----------------------------------------
@dataclass
class Conditions:
    prompt_embeds: torch.Tensor  # [1, L_y, text_dim]
    video_latents: torch.Tensor  # [W, F, C, h, w] scaled latents of each window
    image_latents: torch.Tensor  # [W, F, C, h, w] first-frame latents, zero-padded in time
    member: torch.Tensor  # bool [1, L_y]: motion words
    concept_member: torch.Tensor  # bool [1, L_y]: concept words


def load_reference(video, num_frames: int, fps: float | None, start: int | None = None,
                   end: int | None = None) -> np.ndarray:  # fmt: skip
    """The reference frames between ``start`` and ``end``, subsampled to about ``fps``."""
    if isinstance(video, (str, os.PathLike)):
        frames, native_fps = read_video(video)
    else:
        frames, native_fps = as_frames(video, "reference video"), fps or 8.0
    return subsample(frames[start:end], native_fps, fps, num_frames)


@torch.no_grad()
def prepare_conditions(pipe, frames: np.ndarray, caption: str, concept_words: str, motion_words: str,
                       settings: TrainSettings, geometry: tuple[int, int, int], cache: Path | None,
                       seed: int) -> Conditions:  # fmt: skip
    """Encode the caption and every training window of the reference video (cached in ``cache``)."""
    height, width, num_frames = geometry
    text_len = pipe.transformer.config.max_text_seq_length
    motion = find_word_spans(pipe.tokenizer, caption, [motion_words], text_len)
    concept = find_word_spans(pipe.tokenizer, caption, [concept_words], text_len)
    member, concept_member = span_membership(text_len, motion), span_membership(text_len, concept)
    starts = window_starts(len(frames), num_frames, settings.max_windows)
    key = hashlib.sha256(
        frames.tobytes() + json.dumps([caption, geometry, starts, model_fingerprint(pipe), seed]).encode()
    ).hexdigest()
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                logger.info("reusing cached latents %s", cache)
                t = {name: f.get_tensor(name) for name in f.keys()}
                return Conditions(t["prompt_embeds"], t["video_latents"], t["image_latents"], member, concept_member)
    device = pipe._execution_device
    prompt_embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=text_len,
                                          device=device)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    scale = pipe.vae.config.scaling_factor
    videos, images = [], []
    for start in tqdm(starts, desc="encoding reference windows", disable=len(starts) < 2):
        clip = to_model_tensor(frames[start : start + num_frames], height, width)[None].to(device, pipe.vae.dtype)
        latents = pipe.vae.encode(clip).latent_dist.sample(generator=generator) * scale  # [1, C, F, h, w]
        image = pipe.vae.encode(clip[:, :, :1]).latent_dist.sample(generator=generator) * scale
        latents, image = latents.permute(0, 2, 1, 3, 4), image.permute(0, 2, 1, 3, 4)
        padding = image.new_zeros(1, latents.shape[1] - 1, *image.shape[2:])
        videos.append(latents[0].float().cpu())
        images.append(torch.cat([image, padding], dim=1)[0].float().cpu())
    cond = Conditions(prompt_embeds.float().cpu(), torch.stack(videos), torch.stack(images), member, concept_member)
    if cache is not None:
        from safetensors.torch import save_file

        tensors = {"prompt_embeds": cond.prompt_embeds, "video_latents": cond.video_latents,
                   "image_latents": cond.image_latents}  # fmt: skip
        atomic_write(cache, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
    return cond


# -- stage 2: the loss ------------------------------------------------------------------------
def training_step(pipe, tokens: torch.Tensor, state: FlexiMMTState, cond: Conditions, window: int,
                  generator: torch.Generator, settings: TrainSettings, rotary, autocast) -> torch.Tensor:  # fmt: skip
    """One loss of METHOD.md section 6: weighted x0 error plus a frame-difference term."""
    device = tokens.device
    x0 = cond.video_latents[window : window + 1].to(device)
    image = cond.image_latents[window : window + 1].to(device)
    if torch.rand((), generator=generator).item() < settings.image_dropout:
        image = torch.zeros_like(image)
    num_train = pipe.scheduler.config.num_train_timesteps
    t = torch.randint(0, num_train, (1,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    frame = int(torch.randint(0, x0.shape[1] - 1, (1,), generator=generator)) if x0.shape[1] > 1 else 0
    alpha_bar = pipe.scheduler.alphas_cumprod[t].to(device).float()
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    state.motion_tokens = tokens[None]
    state.begin_step()
    dtype = pipe.transformer.dtype
    with autocast():
        velocity = pipe.transformer(
            hidden_states=torch.cat([noisy, image], dim=2).to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
            timestep=t.to(device),
            image_rotary_emb=rotary,
            attention_kwargs={"fleximmt": state},
            return_dict=False,
        )[0].float()
    x0_hat = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * velocity  # v-prediction -> x0
    weight = 1.0 / (1.0 - alpha_bar).clamp_min(1e-6)  # w_t = 1 / (1 - alphabar_t)
    loss = (weight * (x0_hat - x0) ** 2).mean()
    if settings.frame_diff_weight and x0.shape[1] > 1:
        s = settings.frame_diff_scale
        d_gt = s * x0[:, frame + 1] - x0[:, frame]
        d_pred = s * x0_hat[:, frame + 1] - x0_hat[:, frame]
        loss = loss + settings.frame_diff_weight * ((d_gt - d_pred) ** 2).mean()
    return loss


# -- stage 3: checkpoints (fleximmt.checkpoint) ----------------------------------------------
def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.stem + ".ckpt.safetensors")


def cache_path(output: Path) -> Path:
    return output.with_name(output.stem + ".latents.safetensors")


# -- the whole job -------------------------------------------------------------------------
@dataclass
class TrainResult:
    motion: MotionTokens
    losses: list[float] = field(default_factory=list)


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
    callback: Callable[[int, float], None] | None = None,
    shard_windows: bool = True,
    return_losses: bool = False,
    **settings: Any,
) -> MotionTokens | TrainResult:
    """Learn motion tokens from one reference video and write them to ``output`` (safetensors).

    ``pipe`` is a CogVideoX I2V or FlexiMMT pipeline; ``video`` a path or uint8 ``[T, H, W, 3]``;
    ``concept_words`` name the object in ``caption`` and ``motion_words`` describe its motion.
    Every other setting of :class:`TrainSettings` is a keyword. ``resume=True`` continues from the
    checkpoint beside ``output``; ``callback(step, loss)`` is called after every step. Under
    ``accelerate launch`` the processes share one motion: each trains on its own windows of the
    video and gradients are averaged (``shard_windows``).
    """
    from accelerate.utils import reduce
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    from .pipeline import FlexiMMTPipeline

    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainSettings)}
    if unknown:
        raise FlexiMMTInputError(f"unknown training setting(s) {sorted(unknown)}: see fleximmt.train.TrainSettings")
    cfg = TrainSettings(steps=steps, tokens_per_motion=tokens_per_motion, seed=seed, **settings)
    cfg.validate()
    if not isinstance(pipe, FlexiMMTPipeline):
        pipe = FlexiMMTPipeline.from_pipe(pipe)
    output = Path(output)
    proc = process_state()  # rank and world size under `accelerate launch`, else one process
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)

    def autocast():
        return torch.autocast(proc.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    default_h, default_w, default_f = pipe.default_size()
    geometry = (cfg.height or default_h, cfg.width or default_w, cfg.num_frames or default_f)
    pipe.check_geometry(*geometry)
    if pipe.device != proc.device:
        pipe.to(proc.device)
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()

    frames = load_reference(video, geometry[2], cfg.fps, start_frame, end_frame)
    with proc.main_process_first():  # the main process encodes, the others read its cache
        cond = prepare_conditions(pipe, frames, caption, concept_words, motion_words, cfg, geometry,
                                  cache_path(output), cfg.seed)  # fmt: skip
    if cfg.offload_after_caching and proc.device.type != "cpu":
        pipe.text_encoder.to("cpu")
        pipe.vae.to("cpu")

    transformer = pipe.transformer
    for module in (transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    install_processors(transformer)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    tcfg = transformer.config
    dim = tcfg.num_attention_heads * tcfg.attention_head_dim
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.empty(tcfg.num_layers, cfg.tokens_per_motion, dim)
    torch.nn.init.kaiming_uniform_(tokens.view(-1, dim), a=math.sqrt(5), generator=generator)
    tokens = torch.nn.Parameter(tokens.to(proc.device))
    optimizer = torch.optim.AdamW([tokens], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, min(cfg.lr_warmup_steps, cfg.steps // 10), cfg.steps, cfg.lr_cycles
    )
    # the training randomness lives in one generator per process (saved in checkpoints)
    generator.manual_seed(cfg.seed * 1000 + proc.process_index + 1)
    distributed = shard_windows and proc.num_processes > 1  # one motion, windows shared out
    fingerprints = {"model": model_fingerprint(pipe), "settings": cfg.fingerprint(), "caption": caption,
                    "words": f"{concept_words}|{motion_words}",
                    "processes": proc.num_processes if distributed else 1}  # fmt: skip
    ckpt = checkpoint_path(output)
    if distributed and proc.process_index:  # every rank keeps its own RNG state
        ckpt = ckpt.with_name(ckpt.stem + f".rank{proc.process_index}.safetensors")
    start = 0
    if resume and ckpt.is_file():
        start = load_checkpoint(ckpt, {"tokens": tokens}, optimizer, scheduler, generator, fingerprints)
        logger.info("resumed %s at step %d", ckpt, start)

    grid = pipe.token_grid(*geometry)
    state = FlexiMMTState(
        motion_tokens=tokens[None], member=cond.member.to(proc.device),
        parts=TRAIN_PARTS if cfg.train_mask else frozenset(), num_frames=grid.frames,
        concept_member=cond.concept_member.to(proc.device) if cfg.train_mask else None,
        dmem_drop=cfg.dmem_drop, generator=generator,
    )  # fmt: skip
    if not cfg.train_mask:  # w/o Train: motion tokens reach every video token
        state.set_video_masks(torch.ones(1, grid.size, dtype=torch.bool, device=proc.device))
    rotary = None
    if tcfg.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(geometry[0], geometry[1], cond.video_latents.shape[1],
                                                            proc.device)  # fmt: skip
    windows = list(range(cond.video_latents.shape[0]))
    if distributed and len(windows) >= proc.num_processes:
        windows = windows[proc.process_index :: proc.num_processes]
    losses: list[float] = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"training {output.name}",
               disable=not proc.is_local_main_process)  # fmt: skip
    transformer.train(False)
    for step in bar:
        window = windows[int(torch.randint(0, len(windows), (1,), generator=generator))]
        loss = training_step(pipe, tokens, state, cond, window, generator, cfg, rotary, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            tokens.grad = reduce(tokens.grad, reduction="mean")
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([tokens], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt, done, {"tokens": tokens}, optimizer, scheduler, generator, fingerprints)
        if callback is not None:
            callback(done, value)
    bar.close()

    motion = MotionTokens(
        tokens.detach().cpu().clone(), name=output.stem, caption=caption, concept_words=concept_words,
        motion_words=motion_words, base_model=fingerprints["model"], steps=cfg.steps,
    )  # fmt: skip
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
        train_motion(pipe, row.video, row.caption, row.concept_words, row.motion_words, output,
                     start_frame=row.start, end_frame=row.end, shard_windows=False, **settings)  # fmt: skip
        done.append(output)
    return done
