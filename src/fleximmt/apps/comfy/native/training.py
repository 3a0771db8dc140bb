"""Motion tokens trained through ComfyUI's own model: the training half of a ``ModelAdapter`` over ComfyUI's
MODEL(s) of one family, for the library's loop (``fleximmt.training.train.fit_tokens``).

What the library's adapters do with diffusers' models, :class:`NativeTraining` does with ComfyUI's: it
encodes the reference with ComfyUI's own VAE and CLIP, and the image conditions as the family's ComfyUI
image-to-video node builds them, passed through the model's own ``extra_conds`` (what ComfyUI's samplers
do); it draws each step's noise level from the MODEL's own model sampling (its shift, or its DDPM schedule)
in the order the library's adapters draw theirs; and it predicts x0 with ``BaseModel.apply_model``, the
call ComfyUI's samplers make, so LoRAs, fp8 or GGUF weights, partial loading and dynamic VRAM act as in
sampling. The weights stay ComfyUI's: each step asks ComfyUI's model management to load the expert it
runs (``load_models_gpu``), which loads it whole or in part as memory allows.

:class:`TrainingPatch` is the native patch (``patch.NativePatch``) while the tokens train: every model call
runs with the training state (DMEM's masks in every block, the loop's motion tokens), and, through a
``PatcherInjection`` (ComfyUI's mechanism for changing a model's modules while a patcher holds it, undone
when another takes it), every block runs under gradient checkpointing. HunyuanVideo 1.5's double blocks add
to their streams in place after their layer norms kept them for the backward pass, which autograd refuses;
the injection hands those blocks their streams as :class:`OutOfPlace` tensors, whose ``+=`` makes a new
tensor, so ComfyUI's block runs unchanged and its gradient is the out-of-place block's. LTX-2's blocks change
their streams with in-place methods whose results they drop (``vx.addcmul_``): they get fresh copies whose
every read is a copy of the stream as it then is (:class:`CopyOnRead`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from ....errors import FlexiMMTInputError
from ....method.adapter import TokenGrid, TrainingBatch
from ....method.attention import FlexiMMTState
from ....models.shared import check_frame_count
from .family import Family
from .patch import CALLS_KEY, KEY, Call, Calls, NativePatch, Run

logger = logging.getLogger(__name__)

WINDOWED = ("video_latents", "c_concat", "clip_fea")  # conditions with one entry per reference window
SIGMA_FLOOR = 1e-3  # the library's adapters floor flow-matching noise levels here (x0's weight 1 / sigma^2)


class OutOfPlace(torch.Tensor):
    """A tensor whose augmented assignments (``+=``, ``-=``, ``*=``, ``/=``) make a new tensor instead of
    writing into it: a block that adds to a stream in place after saving it for the backward pass (ComfyUI's
    HunyuanVideo 1.5 double blocks) computes the same values, and autograd keeps what it saved."""

    def __iadd__(self, other):
        return torch.add(self, other)

    def __isub__(self, other):
        return torch.sub(self, other)

    def __imul__(self, other):
        return torch.mul(self, other)

    def __itruediv__(self, other):
        return torch.div(self, other)


INPLACE_OPERATORS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"}
METADATA = {"__get__", "numel", "size", "dim"}  # reads of a tensor's shape, dtype or device: no copy needed


class CopyOnRead(torch.Tensor):
    """A stream a block changes with in-place methods after reading it, whose results it drops (ComfyUI's LTX-2
    blocks: ``vx.addcmul_(...)`` after ``rms_norm(vx)`` kept ``vx`` for the backward pass, which autograd refuses):
    every other operation reads a copy of the stream as it is then (one copy per change), and the in-place methods
    change the stream itself. ComfyUI's block runs unchanged, and its gradient is the out-of-place block's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inplace = name in INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__"))
        with torch._C.DisableTorchFunctionSubclass():
            if inplace and args and isinstance(args[0], CopyOnRead):
                func(args[0], *snapshots(args[1:]), **snapshots(kwargs))
                return args[0]
            if name in METADATA:
                return func(*args, **kwargs)
            return func(*snapshots(args), **snapshots(kwargs))

    def snapshot(self) -> torch.Tensor:
        """A plain copy of the stream as it is now (made once per change of it)."""
        version, copy = self.__dict__.get("_snapshot", (None, None))
        if version != self._version:
            copy = torch.Tensor.clone(self)
            self.__dict__["_snapshot"] = (self._version, copy)
        return copy


def snapshots(value):
    """``value`` with every :class:`CopyOnRead` stream in it (nested in tuples, lists, dicts) its snapshot."""
    if isinstance(value, CopyOnRead):
        return value.snapshot()
    if isinstance(value, (tuple, list)):
        return type(value)(snapshots(v) for v in value)
    if isinstance(value, dict):
        return {k: snapshots(v) for k, v in value.items()}
    return value


def copied(value):
    """A block's stream argument (a tensor, or a tuple or list of them) as fresh :class:`CopyOnRead` streams: the
    block changes the copies, not its caller's tensors (gradient checkpointing recomputes from those)."""
    if isinstance(value, torch.Tensor):
        return value.clone().as_subclass(CopyOnRead)
    if isinstance(value, (tuple, list)):
        return type(value)(copied(v) for v in value)
    return value


def plain(value):
    """``value`` with every :class:`OutOfPlace` or :class:`CopyOnRead` tensor in it (nested in tuples, lists,
    dicts) a plain tensor."""
    if isinstance(value, (OutOfPlace, CopyOnRead)):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def vae_compression(vae) -> tuple[Callable[[int], int], int]:
    """``(frames, spatial)`` of a ComfyUI VAE: its latent frames for a number of video frames, and its spatial
    downscaling (an image VAE: one latent frame a frame)."""
    ratio = vae.downscale_ratio
    if isinstance(ratio, tuple):
        return ratio[0], ratio[-1]
    return (lambda frames: frames), ratio


def ordinary_weights(module: torch.nn.Module) -> None:
    """Every inference tensor among ``module``'s parameters and buffers made an ordinary tensor of the same values.

    ComfyUI loads models inside ``torch.inference_mode()``, whose tensors autograd refuses to keep for a
    backward pass; the gradient that reaches the motion tokens passes through every later layer, which keeps
    its weight for that (ComfyUI's own trainer works on a fresh copy of the model instead). Weights ComfyUI
    casts or moves for a call are copies made outside inference mode already; the others are cloned here,
    once, one at a time, and stay ComfyUI's (the same modules, the same values)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_inference():
                sub._buffers[name] = buffer.clone()


def compute_dtype(base_model) -> torch.dtype:
    """The dtype a ComfyUI model computes in (its weights', or the one it casts them to)."""
    getter = getattr(base_model, "get_dtype_inference", None)  # ComfyUI 0.33
    if getter is not None:
        return getter()
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


def temporal_factor(vae) -> int:
    """Video frames a ComfyUI VAE packs into each latent frame after the first."""
    frames, _ = vae_compression(vae)
    return round(8192 / frames(8192))


def call_options(patcher, sigma: torch.Tensor) -> dict:
    """The ``transformer_options`` of one model call as ComfyUI's sampler makes it: the patcher's, its
    wrappers merged in (``sampler_helpers.prepare_model_patcher``), one conditional chunk, the sigma."""
    import comfy.patcher_extension as ext

    options = ext.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    ext.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    options["cond_or_uncond"] = [0]
    options["sigmas"] = sigma
    return options


class TrainingPatch(NativePatch):
    """The native patch while motion tokens train: each call of ComfyUI's model takes the loop's state
    (``state``: one video, DMEM's masks made in every block), its blocks run under gradient checkpointing
    (``checkpointing``), and ``expert`` names which of the state's token sets this MODEL's blocks take."""

    def __init__(self, family: Family, prompt_len: int, expert: int = 0, checkpointing: bool = True) -> None:
        super().__init__(family, (), [], None, prompt_len, None, expert)
        self.checkpointing = checkpointing
        self.state: FlexiMMTState | None = None
        self.originals: dict[int, object] = {}

    def install(self, patcher) -> None:
        import comfy.patcher_extension as ext

        super().install(patcher)
        patcher.set_injections(KEY, [ext.PatcherInjection(inject=self.inject, eject=self.eject)])

    def active(self) -> bool:
        return self.state is not None

    def call_run(self, model, call: Call, options: dict) -> Run:
        if self.state is None:
            raise RuntimeError("the training patch runs inside NativeTraining.training_attached(state)")
        if call.prompt_len != self.prompt_len:
            raise FlexiMMTInputError(
                f"Learn motion: the caption has {self.prompt_len} text tokens but this model call {call.prompt_len}: "
                "another patch of the MODEL changes its text; learn on the MODEL as the loader gives it"
            )
        self.state.rows.begin_forward(None, None)  # one video a call, no RMPM features
        return Run(model, self.family.grid(model, call.x), self.state, None, 1, expert=self.expert, texts=call.texts)

    # -- the blocks, while this patcher holds the model (ComfyUI's injections) ------------------
    def inject(self, patcher) -> None:
        for index, block in enumerate(self.family.blocks(patcher.model.diffusion_model)):
            self.originals[index] = block.__dict__.get("forward")
            block.forward = self.block_forward(index, block.forward)

    def eject(self, patcher) -> None:
        for index, block in enumerate(self.family.blocks(patcher.model.diffusion_model)):
            if index in self.originals:
                previous = self.originals.pop(index)
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous

    def block_forward(self, index: int, forward: Callable) -> Callable:
        """Block ``index``'s forward as training runs it: its attention calls named afresh each time it runs
        (gradient checkpointing runs it again in the backward pass), its in-place streams out of place, the
        whole under ``torch.utils.checkpoint`` when checkpointing."""
        streams = self.family.inplace_streams
        parameters = list(inspect.signature(forward).parameters)
        mutated = [(name, parameters.index(name)) for name in self.family.mutated_streams]

        def run(*args, **kwargs):
            options = kwargs.get("transformer_options")
            run_ = options.get(KEY) if isinstance(options, dict) else None
            if isinstance(run_, Run):
                kwargs["transformer_options"] = {**options, CALLS_KEY: Calls(self.kinds(run_.model, index))}
            for name in streams:
                if isinstance(kwargs.get(name), torch.Tensor):
                    kwargs[name] = kwargs[name].as_subclass(OutOfPlace)
            for name, position in mutated:
                if position < len(args):
                    args = (*args[:position], copied(args[position]), *args[position + 1 :])
                elif name in kwargs:
                    kwargs[name] = copied(kwargs[name])
            return plain(forward(*args, **kwargs))

        def checkpointed(*args, **kwargs):
            if self.checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return checkpointed


class NativeTraining:
    """The training half of a ``ModelAdapter`` for ComfyUI's MODEL(s) of one family (``models``: one per
    expert, Wan 2.2 A14B's high-noise model first), with ComfyUI's ``clip`` and ``vae`` for the reference
    and, for the families that take one, a ``clip_vision_output`` of the reference's first frame.
    ``boundary``: the noise level below which the second expert denoises (Wan 2.2 A14B I2V: 0.875)."""

    def __init__(
        self,
        family: Family,
        models: Sequence,
        clip,
        vae,
        clip_vision_output=None,
        boundary: float | None = None,
    ) -> None:
        self.native, self.models = family, list(models)
        self.clip, self.vae, self.clip_vision_output = clip, vae, clip_vision_output
        self.boundary = boundary
        adapter = family.adapter
        self.family, self.parts = adapter.family, adapter.parts
        # the state's settings (fit_tokens makes it): the family's adapter's, every call naming its rows' text
        # keys (TextKeys), as the native patch samples (NativePatch.new_run)
        self.settings = {**adapter.state_settings(), "text_keys": True}
        self.text_len: int | None = None
        self.patchers: list = []
        self.memory_required = 0

    # -- what the loop asks of a model -----------------------------------------------------------
    def diffusion_models(self) -> list[torch.nn.Module]:
        return [model.model.diffusion_model for model in self.models]

    def transformers(self) -> list[torch.nn.Module]:
        return self.diffusion_models()

    def motion_shape(self) -> tuple[int, int]:
        return self.native.motion_shape(self.diffusion_models()[0])

    def state_settings(self) -> dict:
        """The settings of the training state (``ModelAdapter.state_settings``' keys)."""
        return dict(self.settings)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of ComfyUI's latent of a ``num_frames`` x ``height`` x ``width`` video."""
        frames, spatial = vae_compression(self.vae)
        return self.vae.latent_channels, frames(num_frames), height // spatial, width // spatial

    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        shape = self.latent_shape(height, width, num_frames)
        grid = self.native.grid(self.diffusion_models()[0], torch.empty(1, *shape, device="meta"))
        grid.temporal_factor = temporal_factor(self.vae)
        return grid

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        _, spatial = vae_compression(self.vae)
        check_frame_count(
            num_frames, temporal_factor(self.vae), self.native.name, "ComfyUI's VAE would drop the frames after"
        )
        multiple = spatial * self.native.patch_size(self.diffusion_models()[0])[1]
        if height % multiple or width % multiple:
            raise FlexiMMTInputError(
                f"height x width = {height} x {width}: {self.native.name} learns on multiples of {multiple}; "
                f"resize the reference to {height // multiple * multiple} x {width // multiple * multiple} "
                "(Upscale Image) or set width and height"
            )

    def default_text_length(self) -> int:
        if self.text_len is None:
            raise RuntimeError("NativeTraining.word_spans finds the caption's length first")
        return self.text_len

    def word_spans(self, caption: str, phrases: Sequence[str], text_len: int | None = None) -> list[list[int]]:
        """Each phrase's token indices among the caption's tokens as ComfyUI's CLIP gives them to the model."""
        spans, self.text_len = self.native.word_spans(self.clip, caption, phrases)
        return spans

    def fingerprint(self) -> str:
        """``comfyui-<family>@hash`` of the first expert: its class and shape, and what its first block's
        first linear layer computes on a fixed input (the weights as loaded: LoRAs, fp8, GGUF included)."""
        model = self.diffusion_models()[0]
        layer = next(m for m in self.native.blocks(model)[0].modules() if hasattr(m, "in_features"))
        probe = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = layer(probe.to(self.models[0].load_device, compute_dtype(self.models[0].model))).float()
        blob = json.dumps([type(model).__name__, self.motion_shape(), f"{out.sum().item():.5e}"])
        blob += f"{out.abs().sum().item():.5e}"
        return f"comfyui-{self.family}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    # -- conditions: ComfyUI's encoders, ComfyUI's conditioning ------------------------------------
    def encode_video(self, image: torch.Tensor) -> torch.Tensor:
        """ComfyUI's VAE's latent ``[1, C, F, h, w]`` of a video (IMAGE ``[T, H, W, 3]``), checked to be one video's:
        an image VAE (HunyuanImage 2.1's, say) encodes each frame apart, and the model could not learn from that."""
        latent = self.vae.encode(image)
        expected = (1, *self.latent_shape(image.shape[1], image.shape[2], image.shape[0]))
        if tuple(latent.shape) != expected:
            raise FlexiMMTInputError(
                f"Learn motion: the VAE encodes the {image.shape[0]}-frame reference to a latent of shape "
                f"{tuple(latent.shape)}, not one video's {expected}: load {self.native.name}'s own video VAE"
            )
        return latent

    @torch.no_grad()
    def encode_conditions(self, clips, caption: str, text_len: int, generator=None) -> dict[str, torch.Tensor]:
        """The reference windows ``[3, T, H, W]`` in [-1, 1] and the caption as ComfyUI's model takes them:
        ``video_latents [W, C, F, h, w]`` (ComfyUI's VAE, ``process_latent_in``), and the model's
        ``extra_conds`` - the caption's CLIP features, the image conditions of each window's first frame
        as the family's image-to-video node builds them (``c_concat [W, ...]``), the CLIP vision
        features. ComfyUI's VAE gives its posterior's mean (the library samples the posterior)."""
        import comfy.model_management as mm

        model = self.models[0].model
        device = self.models[0].load_device
        images = [
            ((clip.permute(1, 2, 3, 0).float() + 1) / 2).clamp(0, 1).cpu() for clip in clips
        ]  # IMAGE [T, H, W, 3]
        latents = [self.native.reference_latent(self.vae, image, self.encode_video(image)) for image in images]
        tokens = self.clip.tokenize(caption)
        (text, extras), *_ = self.clip.encode_from_tokens_scheduled(tokens)
        conditioning = [dict(self.native.image_conditioning(self.vae, im[:1], im.shape[0])) for im in images]
        mm.load_models_gpu([self.models[0]])  # extra_conds may run the model's own modules (LTX-2's text connectors)
        constants = self.native.training_constants()  # the family's own, at every training call
        videos, windowed, shared = [], {}, {}
        for latent, values in zip(latents, conditioning):
            if self.clip_vision_output is not None:
                values["clip_vision_output"] = self.clip_vision_output
            conds = model.extra_conds(
                **extras,
                **values,
                cross_attn=text,
                device=device,
                noise=torch.zeros_like(latent),
                latent_image=latent,
            )
            videos.append(model.process_latent_in(latent.float())[0].cpu())
            for name, cond in conds.items():
                if name in constants:
                    continue
                value = cond.cond
                if not isinstance(value, torch.Tensor):
                    raise FlexiMMTInputError(f"Learn motion: ComfyUI's {name!r} condition is not a tensor")
                if name in WINDOWED:
                    windowed.setdefault(name, []).append(value[0].float().cpu())
                else:
                    shared[name] = value.cpu()
        windowed["video_latents"] = videos
        return {**shared, **{name: torch.stack(values) for name, values in windowed.items()}}

    # -- the loop's model calls ---------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self, checkpointing: bool, memory_required: int = 0) -> Iterator[None]:
        """Clones of the MODELs with the training patch, for a whole run; ComfyUI in training mode (its
        quantized layers then keep what their backward pass needs, as its own trainer sets it)."""
        import comfy.model_management as mm

        self.memory_required = memory_required
        self.patchers = []
        for expert, model in enumerate(self.models):
            patcher = model.clone()
            TrainingPatch(self.native, self.default_text_length(), expert, checkpointing).install(patcher)
            self.patchers.append(patcher)
        was_training = getattr(mm, "in_training", None)
        if was_training is not None:
            mm.in_training = True
        try:
            yield
        finally:
            if was_training is not None:
                mm.in_training = was_training
            for patcher in self.patchers:
                patcher.eject_model()  # the blocks' own forward again, whoever holds the model next
                patcher.remove_injections(KEY)
            self.patchers = []

    def patch_of(self, expert: int) -> TrainingPatch:
        return self.patchers[expert].wrappers["diffusion_model"][KEY][0].__self__

    @contextlib.contextmanager
    def training_attached(self, state: FlexiMMTState) -> Iterator[None]:
        """Every expert's training patch reads ``state`` for the loop, backward passes included."""
        if not self.patchers:
            raise RuntimeError("NativeTraining.training_attached runs inside NativeTraining.training(...)")
        for expert in range(len(self.patchers)):
            self.patch_of(expert).state = state
        try:
            yield
        finally:
            for expert in range(len(self.patchers)):
                self.patch_of(expert).state = None

    def training_prediction(
        self, state, cond: dict, window: int, generator, image_dropout: float, autocast, dtype=None
    ) -> TrainingBatch:
        """One window noised at a random level of the MODEL's own model sampling (or shifted by the video's size,
        where the family's sampling shifts so: LTX-2), in the library's order of draws (image dropout, the level,
        the noise, then the family's own: LTX-2's audio), and ComfyUI's prediction of its x0 (``apply_model``). A
        family whose image is the first latent frame keeps that frame clean, out of the loss, unless dropped."""
        import comfy.model_management as mm

        precision = dtype or torch.float32
        experts = self.patchers or self.models
        device = experts[0].load_device
        x0 = cond["video_latents"][window : window + 1].to(device, precision)  # [1, C, F, h, w]
        kwargs = {name: value.to(device) for name, value in cond.items() if name not in (*WINDOWED, "loss_from")}
        kwargs.update({name: cond[name][window : window + 1].to(device) for name in WINDOWED[2:] if name in cond})
        kwargs.update(self.native.training_constants())
        concat = cond.get("c_concat")
        if concat is not None:
            concat = concat[window : window + 1].to(device, precision)
        dropped = torch.rand((), generator=generator).item() < image_dropout
        if dropped and concat is not None:
            concat = concat.clone()
            concat[:, self.native.image_channels] = 0
        sampling = experts[0].get_model_object("model_sampling")
        shift = self.native.training_shift(self.native.grid(self.diffusion_models()[0], x0).size)
        noised = noise_levels(sampling, shift)
        level, weight = noised.draw(generator)
        if self.native.noise_frames_second:
            noise = torch.randn(x0.transpose(1, 2).shape, generator=generator).transpose(1, 2)
        else:
            noise = torch.randn(x0.shape, generator=generator)
        noise = noise.to(device, precision)
        image = self.native.image_frame and not dropped
        if self.native.image_frame:  # the level per latent frame, as the library's LTX-2 adapter noises them
            levels = torch.full((1, 1, x0.shape[2], 1, 1), level, device=device, dtype=precision)
            if image:
                levels[:, :, 0] = 0.0
            x = noised.noisy(x0, noise, levels)
        else:
            x = noised.noisy(x0, noise, level)
        expert = 1 if len(experts) > 1 and self.boundary is not None and level < self.boundary else 0
        patcher = experts[expert]
        mm.load_models_gpu([patcher], memory_required=self.memory_required)
        patcher.pre_run()
        ordinary_weights(patcher.model.diffusion_model)
        sigma = torch.tensor([level], device=device)
        frames = (x0.shape[2] - 1) * temporal_factor(self.vae) + 1
        model_input, extra = self.native.training_inputs(
            patcher.model.diffusion_model, x, level, image, frames, generator
        )
        with autocast():
            out = patcher.model.apply_model(
                model_input, sigma, c_concat=concat, transformer_options=call_options(patcher, sigma), **kwargs, **extra
            )
            x0_hat = self.native.training_output(out, x).to(precision)
        scored = slice(1 if image else int(cond.get("loss_from", 0)), None)
        weight = torch.tensor(weight, device=device)
        return TrainingBatch(x0.transpose(1, 2), x0_hat.transpose(1, 2), weight, scored, expert)


class NoiseLevels:
    """How a training step noises x0 for a ComfyUI model sampling, as the library's adapter of the same
    model does: ``draw`` the level (ComfyUI's sigma) and the x0 error's weight; ``noisy`` the model's input."""

    def __init__(self, sampling) -> None:
        self.sampling = sampling

    def draw(self, generator) -> tuple[float, float]:
        raise NotImplementedError

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        raise NotImplementedError


class FlowLevels(NoiseLevels):
    """Flow matching (Wan, HunyuanVideo 1.5): a uniform draw through the model sampling's shifted sigma (the
    shift ComfyUI samples with, ``ModelSamplingSD3``'s where one is applied), floored at 1e-3 as the
    library's adapters; x_sigma = (1 - sigma) x0 + sigma noise; the velocity error as an x0 error: 1 / sigma^2."""

    def draw(self, generator) -> tuple[float, float]:
        u = torch.rand((), generator=generator).item()
        multiplier = float(getattr(self.sampling, "multiplier", 1000))
        sigma = float(self.sampling.sigma(torch.tensor(u * multiplier, dtype=torch.float64)))
        sigma = max(sigma, SIGMA_FLOOR)
        return sigma, 1.0 / sigma**2

    def noisy(self, x0, noise, sigma):
        return (1 - sigma) * x0 + sigma * noise


class DDPMLevels(NoiseLevels):
    """CogVideoX's v-prediction DDPM: a uniform timestep of the model's schedule (ComfyUI's sigmas, sigma^2
    = (1 - alphabar) / alphabar); x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) noise, the input ComfyUI's
    ``V_PREDICTION_DDPM`` takes; the weight 1 / (1 - alphabar) (docs/method.md#training)."""

    def draw(self, generator) -> tuple[float, float]:
        sigmas = self.sampling.sigmas
        t = int(torch.randint(0, len(sigmas), (1,), generator=generator))
        sigma = float(sigmas[t])
        return sigma, (1 + sigma**2) / sigma**2

    def noisy(self, x0, noise, sigma):
        alpha_bar = 1 / (1 + sigma**2)
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


class ShiftedLevels(FlowLevels):
    """Flow matching shifted by the video's size (LTX-2): a uniform draw through the time shift ``shift`` (``mu``
    of the video's token count), ComfyUI's own ``flux_time_shift`` that its *LTXVScheduler* samples with, floored
    as :class:`FlowLevels`."""

    def __init__(self, sampling, shift: float) -> None:
        super().__init__(sampling)
        self.shift = shift

    def draw(self, generator) -> tuple[float, float]:
        import comfy.model_sampling as ms

        u = torch.rand((), generator=generator).item()
        sigma = max(float(ms.flux_time_shift(self.shift, 1.0, torch.tensor(u))), SIGMA_FLOOR)
        return sigma, 1.0 / sigma**2


def noise_levels(sampling, shift: float | None = None) -> NoiseLevels:
    """The noise levels of a ComfyUI model sampling that fleximmt trains on (its prediction's class); ``shift``:
    a flow-matching model's levels shifted by the video's size (:class:`ShiftedLevels`)."""
    import comfy.model_sampling as ms

    if isinstance(sampling, ms.CONST):
        return FlowLevels(sampling) if shift is None else ShiftedLevels(sampling, shift)
    ddpm = getattr(ms, "V_PREDICTION_DDPM", None)
    if ddpm is not None and isinstance(sampling, ddpm):
        return DDPMLevels(sampling)
    raise FlexiMMTInputError(
        f"Learn motion trains flow-matching models and CogVideoX's v-prediction; this MODEL samples with "
        f"{type(sampling).__name__}: remove the model sampling node that changed it"
    )
