"""The "flex" mask kernel: one FlexAttention call per attention, with MDMA as a ``BlockMask`` over token
classes (no N x N tensor). torch runs FlexAttention compiled only: it is compiled once per process
(inside a compiled graph, with that graph). Constraint: on a CPU torch has its forward and no backward,
so training with "flex" needs a GPU."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...errors import FlexiMMTInputError
from ..masks import code_masks, mdma_cross_dense, mdma_dense, video_codes
from .base import Attention, MaskKernel, Mdma, register, sdpa


class FlexMask(NamedTuple):
    """MDMA as FlexAttention's ``BlockMask``: a small ``table`` over token classes (each video token's
    object combination, each text and motion token its own) and every token's class, for queries and
    keys; ``mask_mod`` reads ``table[q_class[q], k_class[k]]``. No N x N tensor: the block mask keeps one
    bit per 128 x 128 block, plus the table."""

    table: torch.Tensor
    q_class: torch.Tensor
    k_class: torch.Tensor

    def block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        table, q_class, k_class = self.table, self.q_class, self.k_class

        def mask_mod(b, h, q, k):
            return table[q_class[q], k_class[k]]

        return create_block_mask(mask_mod, None, None, q_class.numel(), k_class.numel(), device=table.device)


_COMPILED_FLEX = {}


def flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention over ``[B, H, N, d]``, compiled once per process (torch runs it compiled only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside the caller's graph: compiled with it
        fn = flex_attention
    else:
        fn = _COMPILED_FLEX.get("fn") or _COMPILED_FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=False))
    # contiguous inputs: inductor's FlexAttention lowering misreads some views' ranks (seen on Wan's attn2)
    return fn(query.contiguous(), key.contiguous(), value.contiguous(), block_mask=block_mask)


def no_backward_on_a_cpu(kernel: str, device: torch.device, grad: bool) -> None:
    """torch's FlexAttention has no backward on a CPU."""
    if grad and device.type == "cpu":
        raise FlexiMMTInputError(
            f"mask_kernel={kernel!r} has no backward on a CPU (torch's FlexAttention): train with 'auto'"
        )


class FlexJoint:
    """MDMA of one video for a joint text-video attention: the block mask over ``[video | text | motion]``
    tokens, from the mask over one stand-in video token per object combination ``[text | motion | codes]``."""

    def __init__(self, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False) -> None:
        self.video_masks = mdma.video_masks
        num_objects, text_len = mdma.member.shape
        spans = [row.nonzero().squeeze(1).tolist() for row in mdma.member.cpu()]
        device, small = mdma.video_masks.device, text_len + num_objects * mdma.tokens_per_motion
        table = mdma_dense(
            text_len,
            spans,
            mdma.tokens_per_motion,
            code_masks(num_objects, device),
            mdma.parts,
            mdma.context_text,
            text_valid=mdma.text_valid,
        )
        classes = torch.cat([small + video_codes(mdma.video_masks), torch.arange(small, device=device)])
        self.flex_mask = FlexMask(table, classes, classes).block_mask()

    def attend(self, query, key, value, m_q, m_k, m_v, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """As ``DenseJoint.attend``: ``[text | video]`` tokens and the motion tokens' rows; the call runs over
        ``[video | text | motion]``."""
        n_video = query.shape[2] - text_len
        out = self.attend_video_first(
            *(
                torch.cat([x[:, :, text_len:], x[:, :, :text_len], m], dim=2)
                for x, m in ((query, m_q), (key, m_k), (value, m_v))
            ),
            text_len,
        )
        return torch.cat([out[:, :, n_video:], out[:, :, :n_video]], dim=2)

    def attend_video_first(self, query, keys, values, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """One call over every ``[video | text | motion]`` token; the motion rows' outputs are dropped."""
        return flex(query, keys, values, self.flex_mask)[:, :, : self.video_masks.shape[1] + text_len]


class FlexCross:
    """MDMA of one video for a cross-attention: the block mask over video queries and ``[text | motion]``
    keys, from the rows of one stand-in video token per object combination."""

    def __init__(self, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False) -> None:
        self.video_masks = mdma.video_masks
        num_objects, text_len = mdma.member.shape
        device = mdma.video_masks.device
        table = mdma_cross_dense(
            mdma.member.to(device), mdma.tokens_per_motion, code_masks(num_objects, device), mdma.parts, mdma.text_valid
        )
        keys = torch.arange(text_len + num_objects * mdma.tokens_per_motion, device=device)
        self.flex_mask = FlexMask(table, video_codes(mdma.video_masks), keys).block_mask()

    def attend(self, query, key, value, m_k, m_v, attention: Attention = sdpa) -> torch.Tensor:
        """As ``DenseCross.attend``."""
        return flex(query, torch.cat([key, m_k], dim=2), torch.cat([value, m_v], dim=2), self.flex_mask)


FLEX = register(MaskKernel("flex", FlexJoint, FlexCross, constraints=(no_backward_on_a_cpu,)))
