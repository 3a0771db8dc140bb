"""What the diffusers adapters share: attention through diffusers' dispatcher with the user's backend,
the context-parallel refusal, carrying a replaced processor's settings, batch helpers, the state slot of
models whose blocks pass their processors no ``attention_kwargs`` (Wan, HunyuanVideo 1.5, LTX-2), the
flow-matching training noise and the token grid through a causal VAE."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FlexiMMTInputError
from ..method.adapter import TokenGrid, prompt_count
from ..method.attention import FlexiMMTState
from ..method.tokens import BlockProcessor, TextKeys, VideoShard

# RMPM averages the attention outputs of the first 70% of the blocks (docs/method.md#wan, #hunyuanvideo-15)
FEATURE_SHARE = 0.7
# What the T5 v1.1 configs of the pipelines' text encoders share (T5 v1.1 XXL's, umT5-XXL's and ByT5-small's
# config.json: the gated-GELU feed-forward, relative position buckets, no tied embeddings), and the XXL size; the
# adapters' true sizes (TrueSize.components) add each checkpoint's own values
T5_V1_1 = dict(
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
)
T5_XXL_SIZE = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)

# diffusers' attention backends that take an attention mask; FlexiMMT's calls that need one go to
# MASK_FALLBACK when the chosen backend is another (flash, sage, ...): docs/method.md#attention-without-an-n-x-n-mask's masked call
MASK_BACKENDS = frozenset({"native", "_native_cudnn", "_native_efficient", "_native_math", "flex", "xformers"})
MASK_FALLBACK = "native"


def repeat_per_prompt(call: dict[str, Any]) -> dict[str, Any]:
    """The call with each prompt (and negative prompt, and their embeddings) repeated
    ``num_videos_per_prompt`` times and ``num_videos_per_prompt=1``: the same videos, for pipelines that
    do not batch that argument (or not everywhere)."""
    per_prompt = call.get("num_videos_per_prompt") or 1
    if per_prompt == 1:
        return call
    call = dict(call)
    count = prompt_count(call)
    repeat = lambda xs: [x for x in xs for _ in range(per_prompt)]
    for name in ("prompt", "negative_prompt"):
        value = call.get(name)
        if value is not None:
            call[name] = repeat([value] * count if isinstance(value, str) else list(value))
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        if call.get(name) is not None:
            call[name] = call[name].repeat_interleave(per_prompt, dim=0)
    call["num_videos_per_prompt"] = 1
    return call


class DispatchedAttention:
    """Attention over ``[B, H, N, d]`` tensors (see ``attention.sdpa``) through diffusers'
    ``dispatch_attention_fn`` with ``backend`` (None: the active one, e.g. inside
    ``attention_backend(...)``). A call with a mask whose backend takes none runs on ``MASK_FALLBACK``,
    said once per call in the log (``state.note_once``). Inside a compiled graph it crosses into
    FlexiMMT's opaque operators as its ``opaque_name`` (``method/opaque.py``) and is made again there
    (:meth:`remake`)."""

    def __init__(self, backend=None, state=None) -> None:
        self.backend, self.state = backend, state

    @property
    def opaque_name(self) -> str:
        """This class and the backend's name, ``module:class:backend``: what crosses into an operator."""
        cls = type(self)
        return f"{cls.__module__}:{cls.__qualname__}:{getattr(self.backend, 'value', self.backend or '')}"

    @classmethod
    def remake(cls, backend: str, state) -> DispatchedAttention:
        """The attention an ``opaque_name`` names, made again inside an operator ("": the active backend)."""
        return cls(backend or None, state)

    def __call__(self, query, key, value, mask=None):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn

        backend = self.backend
        if mask is not None:
            name = backend or _AttentionBackendRegistry.get_active_backend()[0]
            name = getattr(name, "value", name)
            if name not in MASK_BACKENDS:
                if self.state is not None:
                    self.state.note_once(
                        f"attention backend {name!r} takes no attention mask: FlexiMMT's masked calls "
                        f"(text queries and small object groups) run on {MASK_FALLBACK!r}, the rest on "
                        f"{name!r}"
                    )
                backend = MASK_FALLBACK
        out = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, backend=backend
        )
        return out.transpose(1, 2)


def dispatched_attention(processor, state=None) -> DispatchedAttention:
    """The attention of one FlexiMMT processor call, with the backend chosen for this model
    (``processor._attention_backend``, set by ``set_attention_backend``; None: the active one)."""
    return DispatchedAttention(getattr(processor, "_attention_backend", None), state)


def check_no_context_parallelism(processor, state, model: str) -> None:
    """Objects with context parallelism (``enable_parallelism``) on a joint-attention model are refused:
    each process would see a share of the video tokens, while every video query reads the video keys of
    all of them through FlexiMMT's groups (diffusers ships no context-parallel plan for these models)."""
    if state is not None and state.num_objects and getattr(processor, "_parallel_config", None) is not None:
        raise FlexiMMTInputError(
            f"context parallelism (transformer.enable_parallelism) does not run with objects on "
            f"{model}: its joint attention needs every video key in each process; call without "
            f"objects, or without enable_parallelism (on Wan it runs with objects)"
        )


def context_shard(transformers, num_video: int) -> VideoShard | None:
    """The share of ``num_video`` video tokens this process's blocks see when diffusers runs the
    ``transformers`` with context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``:
    its model plan splits the video tokens before the first block over every process of the mesh, in
    equal parts, or as ``tensor_split`` cuts them with ``ulysses_anything`` / ``ring_anything``); None
    without it. The experts of one pipeline must share one setting."""
    configs = [getattr(getattr(t, "_parallel_config", None), "context_parallel_config", None) for t in transformers]
    if all(c is None for c in configs):
        return None
    if any(c is None for c in configs):
        raise FlexiMMTInputError(
            "context parallelism is enabled on some of this pipeline's transformers only: call "
            "enable_parallelism on every expert (transformer and transformer_2), or on none"
        )
    import torch.distributed as dist

    config = configs[0]
    mesh = config._flattened_mesh
    group, world = mesh.get_group(), mesh.size()
    uneven = config.ulysses_anything or config.ring_anything
    if num_video % world and not uneven:
        raise FlexiMMTInputError(
            f"{num_video} video tokens do not split into {world} equal shares for context "
            f"parallelism: choose a size whose token count {world} divides, or "
            f"ContextParallelConfig(ulysses_anything=True)"
        )
    return VideoShard.of(num_video, dist.get_rank(group), world, group)


def carry_dispatch(previous, processor):
    """``processor`` with the attention backend and context-parallel config the processor it replaces
    was given (``set_attention_backend`` before FlexiMMT's processors were installed)."""
    for name in ("_attention_backend", "_parallel_config"):
        value = getattr(previous, name, None)
        if value is not None:
            setattr(processor, name, value)
    return processor


class DelegatingProcessor:
    """A FlexiMMT processor around one of diffusers' own (``self.inner``): the attention backend and the
    context-parallel config that ``set_attention_backend``, ``reset_attention_backend`` and
    ``enable_parallelism`` give a processor reach the wrapped one, so its calls dispatch as diffusers' do."""

    inner: Any

    @property
    def _attention_backend(self):
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.inner._attention_backend = backend

    @property
    def _parallel_config(self):
        return self.inner._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.inner._parallel_config = config


def check_frame_count(num_frames: int, temporal: int, model: str, why: str) -> None:
    """Refuse a frame count that is not ``temporal``k+1 for ``model``, naming the two nearest that are and
    ``why`` another count would move the object masks off their frames."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        lower = max(1, (num_frames - 1) // temporal * temporal + 1)
        raise FlexiMMTInputError(
            f"num_frames={num_frames}: {model} makes {temporal}k+1 frames; use {lower} or "
            f"{lower + temporal} ({why}, moving the object masks off their frames)"
        )


def text_path_projector(attn, like: torch.Tensor) -> Callable:
    """Motion tokens through a cross-attention's frozen text path (``to_k``/``to_v``, ``norm_k``; no RoPE),
    as ``state.cross_attention`` takes them: ``[n, dim]`` tokens to ``[1, H, n, d]`` keys (kind "k") or
    values ("v"), on the device and dtype of the block's activations ``like`` (Wan's ``attn2``, LTX-2's)."""

    def project(tokens: torch.Tensor, kind: str) -> torch.Tensor:
        tokens = tokens.to(device=like.device, dtype=like.dtype)
        x = attn.norm_k(attn.to_k(tokens)) if kind == "k" else attn.to_v(tokens)
        return x.unflatten(1, (attn.heads, -1)).transpose(0, 1)[None]

    return project


def patched_token_grid(
    height: int, width: int, num_frames: int, spatial: int, temporal: int, patch: int, patch_t: int
) -> TokenGrid:
    """The token grid of a ``height x width x num_frames`` video through a causal VAE of ``spatial`` x
    ``temporal`` compression (frame 0 alone, then ``temporal`` frames per latent frame) and the transformer's
    ``patch_t x patch x patch`` patches (HunyuanVideo 1.5, LTX-2)."""
    latent_frames = (num_frames - 1) // temporal + 1
    per_token = spatial * patch
    return TokenGrid(
        latent_frames // patch_t, height // per_token, width // per_token, latent_frames, patch_t, temporal
    )


# -- the state slot: models whose blocks pass their processors no attention_kwargs -------------------------
@dataclass
class StateSlot:
    """The per-call FlexiMMT state, shared by every processor of one transformer (None: diffusers' own
    attention), and each batch row's text form in the current forward (a model whose text keys are more
    than the prompt's tokens: :attr:`SlotAdapter.text_keys`)."""

    state: FlexiMMTState | None = None
    texts: list[TextKeys] = field(default_factory=list)


class SlotProcessor(BlockProcessor, DelegatingProcessor):
    """A FlexiMMT processor of one block around one of diffusers' own (``inner``), reading the state from
    its transformer's :class:`StateSlot`."""

    def __init__(self, block_index: int, slot: StateSlot, inner) -> None:
        super().__init__(block_index)
        self.slot, self.inner = slot, inner


def slot_of(transformer: torch.nn.Module) -> StateSlot | None:
    """The slot of a transformer's FlexiMMT processors (None: none installed)."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, SlotProcessor):
            return processor.slot
    return None


class SlotAdapter:
    """What an adapter (a ``ModelAdapter``) of a model whose blocks pass their processors no
    ``attention_kwargs`` shares: the processors of each transformer read the state from one
    :class:`StateSlot`, filled for a call or a training loop, and a hook before each forward sets the
    rows' text forms and tells the state a forward starts (``BatchRows.begin_forward``: the pipelines of
    these models run each guidance branch as a forward of its own, the conditional first)."""

    def slots(self) -> list[StateSlot]:
        return [slot_of(transformer) for transformer in self.transformers()]

    def row_texts(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> list[TextKeys]:
        """Each batch row's text form in a forward of ``transformer`` called with ``args``/``kwargs``; the
        default, none (the text keys are the prompt's tokens)."""
        return []

    def before_forward(self, state: FlexiMMTState, slot: StateSlot, transformer, args: tuple, kwargs: dict) -> None:
        """What runs before each forward of ``transformer``: its rows' text forms into the slot
        (:meth:`row_texts`) and the state told that a forward of the call's declared rows starts. A family
        whose rows change from forward to forward gives them here: ``state.rows.begin_forward(rows,
        feature_rows)``."""
        slot.texts = self.row_texts(transformer, args, kwargs)
        state.rows.begin_forward()

    @contextlib.contextmanager
    def slots_filled(self, state: FlexiMMTState) -> Iterator[list[StateSlot]]:
        """Every transformer's slot holds ``state`` until the block ends, :meth:`before_forward` run before
        each of its forwards."""
        slots, hooks = self.slots(), []

        def hook(slot: StateSlot, transformer):
            return lambda module, args, kwargs: self.before_forward(state, slot, transformer, args, kwargs)

        try:
            for slot, transformer in zip(slots, self.transformers()):
                slot.state = state
                hooks.append(transformer.register_forward_pre_hook(hook(slot, transformer), with_kwargs=True))
            yield slots
        finally:
            for handle in hooks:
                handle.remove()
            for slot in slots:
                slot.state, slot.texts = None, []

    @contextlib.contextmanager
    def attach(self, state: FlexiMMTState, call: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Fill every transformer's slot for the call."""
        with self.slots_filled(state):
            yield call

    @contextlib.contextmanager
    def training_attached(self, state: FlexiMMTState) -> Iterator[None]:
        """The processors read the state from their slot, which must hold it until each backward pass has
        recomputed its checkpointed blocks, not only during the forward call."""
        self.install_processors()
        settings = {name: getattr(state, name) for name in self.state_settings()}
        if settings != self.state_settings():
            raise ValueError(f"a state made with {settings}: make it with adapter.state_settings()")
        with self.slots_filled(state):
            yield

    def attached_slot(self, transformer: torch.nn.Module, state: FlexiMMTState) -> StateSlot:
        """``transformer``'s slot, which must hold ``state`` (inside :meth:`training_attached`)."""
        slot = slot_of(transformer)
        if slot is None or slot.state is not state:
            raise RuntimeError(f"{type(self).__name__}.training_prediction runs inside training_attached(state)")
        return slot


def bound_arguments(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward's arguments by name, as ``transformer.forward`` takes them."""
    return inspect.signature(transformer.forward).bind(*args, **kwargs).arguments


def sample_sigma(scheduler, generator: torch.Generator, mu: float | None = None) -> float:
    """A flow-matching training noise level: uniform, then shifted as the pipeline's scheduler shifts its
    sigmas: by ``mu`` where it shifts dynamically (``use_dynamic_shifting``, LTX-2's: ``mu`` of the video's
    token count, given), else by its fixed shift (``flow_shift`` with ``use_flow_sigmas``, as Wan's UniPC;
    else ``shift``)."""
    cfg = scheduler.config
    u = torch.rand((), generator=generator).item()
    if cfg.get("use_dynamic_shifting") and mu is not None:
        return float(scheduler.time_shift(mu, 1.0, torch.tensor(u)))
    shift = cfg.get("flow_shift") if cfg.get("use_flow_sigmas") else cfg.get("shift", 1.0)
    shift = shift or 1.0
    return shift * u / (1 + (shift - 1) * u)
