"""The "auto" mask kernel: MDMA exactly, without an N x N mask (docs/method.md#attention-without-an-n-x-n-mask).

V x V is all open, so a video query's row of MDMA depends only on the objects it belongs to: video queries
are grouped by the keys they may read besides video, and each group attends with unmasked SDPA over the
video keys and its own text and motion keys. In the joint form the text queries, and the small video
groups merged (``MERGE_BELOW``), run as one masked call whose mask rows are capped (``MERGE_CAP``).
Inside a compiled graph the state runs this kernel as opaque operators (``method/opaque.py``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..masks import mdma_text_rows, video_groups
from .base import Attention, MaskKernel, Mdma, register, sdpa

# Video groups smaller than this run together in one masked SDPA call with the text queries (small
# query blocks are slow, on a CPU especially); their mask rows are capped so it never nears N x N.
MERGE_BELOW, MERGE_CAP = 768, 2048
# Layouts built inside every block (DMEM's) pad their group query counts up to a multiple of this,
# per device type. On CUDA, SDPA's cuDNN backend builds an execution plan for every new shape (15-20 ms
# of CPU each, measured on an H200: `benchmarks/gpu.py --profile`), and DMEM's group sizes change in
# every block, where its one synchronisation keeps the CPU from running ahead: without buckets a
# training step took 3.4x the plain one, with them 1.15x. The padded rows repeat a real query and
# their outputs are dropped (no gradient reaches them). A step's layout (RMPM's) is not padded: its
# blocks share one shape, the few plans it builds overlap the GPU's work, and padding measured 1.6%
# slower there. Elsewhere no plan is built and padding would only cost time.
QUERY_BUCKETS = {"cuda": 256}


def padded_queries(queries: torch.Tensor, pad: bool) -> torch.Tensor:
    """``queries`` (a 1-D index, not empty), when ``pad``, with its first index repeated up to the device's bucket."""
    bucket = QUERY_BUCKETS.get(queries.device.type, 1) if pad else 1
    extra = -queries.numel() % bucket
    return torch.cat([queries, queries[:1].expand(extra)]) if extra else queries


class QueryGroup(NamedTuple):
    """Video queries that read the same keys besides video: their index (padded, see ``QUERY_BUCKETS``,
    unless the group is every video query), how many of them are real, and the keys. ``chained``
    (joint form): the keys are a prefix of the layout's key buffer tail, read as a slice."""

    queries: torch.Tensor
    count: int
    keys: torch.Tensor
    chained: bool = False

    @classmethod
    def of(
        cls, queries: torch.Tensor, num_video: int, keys: torch.Tensor, chained: bool = False, pad: bool = False
    ) -> QueryGroup:
        count = queries.numel()
        return cls(queries if count == num_video else padded_queries(queries, pad), count, keys, chained)


def chain_order(key_sets: list[tuple[int, ...]], num_small: int) -> tuple[list[int], list[bool]]:
    """An order of the ``num_small`` text and motion keys in which as many key sets as possible are
    prefixes (sets nested in one another), and for each set whether it is one. A group whose keys
    are a prefix reads a slice of one shared key buffer: no copy, nothing rewritten."""
    order: list[int] = []
    prefix: set[int] = set()
    in_chain = [False] * len(key_sets)
    for i in sorted(range(len(key_sets)), key=lambda i: len(key_sets[i])):
        keys = set(key_sets[i])
        if prefix <= keys:
            order += sorted(keys - prefix)
            prefix = keys
            in_chain[i] = True
    order += [k for k in range(num_small) if k not in prefix]
    return order, in_chain


class GroupedJoint:
    """MDMA of one video for a joint text-video attention, grouped. Keys live in one buffer
    ``[video | text and motion keys in order]``; one masked call serves the text queries and the merged
    small video groups (``masked_rows`` over that buffer); every other group reads the first
    ``n_video + len(keys)`` keys when its keys are a prefix of ``order`` (``chained``), else gathers them."""

    def __init__(self, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False) -> None:
        self.member, self.video_masks = mdma.member, mdma.video_masks
        device, valid = mdma.video_masks.device, mdma.text_valid
        num_video = mdma.video_masks.shape[1]
        self.text_queries = None  # with padded text: the valid text queries (a padded one's output is 0)
        if valid is not None:  # a padded text query's output reaches nobody (its key is closed): not computed
            self.text_queries = valid.to(device).nonzero().squeeze(1)
        args = mdma[:5]
        text_rows = mdma_text_rows(*args, text_valid=valid, queries=self.text_queries)
        small = text_rows.shape[1] - num_video
        merged, large, budget = [], [], min(MERGE_CAP, num_video // 2)
        groups = video_groups(*args, key_cache=key_cache, text_valid=valid)
        for queries, keys, key_tuple in sorted(groups, key=lambda g: g[0].numel()):
            if queries.numel() < MERGE_BELOW and queries.numel() <= budget:
                budget -= queries.numel()
                merged.append((queries, keys))
            else:
                large.append((queries, keys, key_tuple))
        cache = {} if key_cache is None else key_cache
        config = ("order", tuple(t for _, _, t in large), small)
        if config not in cache:  # the buffer's key order, kept for the next block or step with these groups
            order, in_chain = chain_order(list(config[1]), small)
            order = torch.tensor(order, dtype=torch.long, device=device)
            position = torch.empty(small, dtype=torch.long, device=device)
            position[order] = torch.arange(small, device=device)
            cache[config] = (order, position, in_chain)
        self.order, position, in_chain = cache[config]
        self.groups = [
            QueryGroup.of(q, num_video, k if chained else position[k], chained, pad_queries)
            for (q, k, _), chained in zip(large, in_chain)
        ]
        rows = [torch.cat([text_rows[:, small:], text_rows[:, :small][:, self.order]], dim=1)]
        for queries, keys in merged:
            row = torch.zeros(small, dtype=torch.bool, device=device)
            row[keys] = True
            video = torch.ones(num_video, dtype=torch.bool, device=device)
            rows.append(torch.cat([video, row[self.order]])[None].expand(queries.numel(), -1))
        self.masked_queries = mdma.video_masks.new_zeros(0, dtype=torch.long)  # merged video queries (padded)
        self.num_merged = 0  # how many of them are real
        if merged:
            real = torch.cat([q for q, _ in merged])
            self.num_merged, self.masked_queries = real.numel(), padded_queries(real, pad_queries)
            rows.append(rows[-1][-1:].expand(self.masked_queries.numel() - real.numel(), -1))  # the padded rows'
        self.masked_rows = torch.cat(rows)
        # masked_rows as SDPA's additive float mask, per (dtype, device): made at the layout's first call
        # instead of by SDPA in every block's call (0-3% faster on this CPU: `benchmarks/overhead.py --attention`)
        self.biases: dict = {}

    def attend(self, query, key, value, m_q, m_k, m_v, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """``query/key/value`` ``[B, H, L_y + N_v, d]`` (the block's own, after QK-norm and RoPE), ``m_*`` the
        motion tokens' ``[B, H, K * d_m, d]``; returns ``[B, H, L_y + N_v, d]``. The layout diffusers'
        processor has; a processor that builds its tokens video first calls :meth:`attend_video_first` and
        copies nothing (the motion queries are never computed: their outputs would be dropped)."""
        n_video = query.shape[2] - text_len
        out = self.attend_video_first(
            torch.cat([query[:, :, text_len:], query[:, :, :text_len]], dim=2),
            torch.cat([key[:, :, text_len:], key[:, :, :text_len], m_k], dim=2),
            torch.cat([value[:, :, text_len:], value[:, :, :text_len], m_v], dim=2),
            text_len,
            attention,
        )
        return torch.cat([out[:, :, n_video:], out[:, :, :n_video]], dim=2)

    def masked_bias(self, like: torch.Tensor) -> torch.Tensor:
        """``masked_rows`` as the float mask SDPA makes of a bool one (0 where allowed, -inf elsewhere),
        in ``like``'s dtype and device, made once per layout."""
        key = (like.dtype, like.device)
        if key not in self.biases:
            rows = self.masked_rows.to(like.device)
            self.biases[key] = torch.zeros(rows.shape, dtype=like.dtype, device=like.device).masked_fill_(
                ~rows, float("-inf")
            )
        return self.biases[key]

    def attend_video_first(self, query, keys, values, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """The same attention over tokens laid out ``[video | text | motion]``: ``keys/values``
        ``[B, H, N_v + L_y + K * d_m, d]``, ``query`` the same (its motion rows are never attended with).
        Returns ``[B, H, N_v + L_y, d]``, stored as ``[B, N_v + L_y, H, d]`` (what the block's output
        projection reads). The text and motion rows of ``keys`` and ``values`` are reordered in place into
        the key buffer (``order``): the video keys are never copied."""
        n_video = self.video_masks.shape[1]
        # the key buffer [video | text and motion in `order`]: only the few text and motion rows move
        small_k = keys[:, :, n_video:].index_select(2, self.order)
        small_v = values[:, :, n_video:].index_select(2, self.order)
        keys[:, :, n_video:], values[:, :, n_video:] = small_k, small_v
        batch, heads, _, dim = query.shape
        out = query.new_empty(batch, n_video + text_len, heads, dim).transpose(1, 2)
        video_q = query[:, :, :n_video]
        merged, num_merged = self.masked_queries, self.num_merged
        # the text queries' own rows (a view would keep the whole query alive for the backward pass)
        text_q, texts = self.text_queries, text_len
        if text_q is None:
            masked_q = query[:, :, n_video : n_video + text_len].contiguous()
        else:
            masked_q, texts = query[:, :, n_video : n_video + text_len].index_select(2, text_q), text_q.numel()
        if num_merged:
            masked_q = torch.cat([masked_q, video_q.index_select(2, merged)], dim=2)
        masked_out = attention(masked_q, keys, values, self.masked_bias(query))
        if text_q is None:
            out[:, :, n_video:] = masked_out[:, :, :text_len]
        else:
            out[:, :, n_video:] = 0
            out[:, :, n_video:].index_copy_(2, text_q, masked_out[:, :, :texts])
        video_out = out[:, :, :n_video]  # a view taken after `out` joined the autograd graph
        if num_merged:
            video_out.index_copy_(2, merged[:num_merged], masked_out[:, :, texts : texts + num_merged])
        # groups whose keys are a prefix of the buffer's tail read a slice of it; the others come last:
        # without gradients they overwrite the tail in place, with gradients they gather their own keys
        for queries, count, small, chained in sorted(self.groups, key=lambda g: not g.chained):
            if chained:
                group_k, group_v = keys[:, :, : n_video + small.numel()], values[:, :, : n_video + small.numel()]
            elif torch.is_grad_enabled():
                group_k = torch.cat([keys[:, :, :n_video], small_k.index_select(2, small)], dim=2)
                group_v = torch.cat([values[:, :, :n_video], small_v.index_select(2, small)], dim=2)
            else:
                end = n_video + small.numel()
                keys[:, :, n_video:end] = small_k.index_select(2, small)
                values[:, :, n_video:end] = small_v.index_select(2, small)
                group_k, group_v = keys[:, :, :end], values[:, :, :end]
            if count == n_video:
                video_out.copy_(attention(video_q, group_k, group_v))
            else:
                group_out = attention(video_q.index_select(2, queries), group_k, group_v)
                video_out.index_copy_(2, queries[:count], group_out[:, :, :count])
        return out


class GroupedCross:
    """MDMA of one video for a cross-attention of video queries over ``[text | motion]`` keys, grouped:
    each group attends unmasked over its own text and motion keys."""

    def __init__(self, mdma: Mdma, key_cache: dict | None = None, pad_queries: bool = False) -> None:
        self.video_masks = mdma.video_masks
        valid, text_len = mdma.text_valid, mdma.member.shape[1]
        self.groups: list[QueryGroup] = []
        for queries, keys, _ in video_groups(*mdma[:5], key_cache=key_cache, text_valid=valid):
            if keys.numel() == 0:  # nothing left to read: the whole (valid) text (mdma_cross_dense's rule)
                keys = torch.arange(text_len, device=keys.device)
                if valid is not None:
                    keys = keys[valid.to(keys.device)]
            self.groups.append(QueryGroup.of(queries, mdma.video_masks.shape[1], keys, pad=pad_queries))

    def attend(self, query, key, value, m_k, m_v, attention: Attention = sdpa) -> torch.Tensor:
        """``query`` ``[B, H, N_v, d]``, ``key/value`` ``[B, H, L_y, d]`` (the text's), ``m_*`` the motion
        tokens' ``[B, H, K * d_m, d]``; returns ``[B, H, N_v, d]``."""
        keys, values = torch.cat([key, m_k], dim=2), torch.cat([value, m_v], dim=2)
        if len(self.groups) == 1 and self.groups[0].count == query.shape[2]:
            small = self.groups[0].keys
            return attention(query, keys.index_select(2, small), values.index_select(2, small))
        out = query.new_empty(query.shape)
        for queries, count, small, _ in self.groups:
            group_out = attention(
                query.index_select(2, queries), keys.index_select(2, small), values.index_select(2, small)
            )
            out.index_copy_(2, queries[:count], group_out[:, :, :count])
        return out


AUTO = register(MaskKernel("auto", GroupedJoint, GroupedCross, opaque_when_compiled=True))
