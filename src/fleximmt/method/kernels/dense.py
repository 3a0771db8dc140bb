"""The "dense" mask kernel: MDMA as one N x N bool mask (docs/method.md#mdma, Eq. 11), the reference the
other kernels are tested against. O(N^2) memory: for checking, and for small models."""

from __future__ import annotations

import torch

from ..masks import mdma_cross_dense, mdma_dense
from .base import Attention, MaskKernel, Mdma, register, sdpa


class DenseJoint:
    """MDMA of one video for a joint text-video attention: the bool ``[N, N]`` mask over
    ``[text | motion | video]`` (``dense``)."""

    def __init__(self, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False) -> None:
        self.video_masks = mdma.video_masks
        spans = [row.nonzero().squeeze(1).tolist() for row in mdma.member.cpu()]
        self.dense = mdma_dense(
            mdma.member.shape[1],
            spans,
            mdma.tokens_per_motion,
            mdma.video_masks,
            mdma.parts,
            mdma.context_text,
            text_valid=mdma.text_valid,
        )

    def attend(self, query, key, value, m_q, m_k, m_v, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """``query/key/value`` ``[B, H, L_y + N_v, d]`` (the block's own, after QK-norm and RoPE), ``m_*`` the
        motion tokens' ``[B, H, K * d_m, d]``; returns ``[B, H, L_y + N_v, d]``."""
        q = torch.cat([query[:, :, :text_len], m_q, query[:, :, text_len:]], dim=2)
        k = torch.cat([key[:, :, :text_len], m_k, key[:, :, text_len:]], dim=2)
        v = torch.cat([value[:, :, :text_len], m_v, value[:, :, text_len:]], dim=2)
        out = attention(q, k, v, self.dense)
        motion_end = text_len + m_k.shape[2]
        return torch.cat([out[:, :, :text_len], out[:, :, motion_end:]], dim=2)

    def attend_video_first(self, query, keys, values, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """The same attention over tokens laid out ``[video | text | motion]`` (``keys/values``
        ``[B, H, N_v + L_y + K * d_m, d]``, ``query`` alike); returns ``[B, H, N_v + L_y, d]``, stored as
        ``[B, N_v + L_y, H, d]`` (what the block's output projection reads)."""
        n_video = self.video_masks.shape[1]
        text, motion = slice(n_video, n_video + text_len), slice(n_video + text_len, None)
        out = self.attend(
            *(torch.cat([x[:, :, text], x[:, :, :n_video]], dim=2) for x in (query, keys, values)),
            query[:, :, motion],
            keys[:, :, motion],
            values[:, :, motion],
            text_len,
            attention,
        )
        batch, heads, _, dim = out.shape
        first = out.new_empty(batch, out.shape[2], heads, dim).transpose(1, 2)
        first[:, :, :n_video], first[:, :, n_video:] = out[:, :, text_len:], out[:, :, :text_len]
        return first


class DenseCross:
    """MDMA of one video for a cross-attention: the bool ``[N_v, L_y + K * d_m]`` mask (``dense``)."""

    def __init__(self, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False) -> None:
        self.video_masks = mdma.video_masks
        self.dense = mdma_cross_dense(
            mdma.member, mdma.tokens_per_motion, mdma.video_masks, mdma.parts, mdma.text_valid
        )

    def attend(self, query, key, value, m_k, m_v, attention: Attention = sdpa) -> torch.Tensor:
        """``query`` ``[B, H, N_v, d]``, ``key/value`` ``[B, H, L_y, d]`` (the text's), ``m_*`` the motion
        tokens' ``[B, H, K * d_m, d]``; returns ``[B, H, N_v, d]``."""
        return attention(query, torch.cat([key, m_k], dim=2), torch.cat([value, m_v], dim=2), self.dense)


DENSE = register(MaskKernel("dense", DenseJoint, DenseCross))
