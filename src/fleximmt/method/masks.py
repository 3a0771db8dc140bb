"""Pure tensor logic of FlexiMMT's masks: MDMA (Eqs. 3-11), DMEM (Sec. 3.3) and RMPM (Eqs. 12-13).

Nothing here knows about diffusers. Token order everywhere is the one of Eq. 2:
``[text (L_y) | motion (K * d_m, object-major) | video (N_v)]``; video tokens are flattened as
``(latent frame, row, column)``, the order of CogVideoX's patch embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PARTS = ("m2v", "m2m", "t2v", "t2t", "t2m")
CONTEXT_TEXT = ("open", "closed")
RMPM_METHODS = ("paper", "released")
MASK_RESIZES = ("coverage", "released")  # first-frame masks onto the token grid: fleximmt's, the release's


def check_parts(parts: Sequence[str]) -> frozenset[str]:
    """Validate an MDMA part list (a subset of ``PARTS``) and return it as a frozenset."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown MDMA part(s) {bad}: choose from {list(PARTS)}")
    return frozenset(parts)


def check_context_text(context_text: str) -> str:
    if context_text not in CONTEXT_TEXT:
        raise ValueError(
            f"context_text={context_text!r}: choose 'open' (the release) or 'closed' (Eq. 6 to the letter)"
        )
    return context_text


def span_membership(text_len: int, motion_spans: Sequence[Sequence[int]]) -> torch.Tensor:
    """Bool ``[K, text_len]``: which text tokens are object k's motion words (``Y_mo^k``)."""
    member = torch.zeros(len(motion_spans), text_len, dtype=torch.bool)
    for k, span in enumerate(motion_spans):
        idx = torch.as_tensor(list(span), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= text_len):
            raise ValueError(f"motion span of object {k} has indices outside the {text_len} text tokens: {list(span)}")
        member[k, idx] = True
    return member


def text_text_mask(member: torch.Tensor) -> torch.Tensor:
    """Y x Y of Eq. 8: blocked iff both tokens are motion words and they never share an object."""
    any_obj = member.any(0)
    share = (member.T.float() @ member.float()) > 0
    return ~(any_obj[:, None] & any_obj[None, :] & ~share)


def text_video_mask(member: torch.Tensor, video_masks: torch.Tensor, context_text: str) -> torch.Tensor:
    """Y x V of Eqs. 6-7 ``[L_y, N_v]``; context text (no motion span) is open or closed to all video."""
    allowed = (member.T.float() @ video_masks.float()) > 0
    context = ~member.any(0)[:, None]
    return allowed | context if context_text == "open" else allowed & ~context


def mdma_dense(
    text_len: int,
    motion_spans: Sequence[Sequence[int]],
    tokens_per_motion: int,
    video_masks: torch.Tensor,
    parts: Sequence[str] = PARTS,
    context_text: str = "open",
    text_valid: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """The full MDMA mask ``M`` of Eq. 11 as a dense ``[N, N]`` bool tensor (True = may attend).

    ``motion_spans[k]`` are the indices of object k's motion words among the text tokens,
    ``video_masks`` is bool ``[K, N_v]`` (``V^k``). A part switched off leaves its blocks all True.
    A row with no allowed key keeps its diagonal, so softmax never sees an all-masked row.
    ``text_valid`` (bool ``[L_y]``, None: all) marks the text tokens that are not padding: a padded
    text key is closed to every query and a padded text query reads only itself (docs/method.md#hunyuanvideo-15).
    This is the reference the fast attention backend is tested against; it is O(N^2) memory.
    """
    parts = check_parts(parts)
    check_context_text(context_text)
    video_masks = torch.as_tensor(video_masks, dtype=torch.bool)
    num_objects, num_video = video_masks.shape
    if len(motion_spans) != num_objects:
        raise ValueError(f"{len(motion_spans)} motion spans for {num_objects} video masks: give one span per object")
    device = video_masks.device
    member = span_membership(text_len, motion_spans).to(device)
    d_m = tokens_per_motion
    m_len = num_objects * d_m
    n = text_len + m_len + num_video
    y, m, v = slice(0, text_len), slice(text_len, text_len + m_len), slice(text_len + m_len, n)
    motion_owner = motion_ownership(num_objects, d_m, device)

    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    if "m2v" in parts:  # Eqs. 3-4 and the transpose
        mv = (motion_owner.T.float() @ video_masks.float()) > 0
        mask[m, v], mask[v, m] = mv, mv.T
    if "m2m" in parts:  # Eq. 5
        mask[m, m] = False
    if "t2v" in parts:  # Eqs. 6-7
        yv = text_video_mask(member, video_masks, context_text)
        mask[y, v], mask[v, y] = yv, yv.T
    if "t2t" in parts:  # Eq. 8
        mask[y, y] = text_text_mask(member)
    if "t2m" in parts:  # Eqs. 9-10
        ym = (member.T.float() @ motion_owner.float()) > 0
        mask[y, m], mask[m, y] = ym, ym.T
    if text_valid is not None:
        padded = torch.zeros(n, dtype=torch.bool, device=device)
        padded[y] = ~text_valid.to(device)
        mask[:, padded] = False
        mask[padded] = False
    empty = ~mask.any(1)
    mask[empty, empty.nonzero().squeeze(1)] = True
    return mask


def motion_ownership(num_objects: int, tokens_per_motion: int, device=None) -> torch.Tensor:
    """Bool ``[K, K * d_m]``: motion token j belongs to object ``j // d_m`` (object-major layout)."""
    owner = torch.arange(num_objects * tokens_per_motion, device=device) // tokens_per_motion
    return owner[None, :] == torch.arange(num_objects, device=device)[:, None]


def mdma_text_rows(
    member: torch.Tensor,
    tokens_per_motion: int,
    video_masks: torch.Tensor,
    parts: frozenset[str],
    context_text: str,
    text_valid: torch.Tensor | None = None,
    queries: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """The text-query rows of ``M`` over keys ``[text | motion | video]``: bool ``[L_y, N]`` (padded
    text as in :func:`mdma_dense`), or only the rows of the text queries ``queries`` (indices).

    What the fast backend hands to SDPA for the few text queries (no N x N tensor)."""
    num_objects, text_len = member.shape
    device = video_masks.device
    owner = motion_ownership(num_objects, tokens_per_motion, device)
    num_video = video_masks.shape[1]
    index = torch.arange(text_len, device=device) if queries is None else queries.to(device)
    words = member[:, index]  # the queries' columns of the motion words
    rows_n = index.numel()
    yy = (
        text_text_mask(member)[index]
        if "t2t" in parts
        else torch.ones(rows_n, text_len, dtype=torch.bool, device=device)
    )
    ym = (
        (words.T.float() @ owner.float()) > 0
        if "t2m" in parts
        else torch.ones(rows_n, owner.shape[1], dtype=torch.bool, device=device)
    )
    if "t2v" in parts:
        yv = text_video_mask(words, video_masks, context_text)
    else:
        yv = torch.ones(rows_n, num_video, dtype=torch.bool, device=device)
    rows = torch.cat([yy, ym, yv], dim=1)
    if text_valid is not None:
        valid = text_valid.to(device)
        rows[:, :text_len][:, ~valid] = False
        padded = ~valid[index]
        rows[padded] = False
        rows[padded, index[padded]] = True  # a padded query reads only itself
    return rows


def group_keys(
    member: torch.Tensor,
    tokens_per_motion: int,
    objects: Sequence[bool],
    parts: frozenset[str],
    context_text: str,
    text_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices into ``[text | motion]`` of the keys a video query in exactly ``objects`` may read
    (besides video, which is all open): ``Y_mo^k`` and ``M^k`` of its objects, and the context text;
    never a padded text key (``text_valid``)."""
    num_objects, text_len = member.shape
    objs = torch.as_tensor(list(objects), dtype=torch.bool, device=member.device)
    if "t2v" in parts:
        context = (
            ~member.any(0) if context_text == "open" else torch.zeros(text_len, dtype=torch.bool, device=member.device)
        )
        text_keys = member[objs].any(0) | context
    else:
        text_keys = torch.ones(text_len, dtype=torch.bool, device=member.device)
    if text_valid is not None:
        text_keys = text_keys & text_valid.to(member.device)
    owner = motion_ownership(num_objects, tokens_per_motion, member.device)
    motion_keys = (
        owner[objs].any(0) if "m2v" in parts else torch.ones(owner.shape[1], dtype=torch.bool, device=member.device)
    )
    return torch.cat([text_keys, motion_keys]).nonzero().squeeze(1)


def mdma_video_groups(
    member: torch.Tensor,
    tokens_per_motion: int,
    video_masks: torch.Tensor,
    parts: frozenset[str],
    context_text: str,
    key_cache: dict | None = None,
    text_valid: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Video queries grouped by the keys they may read (docs/method.md#attention-without-an-n-x-n-mask).

    V x V is all open, so a video query's row of ``M`` depends only on which objects it belongs
    to. Returns ``[(query_indices, key_indices)]``: the video tokens of each group (on the masks'
    device) and the indices of the text and motion keys (into ``[text | motion]``) it may read
    besides all video (never a padded text key, ``text_valid``). See :func:`video_groups` for ``key_cache``.
    """
    return [
        (queries, keys)
        for queries, keys, _ in video_groups(
            member, tokens_per_motion, video_masks, parts, context_text, key_cache, text_valid
        )
    ]


def video_groups(
    member: torch.Tensor,
    tokens_per_motion: int,
    video_masks: torch.Tensor,
    parts: frozenset[str],
    context_text: str,
    key_cache: dict | None = None,
    text_valid: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """:func:`mdma_video_groups` with each group's keys also as a host tuple. One small device-to-host
    copy (the group sizes) is the only synchronisation once ``key_cache`` (a dict kept across calls
    with the same words) holds the key lists of the object combinations seen so far."""
    num_objects, num_video = video_masks.shape
    device = video_masks.device
    codes = video_codes(video_masks) if num_objects else torch.zeros(num_video, dtype=torch.long, device=device)
    counts = torch.bincount(codes, minlength=2**num_objects).tolist()  # the one sync
    order = torch.argsort(codes, stable=True)
    cache = {} if key_cache is None else key_cache
    groups: dict[tuple[int, ...], list] = {}
    for code, queries in enumerate(torch.split(order, counts)):
        if not counts[code]:
            continue
        cache_key = (code, parts, context_text)
        if cache_key not in cache:
            if "member" not in cache:  # a cache serves one member and one text padding
                cache["member"] = member.cpu()
                cache["valid"] = None if text_valid is None else text_valid.cpu()
            objs = [(code >> k) & 1 == 1 for k in range(num_objects)]
            keys = group_keys(cache["member"], tokens_per_motion, objs, parts, context_text, cache["valid"])
            cache[cache_key] = (tuple(keys.tolist()), keys.to(device))
        key_tuple, keys = cache[cache_key]
        groups.setdefault(key_tuple, [keys]).append(queries)
    return [(torch.cat(found[1:]), found[0], key_tuple) for key_tuple, found in groups.items()]


CROSS_PARTS = ("m2v", "t2v")  # the MDMA parts that exist where only video tokens query (docs/method.md#wan)


def check_cross_parts(parts: Sequence[str], context_text: str = "open") -> frozenset[str]:
    """Validate MDMA settings for cross-attention (video queries over text and motion keys)."""
    parts = check_parts(parts)
    extra = sorted(parts - set(CROSS_PARTS))
    if extra:
        raise ValueError(
            f"MDMA parts {extra} do not exist on this model: only video tokens query its text (no text or motion "
            f"queries), so only {list(CROSS_PARTS)} apply"
        )
    if check_context_text(context_text) == "closed":
        raise ValueError(
            "context_text='closed' is not possible on this model: its video reads text only through "
            "cross-attention, so closing the context words would cut video off from the prompt; use 'open'"
        )
    return parts


def mdma_cross_dense(
    member: torch.Tensor,
    tokens_per_motion: int,
    video_masks: torch.Tensor,
    parts: Sequence[str] = CROSS_PARTS,
    text_valid: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """MDMA of a cross-attention (docs/method.md#wan): bool ``[N_v, L_y + K * d_m]``, which text and
    motion keys each video query may read.

    m2v: a video query in ``V^k`` reads ``M^k`` and no other motion token (outside every object: none);
    t2v: it reads ``Y_mo^k`` of its objects and the context words, no other object's motion words.
    A part switched off leaves its keys open. A video query left with no key at all (every text token
    is some other object's motion word) reads the whole text, so softmax never sees an empty row.
    A padded text key (``text_valid`` False) is closed to every query, and "the whole text" is its valid part.
    """
    parts = check_cross_parts(parts)
    num_objects, text_len = member.shape
    video_masks = torch.as_tensor(video_masks, dtype=torch.bool)
    owner = motion_ownership(num_objects, tokens_per_motion, video_masks.device)
    member = member.to(video_masks.device)
    vm = video_masks.T.float()  # [N_v, K]
    if "t2v" in parts:
        text = (vm @ member.float()) > 0
        text |= ~member.any(0)[None]
    else:
        text = torch.ones(video_masks.shape[1], text_len, dtype=torch.bool, device=video_masks.device)
    if "m2v" in parts:
        motion = (vm @ owner.float()) > 0
    else:
        motion = torch.ones(video_masks.shape[1], owner.shape[1], dtype=torch.bool, device=video_masks.device)
    valid = torch.ones(text_len, dtype=torch.bool, device=video_masks.device)
    if text_valid is not None:
        valid = text_valid.to(video_masks.device)
        text = text & valid
    mask = torch.cat([text, motion], dim=1)
    empty = ~mask.any(1)
    mask[:, :text_len][empty] = valid
    return mask


def mask_to_token_grid(mask: torch.Tensor, height: int, width: int, method: str = "coverage") -> torch.BoolTensor:
    """Downsample an image-resolution bool mask ``[H, W]`` to the latent token grid ``[h, w]``.

    ``method="coverage"``: a token is in the object when at least half of its pixels are. An object
    too small to cover half of any token keeps every token it touches, so a non-empty mask never
    vanishes. ``method="released"``: the authors' rule (docs/method.md#the-release-preset): the mask as
    a greyscale image (object 255) resized by PIL's bicubic filter, then above 127; a small object may vanish.
    """
    if method not in MASK_RESIZES:
        raise ValueError(f"mask resize method={method!r}: choose from {list(MASK_RESIZES)}")
    if method == "released":
        from PIL import Image

        grey = Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255)  # a 2-D uint8 array is an "L" image
        # BICUBIC is what PIL's resize does to an "L" image when no filter is named, as the release calls it
        small = np.asarray(grey.resize((width, height), Image.Resampling.BICUBIC))
        return torch.from_numpy(small > 127)
    cover = F.interpolate(mask[None, None].float(), size=(height, width), mode="area")[0, 0]
    grid = cover >= 0.5
    if not grid.any() and cover.any():
        grid = cover > 0
    return grid


def dmem_mask(concept_queries: torch.Tensor, video_keys: torch.Tensor, num_frames: int) -> torch.BoolTensor:
    """DMEM's training-time object mask (Sec. 3.3): ``Q_y^k K_v^T`` thresholded at each frame's mean.

    ``concept_queries`` ``[B, H, n_c, d]`` are the queries of the concept words, ``video_keys``
    ``[B, H, N_v, d]``. Logits are averaged over concept tokens and heads; returns bool ``[B, N_v]``.
    Every operation is the release's, in its order, so that its rounding in bf16 is the release's too.
    """
    scores = torch.matmul(concept_queries, video_keys.transpose(-2, -1)).mean(dim=(1, 2))  # [B, N_v]
    per_frame = scores.view(scores.shape[0], num_frames, -1)
    # each frame's mean is taken in float32, then compared in the scores' precision (a 0-dim float32
    # threshold against bf16 scores, as the release compares them)
    threshold = per_frame.float().mean(-1, keepdim=True).to(per_frame.dtype)
    return (per_frame > threshold).view_as(scores)


def drop_positives(masks: torch.Tensor, draw: torch.Tensor, rate: float, exact: bool = False) -> torch.BoolTensor:
    """DMEM's regulariser (docs/method.md#in-training): drop a share ``rate`` of each object's mask tokens.

    ``masks`` bool ``[K, N_v]``, ``draw`` uniform in [0, 1) per object and token. Not ``exact``: a token is
    dropped when its draw is below ``rate``, each with probability ``rate``. ``exact``: each object drops
    exactly ``int(rate x its tokens)`` of them, at least one - those with the lowest draws, a uniformly random
    choice of that many (the release's rule).
    """
    if not exact:
        return masks & (draw >= rate)
    keyed = torch.where(masks, draw, 2.0)  # tokens outside the mask rank after every token inside it
    order = keyed.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(masks.shape[1], device=masks.device).expand_as(order)
    )
    count = (masks.sum(1).double() * rate).long().clamp_min(1)  # int(n * rate) as Python computes it
    return masks & (rank >= count[:, None])


def anchor_frames(frame: int, anchors: int) -> list[int]:
    """RMPM's anchor set for latent frame ``frame`` (0-based): frame 0 plus the ``anchors - 1``
    most recent previous frames (Algorithm 1, with the window slip fixed: docs/method.md#rmpm)."""
    if anchors < 1:
        raise ValueError(f"anchors={anchors}: RMPM needs at least 1 anchor frame (the first frame)")
    recent = list(range(max(1, frame - anchors + 1), frame))
    return [0, *recent]


def _rmpm_paper(first: torch.Tensor, feats: torch.Tensor, anchors: int) -> torch.Tensor:
    # feats [L, n, d] already L2-normalised; first [K, n]
    num_frames = feats.shape[0]
    masks = torch.zeros(first.shape[0], num_frames, first.shape[1], dtype=torch.bool, device=feats.device)
    masks[:, 0] = first
    for frame in range(1, num_frames):
        anc = anchor_frames(frame, anchors)
        # fast form of Eqs. 12-13: S_l = Norm(F_l) . c, c = sum of normalised anchor features in the mask
        proto = torch.einsum("kan,and->kd", masks[:, anc].to(feats.dtype), feats[anc])
        scores = feats[frame] @ proto.T  # [n, K]
        masks[:, frame] = (scores > scores.mean(0, keepdim=True)).T
    return masks


# The released propagation's constants (the authors' compute_mask.py; docs/method.md#the-released-form)
RELEASED_TEMPERATURE = 0.013  # affinity exp(cos / T)
RELEASED_TOP_K = 15  # anchor tokens kept per target token
RELEASED_OUTSIDE = 0.01  # an anchor token outside its label is scaled by this before normalising
RELEASED_TRIM = 0.1  # the threshold's mean leaves out this share of the scores at each end
RELEASED_SCALE, RELEASED_FLOOR = 0.98, 0.3  # threshold = max(floor, scale * trimmed mean)
RELEASED_EMPTY = 0.5  # the threshold where the last anchor's label has no token above 0.5


def _released_threshold(scores: torch.Tensor, region: torch.Tensor) -> float:
    """The release's per-frame threshold: 0.98 x the mean of the scores inside ``region`` (the last
    anchor's label above 0.5) without their lowest and highest 10%, floored at 0.3; 0.5 if the region is empty."""
    inside = scores[region]
    n = inside.numel()
    if n == 0:
        return RELEASED_EMPTY
    cut = int(n * RELEASED_TRIM)
    mean = inside.sort().values[cut:-cut].mean() if cut > 0 and n > 2 * cut else inside.mean()
    return max(RELEASED_FLOOR, mean.item() * RELEASED_SCALE)


def _rmpm_released(first: torch.Tensor, feats: torch.Tensor, anchors: int) -> torch.Tensor:
    """One object's label propagation as the authors released it; ``first`` bool ``[n]``, ``feats``
    ``[L, n, d]`` (not normalised) in the precision it runs in. Returns bool ``[L, n]``.

    The anchors carry labels: the first frame's mask, then the previous frames' soft scores. Every
    operation is the release's, in its order, so that the precision's rounding is the release's too."""
    num_frames = feats.shape[0]
    labels = [first.to(feats.dtype)]  # per frame: its label [n] (frame 0 binary, later frames soft)
    masks = [first]
    for frame in range(1, num_frames):
        anc = anchor_frames(frame, anchors)
        anchor_labels = torch.stack([labels[a] for a in anc])  # [W, n]
        inside = anchor_labels.float() > 0.5  # each anchor's label as a region
        # scaling each source token is a no-op on its direction, not on its rounding: kept as released
        weight = torch.where(inside.reshape(-1), 1.0, RELEASED_OUTSIDE).to(feats.dtype)
        sources = torch.cat([feats[a].T for a in anc], dim=-1) * weight  # [d, W n]
        target = F.normalize(feats[frame], dim=1)  # [n, d]
        aff = torch.exp(torch.mm(target, F.normalize(sources, dim=0)) / RELEASED_TEMPERATURE).T  # [W n, n]
        top = torch.topk(aff, dim=0, k=min(RELEASED_TOP_K, aff.shape[0])).values.min(dim=0).values
        aff[aff < top] = 0  # ties with the k-th value stay
        total = aff.sum(dim=0, keepdim=True)
        valid = total[0] > 0
        aff[:, valid] = aff[:, valid] / total[:, valid]
        scores = torch.mm(anchor_labels.reshape(1, -1), aff)[0]  # [n]
        labels.append(scores)
        masks.append(scores > _released_threshold(scores, inside[-1]))
    return torch.stack(masks)


def rmpm(
    first_masks: torch.Tensor,
    features: torch.Tensor,
    anchors: int = 3,
    method: str = "paper",
    dtype: torch.dtype = torch.float32,
) -> torch.BoolTensor:
    """Regressive Mask Propagation (Algorithm 1): carry first-frame masks through the latent frames.

    ``first_masks`` bool ``[K, h, w]``; ``features`` float ``[L, h, w, d]`` (per-token features of
    every latent frame). ``method="paper"`` is Eqs. 12-13 in the prototype form (O(n d) per frame
    and object); ``method="released"`` is the authors' label propagation, each object on its own.
    ``dtype`` is the precision it runs in (the release: the model's). Returns ``[K, L, h, w]``.
    """
    if method not in RMPM_METHODS:
        raise ValueError(f"rmpm method={method!r}: choose from {list(RMPM_METHODS)}")
    num_objects, h, w = first_masks.shape
    num_frames = features.shape[0]
    if features.shape[1:3] != (h, w):
        raise ValueError(f"features grid {tuple(features.shape[1:3])} differs from the masks' grid {(h, w)}")
    feats = features.reshape(num_frames, h * w, -1).to(dtype)
    first = first_masks.reshape(num_objects, h * w).bool().to(feats.device)
    if method == "paper":
        masks = _rmpm_paper(first, F.normalize(feats, dim=-1), anchors)
    else:
        masks = torch.stack([_rmpm_released(first[k], feats, anchors) for k in range(num_objects)])
    return masks.reshape(num_objects, num_frames, h, w)


def mask_change(old: torch.Tensor, new: torch.Tensor, empty: float = float("inf")) -> float:
    """Dynamic RMPM's stability measure: changed tokens / tokens in the old mask. An empty old mask
    changes by 0 when the new one is empty too, else by ``empty`` (fleximmt: inf; the release: 0)."""
    changed = (old != new).sum().item()
    size = old.sum().item()
    if size == 0:
        return 0.0 if changed == 0 else empty
    return changed / size


def code_masks(num_objects: int, device=None) -> torch.BoolTensor:
    """Bool ``[K, 2^K]``: one stand-in video token for every combination of objects (column ``c`` is in
    object k iff bit k of ``c`` is set). MDMA treats video tokens of one combination alike (V x V is all
    open), so the mask over these stand-ins, indexed by each token's combination, is the whole mask."""
    codes = torch.arange(2**num_objects, device=device)
    return (codes[None] >> torch.arange(num_objects, device=device)[:, None]) & 1 == 1


def video_codes(video_masks: torch.Tensor) -> torch.Tensor:
    """Each video token's object combination (``[N_v]`` long, bit k = in object k)."""
    weights = 2 ** torch.arange(video_masks.shape[0], device=video_masks.device)
    return (video_masks.long() * weights[:, None]).sum(0)
