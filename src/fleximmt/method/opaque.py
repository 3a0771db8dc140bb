"""MDMA's "auto" mask kernel as opaque operators for ``torch.compile`` (docs/method.md#attention-without-an-n-x-n-mask).

The auto kernel groups video queries by the objects they belong to, and the groups' sizes change
with the masks at every step: traced, each new size would compile again. Inside a compiled graph
(``torch.compiler.is_compiling()``) the two attention forms run instead as one custom operator each,
``fleximmt::mdma_joint`` and ``fleximmt::mdma_cross``, whose bodies are the eager code
(:meth:`FlexiMMTState.joint_attention` / ``cross_attention``) run as it is, and whose fake
implementations give only the output's shape. Dynamo sees fixed shapes; the groups stay out of the graph.

An operator takes tensors, ints and strings only. The state is found through ``state.handle``: a
one-element CPU tensor holding the state's number in a registry (a tensor, so a new call's state reaches
the same graph); the block likewise, as its processor's ``block_tensor`` (``tokens.BlockProcessor``),
so that every block of a model is the same graph and regional compilation compiles one. The ints
(expert, lengths, each row's text form) do not change between steps. RMPM's feature capture, which
depends on the block, is an operator too (``fleximmt::observe``). The attention callable a processor
passes cannot cross (a graph cannot hand a Python object to its operators while it runs): it crosses as
its ``opaque_name``, ``"module:class:argument"``, and the class's ``remake(argument, state)`` makes it
again inside the operator (diffusers' dispatcher with the backend chosen for the model:
``models/shared.py``); a callable without one runs on PyTorch's SDPA there, said once in the log.

Gradients: the backward, a second opaque operator, recomputes the eager body under
``torch.enable_grad`` (with autograd's dispatch keys back on: an operator's kernel runs below
autograd) and takes ``torch.autograd.grad`` of it, as gradient checkpointing would. The tensors that
need gradients are operator inputs: in the joint form the motion tokens are rows of the keys and
values; in the cross form their keys and values, projected by the block's frozen ``to_k``/``to_v``
outside the operator, are inputs. DMEM's per-block masks are built in the forward's body and found
again, unchanged, by the recomputation (``FlexiMMTState`` keeps them for the step).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import weakref

import torch

from .kernels import sdpa
from .tokens import TextKeys

logger = logging.getLogger(__name__)

_STATES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()
_SAID: set[str] = set()


def register(state) -> torch.Tensor:
    """A new handle for ``state``: the tensor its operators take to find it."""
    number = next(_NUMBERS)
    _STATES[number] = state
    return torch.tensor([number], dtype=torch.long)


def _state(handle: torch.Tensor):
    return _STATES[int(handle.item())]


def attention_name(attention) -> str:
    """What crosses into an operator for ``attention``: its ``opaque_name``; "" for PyTorch's SDPA."""
    if attention is None or attention is sdpa:
        return ""
    return getattr(attention, "opaque_name", "?")  # "?": said in the log, inside the operator


def _attention(name: str, state):
    if name == "?" and "unnamed" not in _SAID:
        _SAID.add("unnamed")
        logger.warning(
            "torch.compile with mask_kernel='auto': an attention function without an opaque_name "
            "cannot cross into FlexiMMT's opaque operators; their grouped calls run on PyTorch's SDPA"
        )
    if name in ("", "?"):
        return sdpa
    module, qualname, argument = name.split(":", 2)
    return getattr(importlib.import_module(module), qualname).remake(argument, state)


def _texts(codes: list[int]):
    """Each row's ``TextKeys`` from ``(offset, valid or -1)`` pairs; an empty list: None."""
    if not codes:
        return None
    return [TextKeys(offset, None if valid < 0 else valid) for offset, valid in zip(codes[::2], codes[1::2])]


def text_codes(texts) -> list[int]:
    """``texts`` (``TextKeys`` per row, or None) as the ints an operator takes."""
    return [] if texts is None else [x for t in texts for x in (t.offset, -1 if t.valid is None else t.valid)]


def _laid_like(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` as ``empty_like(like)`` lays it out (what the fake implementation promised the compiler)."""
    if out.dtype == like.dtype and out.stride() == like.stride():
        return out
    return torch.empty_like(like).copy_(out)


_AUTOGRAD_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
for _key in ("AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
    _AUTOGRAD_KEYS = _AUTOGRAD_KEYS | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))


@contextlib.contextmanager
def _recording():
    """Autograd on inside an operator's kernel, which torch runs below autograd: the recomputation
    records its graph for ``torch.autograd.grad``."""
    exclude = torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _grads(outputs: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> list[torch.Tensor]:
    found = torch.autograd.grad(outputs, inputs, grad, allow_unused=True)
    return [torch.zeros_like(x) if g is None else _laid_like(g, x) for g, x in zip(found, inputs)]


# -- the joint form: [video | text | motion] tokens, one output row per video and text token ----------
def _joint_out(query: torch.Tensor, motion_len: int) -> torch.Tensor:
    """An empty output ``[B, H, N_v + L_y, d]``, stored as ``[B, N, H, d]`` (``attend_video_first``'s)."""
    batch, heads, length, dim = query.shape
    return query.new_empty(batch, length - motion_len, heads, dim).transpose(1, 2)


def _joint_laid(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, H, N, d]`` stored as ``[B, N, H, d]`` in ``query``'s dtype, as :func:`_joint_out` promised."""
    batch, heads, length, dim = out.shape
    if out.dtype == query.dtype and out.stride() == (length * heads * dim, dim, heads * dim, 1):
        return out
    return query.new_empty(batch, length, heads, dim).transpose(1, 2).copy_(out)


def _joint_eager(handle, block, query, key, value, text_len, texts, attention):
    # the auto kernel rewrites the text and motion rows of keys and values in place: an operator's inputs stay
    state = _state(handle)
    return state.joint_attention(
        block, query, key.clone(), value.clone(), text_len, _attention(attention, state), _texts(texts)
    )


@torch.library.custom_op("fleximmt::mdma_joint", mutates_args=())
def mdma_joint_op(
    handle: torch.Tensor,
    block: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_len: int,
    motion_len: int,
    texts: list[int],
    attention: str,
) -> torch.Tensor:
    return _joint_laid(_joint_eager(handle, block, query, key, value, text_len, texts, attention), query)


@mdma_joint_op.register_fake
def _(handle, block, query, key, value, text_len, motion_len, texts, attention):
    return _joint_out(query, motion_len)


@torch.library.custom_op("fleximmt::mdma_joint_backward", mutates_args=())
def mdma_joint_backward(
    grad: torch.Tensor,
    handle: torch.Tensor,
    block: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_len: int,
    texts: list[int],
    attention: str,
) -> list[torch.Tensor]:
    with _recording():
        inputs = tuple(x.detach().requires_grad_() for x in (query, key, value))
        return _grads(_joint_eager(handle, block, *inputs, text_len, texts, attention), inputs, grad)


@mdma_joint_backward.register_fake
def _(grad, handle, block, query, key, value, text_len, texts, attention):
    return [torch.empty_like(x) for x in (query, key, value)]


def _joint_setup(ctx, inputs, output) -> None:
    handle, block, query, key, value, text_len, _, texts, attention = inputs
    ctx.save_for_backward(handle, block, query, key, value)
    ctx.args = (text_len, texts, attention)


def _joint_backward(ctx, grad):
    handle, block, query, key, value = ctx.saved_tensors
    dq, dk, dv = torch.ops.fleximmt.mdma_joint_backward(grad, handle, block, query, key, value, *ctx.args)
    return None, None, dq, dk, dv, None, None, None, None


mdma_joint_op.register_autograd(_joint_backward, setup_context=_joint_setup)


def mdma_joint(state, block, query, key, value, text_len: int, texts=None, attention=None) -> torch.Tensor:
    """:meth:`FlexiMMTState.joint_attention` (auto kernel) as one opaque operator; ``block``: the processor's
    ``block_tensor``."""
    motion_len = state.num_objects * state.tokens_per_motion
    return mdma_joint_op(
        state.handle, block, query, key, value, text_len, motion_len, text_codes(texts), attention_name(attention)
    )


# -- the cross form: video queries over [text | motion] keys ------------------------------------------
def _cross_eager(handle, block, query, key, value, motion_k, motion_v, texts, attention):
    def motion_of(video: int):
        return motion_k[video : video + 1], motion_v[video : video + 1]

    state = _state(handle)
    return state.cross_with(block, query, key, value, motion_of, _attention(attention, state), _texts(texts))


@torch.library.custom_op("fleximmt::mdma_cross", mutates_args=())
def mdma_cross_op(
    handle: torch.Tensor,
    block: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    motion_k: torch.Tensor,
    motion_v: torch.Tensor,
    texts: list[int],
    attention: str,
) -> torch.Tensor:
    out = _cross_eager(handle, block, query, key, value, motion_k, motion_v, texts, attention)
    return out.to(query.dtype).contiguous()  # laid out as the fake's new_empty


@mdma_cross_op.register_fake
def _(handle, block, query, key, value, motion_k, motion_v, texts, attention):
    return query.new_empty(query.shape)


@torch.library.custom_op("fleximmt::mdma_cross_backward", mutates_args=())
def mdma_cross_backward(
    grad: torch.Tensor,
    handle: torch.Tensor,
    block: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    motion_k: torch.Tensor,
    motion_v: torch.Tensor,
    texts: list[int],
    attention: str,
) -> list[torch.Tensor]:
    with _recording():
        inputs = tuple(x.detach().requires_grad_() for x in (query, key, value, motion_k, motion_v))
        return _grads(_cross_eager(handle, block, *inputs, texts, attention), inputs, grad)


@mdma_cross_backward.register_fake
def _(grad, handle, block, query, key, value, motion_k, motion_v, texts, attention):
    return [torch.empty_like(x) for x in (query, key, value, motion_k, motion_v)]


def _cross_setup(ctx, inputs, output) -> None:
    handle, block, *tensors, texts, attention = inputs
    ctx.save_for_backward(handle, block, *tensors)
    ctx.args = (texts, attention)


def _cross_backward(ctx, grad):
    handle, block, *tensors = ctx.saved_tensors
    grads = torch.ops.fleximmt.mdma_cross_backward(grad, handle, block, *tensors, *ctx.args)
    return None, None, *grads, None, None


mdma_cross_op.register_autograd(_cross_backward, setup_context=_cross_setup)


def mdma_cross(state, block, expert: int, query, key, value, project, texts=None, attention=None) -> torch.Tensor:
    """:meth:`FlexiMMTState.cross_attention` (auto kernel) as one opaque operator; the motion tokens of every
    video go through ``project`` here, in the graph, so that their gradients reach them."""
    keys, values = zip(*(state.motion_projections(video, block, expert, project) for video in range(len(state.videos))))
    return mdma_cross_op(
        state.handle,
        block,
        query,
        key,
        value,
        torch.cat(keys),
        torch.cat(values),
        text_codes(texts),
        attention_name(attention),
    )


# -- RMPM's feature capture: which blocks capture is the state's business, not the graph's ------------
@torch.library.custom_op("fleximmt::observe", mutates_args=("handle",))  # "mutates": no output, never pruned
def observe_op(handle: torch.Tensor, block: torch.Tensor, video_out: torch.Tensor, rows: list[int]) -> None:
    _state(handle).observe(block, video_out, rows or None)


@observe_op.register_fake
def _(handle, block, video_out, rows):
    return None


def observe(state, block, video_out: torch.Tensor, rows: list[int] | None = None) -> None:
    """:meth:`FlexiMMTState.observe` as an opaque operator."""
    observe_op(state.handle, block, video_out, rows or [])
