"""The one attention processor of FlexiMMT: motion tokens (Eq. 2) and MDMA (Eqs. 3-11) inside
CogVideoX's joint text-video attention, for inference and training alike.

Per-step state reaches the processor through diffusers' ``attention_kwargs`` as
``{"fleximmt": FlexiMMTState}``; without it the processor computes exactly what diffusers'
``CogVideoXAttnProcessor2_0`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from .masks import PARTS, dmem_mask, mdma_dense, mdma_text_rows, mdma_video_groups

BACKENDS = ("auto", "dense")
# Video groups smaller than this run together in one masked SDPA call with the text queries (small
# query blocks are slow, on a CPU especially); their mask rows are capped so it never nears N x N.
MERGE_BELOW, MERGE_CAP = 768, 2048


@dataclass
class MDMALayout:
    """MDMA for one denoising step, in the form the attention backends need, built once per step."""

    member: torch.Tensor  # bool [K, L_y]: Y_mo^k
    tokens_per_motion: int
    video_masks: torch.Tensor  # bool [K, N_v]: V^k
    parts: frozenset[str]
    context_text: str
    backend: str = "auto"
    # auto backend: one masked call for the text queries and the merged small video groups (rows
    # [L_y + n_merged, N], keys in buffer order [video | text | motion]), one unmasked call per other group
    masked_rows: torch.Tensor | None = None
    masked_queries: torch.Tensor | None = None  # video query indices in the masked call
    groups: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    dense: torch.Tensor | None = None  # dense: bool [N, N]

    def __post_init__(self) -> None:
        args = (self.member, self.tokens_per_motion, self.video_masks, self.parts, self.context_text)
        if self.backend == "dense":
            spans = [row.nonzero().squeeze(1).tolist() for row in self.member]
            self.dense = mdma_dense(self.member.shape[1], spans, *args[1:])
        else:
            rows = mdma_text_rows(*args)
            num_video = self.video_masks.shape[1]
            small = rows.shape[1] - num_video
            rows = [torch.cat([rows[:, small:], rows[:, :small]], dim=1)]  # buffer order
            merged, self.groups = [], []
            budget = min(MERGE_CAP, num_video // 2)
            for queries, keys in sorted(mdma_video_groups(*args), key=lambda g: g[0].numel()):
                if queries.numel() < MERGE_BELOW and queries.numel() <= budget:
                    budget -= queries.numel()
                    merged.append(queries)
                    row = torch.zeros(small, dtype=torch.bool, device=keys.device)
                    row[keys] = True
                    video = torch.ones(num_video, dtype=torch.bool, device=keys.device)
                    rows.append(torch.cat([video, row])[None].expand(queries.numel(), -1))
                else:
                    self.groups.append((queries, keys))
            self.masked_rows = torch.cat(rows)
            self.masked_queries = torch.cat(merged) if merged else self.video_masks.new_zeros(0, dtype=torch.long)


@dataclass
class FlexiMMTState:
    """What the processor of every block reads during one pipeline call (or one training step).

    ``motion_tokens`` ``[K, blocks, d_m, dim]``; ``member`` bool ``[K, L_y]``. ``video_masks`` are
    set once per step by :meth:`set_video_masks` (RMPM, static or all-open masks), or, when
    ``concept_member`` is given, extracted inside every block by DMEM's QK rule (training, and the
    ``mask_source="qk"`` ablation), with a fraction ``dmem_drop`` of positives dropped at random.
    Features for RMPM are summed over ``feature_blocks`` from the branch ``feature_row``.
    """

    motion_tokens: torch.Tensor
    member: torch.Tensor
    parts: frozenset[str] = frozenset(PARTS)
    context_text: str = "open"
    backend: str = "auto"
    num_frames: int = 1  # latent token frames, for DMEM's per-frame threshold
    concept_member: torch.Tensor | None = None  # bool [K, L_y]; set -> DMEM masks inside attention
    dmem_drop: float = 0.0
    generator: torch.Generator | None = None
    feature_blocks: frozenset[int] = frozenset()
    feature_row: int = 0
    layout: MDMALayout | None = None
    _dmem_layouts: dict[int, MDMALayout] = field(default_factory=dict)
    _features: torch.Tensor | None = None
    _feature_count: int = 0

    @property
    def num_objects(self) -> int:
        return self.motion_tokens.shape[0]

    @property
    def tokens_per_motion(self) -> int:
        return self.motion_tokens.shape[2]

    def set_video_masks(self, video_masks: torch.Tensor) -> None:
        """Prepare MDMA for the next step from bool ``[K, N_v]`` object masks."""
        self.layout = MDMALayout(
            self.member, self.tokens_per_motion, video_masks.bool(), self.parts, self.context_text, self.backend
        )

    def begin_step(self) -> None:
        """Forget the per-block DMEM masks of the previous step (a recomputed block - gradient
        checkpointing - reuses the masks of its first pass, random drop included)."""
        self._dmem_layouts.clear()

    # -- RMPM features (captured during the ordinary forward) --------------------------------
    def observe(self, block: int, video_out: torch.Tensor) -> None:
        if block in self.feature_blocks:
            feat = video_out[self.feature_row].detach().float()
            self._features = feat if self._features is None else self._features + feat
            self._feature_count += 1

    def take_features(self) -> torch.Tensor | None:
        """The mean captured feature per video token ``[N_v, D]`` since the last call, or None."""
        if self._features is None:
            return None
        mean = self._features / self._feature_count
        self._features, self._feature_count = None, 0
        return mean

    # -- attention --------------------------------------------------------------------------
    def motion_projections(self, attn: Attention, block: int, batch: int, with_queries: bool):
        tokens = self.motion_tokens[:, block].reshape(-1, self.motion_tokens.shape[-1])
        tokens = tokens.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        heads = attn.heads

        def project(linear, norm):
            x = linear(tokens)
            x = x.view(1, x.shape[0], heads, -1).transpose(1, 2)
            if norm is not None:
                x = norm(x)
            return x.expand(batch, -1, -1, -1)

        key = project(attn.to_k, attn.norm_k)
        value = project(attn.to_v, None)
        query = project(attn.to_q, attn.norm_q) if with_queries else None
        return query, key, value

    def attend(self, attn: Attention, block: int, query, key, value, text_len: int) -> torch.Tensor:
        """MDMA attention of the text and video queries over ``[text | motion | video]`` keys.

        ``query/key/value`` ``[B, H, L_y + N_v, d]`` are the block's own projections (after
        QK-norm and RoPE); returns ``[B, H, L_y + N_v, d]`` - motion-token queries are never
        computed (their outputs would be dropped).
        """
        batch = query.shape[0]
        if self.concept_member is not None:
            if block not in self._dmem_layouts:
                self._extract_masks(query, key, text_len)
                self._dmem_layouts[block] = self.layout
            self.layout = self._dmem_layouts[block]
        m_q, m_k, m_v = self.motion_projections(attn, block, batch, with_queries=self.backend == "dense")
        if self.backend == "dense":
            return self._attend_dense(query, key, value, m_q, m_k, m_v, text_len)
        return self._attend_grouped(query, key, value, m_k, m_v, text_len)

    def _extract_masks(self, query, key, text_len: int) -> None:
        """DMEM (Sec. 3.3): each object's mask from its concept words' queries times video keys."""
        row = self.feature_row
        masks = []
        with torch.no_grad():  # the masks are a selection, not a path for gradients
            video_keys = key[row : row + 1, :, text_len:]
            for concept in self.concept_member:
                q = query[row : row + 1, :, concept.nonzero().squeeze(1)]
                mask = dmem_mask(q, video_keys, self.num_frames)[0]
                if self.dmem_drop > 0:  # the release's regulariser: drop positives, redrawn every call
                    keep = torch.rand(mask.shape, generator=self.generator, device="cpu").to(mask.device)
                    mask = mask & (keep >= self.dmem_drop)
                masks.append(mask)
        self.set_video_masks(torch.stack(masks))

    def _attend_dense(self, query, key, value, m_q, m_k, m_v, text_len: int) -> torch.Tensor:
        q = torch.cat([query[:, :, :text_len], m_q, query[:, :, text_len:]], dim=2)
        k = torch.cat([key[:, :, :text_len], m_k, key[:, :, text_len:]], dim=2)
        v = torch.cat([value[:, :, :text_len], m_v, value[:, :, text_len:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.layout.dense)
        motion_end = text_len + m_k.shape[2]
        return torch.cat([out[:, :, :text_len], out[:, :, motion_end:]], dim=2)

    def _attend_grouped(self, query, key, value, m_k, m_v, text_len: int) -> torch.Tensor:
        layout = self.layout
        n_video = key.shape[2] - text_len
        small_k = torch.cat([key[:, :, :text_len], m_k], dim=2)  # [text | motion] keys
        small_v = torch.cat([value[:, :, :text_len], m_v], dim=2)
        # one key/value buffer [video | text | motion]: the text queries read it whole, each video
        # group rewrites the tail with its own text and motion keys (no copy of the video keys)
        keys = torch.cat([key[:, :, text_len:], small_k], dim=2)
        values = torch.cat([value[:, :, text_len:], small_v], dim=2)
        out = query.new_empty(query.shape)
        video_q = query[:, :, text_len:]
        # one masked call: the text queries and the merged small video groups, their mask rows only
        merged = layout.masked_queries
        masked_q = query[:, :, :text_len]
        if merged.numel():
            masked_q = torch.cat([masked_q, video_q.index_select(2, merged)], dim=2)
        masked_out = F.scaled_dot_product_attention(masked_q, keys, values, attn_mask=layout.masked_rows)
        out[:, :, :text_len] = masked_out[:, :, :text_len]
        video_out = out[:, :, text_len:]  # a view taken after `out` joined the autograd graph
        if merged.numel():
            video_out.index_copy_(2, merged, masked_out[:, :, text_len:])
        # every other video group: one unmasked SDPA over its own keys
        for queries, small in layout.groups:
            end = n_video + small.numel()
            if torch.is_grad_enabled():  # autograd keeps every group's keys: give each its own
                keys, values = keys.clone(), values.clone()
            keys[:, :, n_video:end] = small_k.index_select(2, small)
            values[:, :, n_video:end] = small_v.index_select(2, small)
            if queries.numel() == video_q.shape[2]:
                video_out.copy_(F.scaled_dot_product_attention(video_q, keys[:, :, :end], values[:, :, :end]))
            else:
                group_out = F.scaled_dot_product_attention(
                    video_q.index_select(2, queries), keys[:, :, :end], values[:, :, :end]
                )
                video_out.index_copy_(2, queries, group_out)
        return out


class FlexiMMTAttnProcessor:
    """CogVideoX attention with motion tokens and MDMA. One class for every block, training and
    inference; each block holds an instance that knows its index (its motion tokens differ)."""

    def __init__(self, block_index: int) -> None:
        self.block_index = block_index

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        fleximmt: FlexiMMTState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        if fleximmt is None or fleximmt.num_objects == 0:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            if attention_mask is not None:
                raise ValueError("FlexiMMT attention takes no attention_mask of its own: MDMA is the mask")
            out = fleximmt.attend(attn, self.block_index, query, key, value, text_len)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        if fleximmt is not None:
            fleximmt.observe(self.block_index, video_out)
        return video_out, encoder_out


def install_processors(transformer) -> None:
    """Give every transformer block its FlexiMMT processor (idempotent)."""
    for index, block in enumerate(transformer.transformer_blocks):
        if not isinstance(block.attn1.processor, FlexiMMTAttnProcessor):
            block.attn1.set_processor(FlexiMMTAttnProcessor(index))
