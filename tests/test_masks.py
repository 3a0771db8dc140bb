"""MDMA, DMEM and RMPM as pure tensor functions, against brute forces written from the equations."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from fleximmt.method.masks import (
    PARTS,
    anchor_frames,
    dmem_mask,
    mask_change,
    mask_to_token_grid,
    mdma_dense,
    mdma_text_rows,
    mdma_video_groups,
    rmpm,
    span_membership,
)


def brute_force_mdma(text_len, spans, d_m, video_masks, parts, context_text):
    """docs/method.md#mdma's rules table, pair by pair, with Python sets."""
    num_objects, num_video = video_masks.shape
    n = text_len + num_objects * d_m + num_video

    def kind(i):
        if i < text_len:
            return "y", i
        if i < text_len + num_objects * d_m:
            return "m", i - text_len
        return "v", i - text_len - num_objects * d_m

    def objects_of(t, j):
        if t == "y":
            return {k for k in range(num_objects) if j in spans[k]}
        if t == "m":
            return {j // d_m}
        return {k for k in range(num_objects) if video_masks[k, j]}

    mask = torch.ones(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            (ta, ja), (tb, jb) = kind(a), kind(b)
            oa, ob = objects_of(ta, ja), objects_of(tb, jb)
            pair = {ta, tb}
            allowed = True
            if pair == {"m", "v"} and "m2v" in parts:
                allowed = bool(oa & ob)
            elif pair == {"m"} and "m2m" in parts:
                allowed = False
            elif pair == {"y", "v"} and "t2v" in parts:
                text_objs = oa if ta == "y" else ob
                allowed = bool(oa & ob) if text_objs else context_text == "open"
            elif pair == {"y"} and "t2t" in parts:
                allowed = not (oa and ob and not (oa & ob))
            elif pair == {"y", "m"} and "t2m" in parts:
                allowed = bool(oa & ob)
            mask[a, b] = allowed
    for a in range(n):
        if not mask[a].any():
            mask[a, a] = True
    return mask


def random_layout(rng: random.Random):
    text_len = rng.randint(3, 9)
    num_objects = rng.randint(1, 3)
    d_m = rng.randint(1, 3)
    num_video = rng.randint(2, 10)
    spans = []
    for _ in range(num_objects):
        # shared motion words happen: spans drawn independently may overlap
        size = rng.randint(0 if rng.random() < 0.15 else 1, 3)
        start = rng.randint(0, text_len - size)
        spans.append(list(range(start, start + size)))
    video_masks = torch.tensor(
        [
            [rng.random() < p for _ in range(num_video)]
            for p in [rng.choice([0.0, 0.3, 0.7, 1.0]) for _ in range(num_objects)]
        ]
    )
    return text_len, spans, d_m, video_masks


ALL_PART_SUBSETS = [frozenset(c) for r in range(len(PARTS) + 1) for c in itertools.combinations(PARTS, r)]


@pytest.mark.parametrize("context_text", ["open", "closed"])
def test_mdma_dense_matches_the_rules_table_on_random_layouts(context_text):
    rng = random.Random(0 if context_text == "open" else 1)
    for trial in range(96):
        text_len, spans, d_m, video_masks = random_layout(rng)
        parts = ALL_PART_SUBSETS[trial % len(ALL_PART_SUBSETS)]
        got = mdma_dense(text_len, spans, d_m, video_masks, parts=parts, context_text=context_text)
        want = brute_force_mdma(text_len, spans, d_m, video_masks, parts, context_text)
        assert torch.equal(got, want), (trial, text_len, spans, d_m, video_masks, parts)


def test_mdma_dense_default_blocks_and_symmetry():
    video_masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    spans = [[1, 2], [4]]
    m = mdma_dense(6, spans, 2, video_masks)
    y, mo, v = slice(0, 6), slice(6, 10), slice(10, 14)
    assert torch.equal(m[mo, v], m[v, mo].T) and torch.equal(m[y, v], m[v, y].T)
    assert m[v, v].all()
    assert not m[mo, mo].any()  # Eq. 5: zero matrix, diagonal included
    assert m[6, 10] and m[6, 11] and not m[6, 12]  # object 0's motion token sees V^0 only
    assert not m[0, 6] and m[1, 6] and not m[1, 8]  # context text never sees motion tokens
    assert not m[1, 4] and m[1, 0]  # motion words of different objects blocked; context open


def test_rows_without_keys_keep_their_diagonal_and_softmax_has_no_nan():
    # K = 1 with m2m and an empty object mask and no motion words: motion rows see nothing
    m = mdma_dense(3, [[]], 2, torch.zeros(1, 4, dtype=torch.bool))
    assert m[3, 3] and m[4, 4] and m[3].sum() == 1
    logits = torch.randn(m.shape).masked_fill(~m, float("-inf"))
    assert torch.isfinite(torch.softmax(logits, -1)).all()


def test_text_rows_and_video_groups_reproduce_the_dense_mask():
    rng = random.Random(7)
    for trial in range(60):
        text_len, spans, d_m, video_masks = random_layout(rng)
        parts = ALL_PART_SUBSETS[(trial * 5) % len(ALL_PART_SUBSETS)]
        context = "open" if trial % 2 else "closed"
        dense = mdma_dense(text_len, spans, d_m, video_masks, parts, context)
        member = span_membership(text_len, spans)
        small = text_len + len(spans) * d_m
        text_rows = mdma_text_rows(member, d_m, video_masks, parts, context)
        assert torch.equal(text_rows, dense[:text_len])
        covered = torch.zeros(video_masks.shape[1], dtype=torch.bool)
        for queries, keys in mdma_video_groups(member, d_m, video_masks, parts, context):
            row = torch.zeros(dense.shape[1], dtype=torch.bool)
            row[keys] = True
            row[small:] = True
            for q in queries.tolist():
                assert not covered[q]
                covered[q] = True
                assert torch.equal(dense[small + q], row), (trial, q)
        assert covered.all()


def test_mask_to_token_grid_keeps_small_objects_and_empty_masks_empty():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[0:16, 0:8] = True
    grid = mask_to_token_grid(mask, 4, 4)
    assert grid[:2, :1].all() and grid.sum() == 2
    tiny = torch.zeros(32, 32, dtype=torch.bool)
    tiny[20, 20] = True
    assert mask_to_token_grid(tiny, 4, 4).sum() == 1
    assert not mask_to_token_grid(torch.zeros(32, 32, dtype=torch.bool), 4, 4).any()


def literal_rmpm(first_masks, features, anchors):
    """Eqs. 12-13 with the correlation matrix C, frame by frame (Algorithm 1, window slip fixed)."""
    num_objects, h, w = first_masks.shape
    num_frames = features.shape[0]
    feats = features.reshape(num_frames, h * w, -1).double()
    out = torch.zeros(num_objects, num_frames, h * w, dtype=torch.bool)
    for k in range(num_objects):
        masks = [first_masks[k].reshape(-1)]
        anchor_ids = [0]
        for frame in range(1, num_frames):
            f_anc = torch.cat([feats[j] for j in anchor_ids])
            m_anc = torch.cat([masks[j] for j in anchor_ids]).double()
            c = F.normalize(feats[frame], dim=-1) @ F.normalize(f_anc * m_anc[:, None], dim=-1).T  # Eq. 12
            s = m_anc @ c.T  # Eq. 13
            masks.append(s > s.mean())
            anchor_ids.append(frame)
            if len(anchor_ids) > anchors:
                anchor_ids.pop(1)  # drop the oldest non-first anchor
        out[k] = torch.stack(masks)
    return out.reshape(num_objects, num_frames, h, w)


@pytest.mark.parametrize("anchors", [1, 2, 3, 5])
def test_rmpm_paper_equals_equations_12_13(anchors):
    gen = torch.Generator().manual_seed(anchors)
    for _ in range(5):
        first = torch.rand(3, 5, 6, generator=gen) < 0.3
        first[2] = False  # an empty object stays empty
        feats = torch.randn(7, 5, 6, 8, generator=gen)
        got = rmpm(first, feats, anchors=anchors, method="paper")
        assert torch.equal(got, literal_rmpm(first, feats, anchors))
        assert not got[2].any()


def test_rmpm_follows_a_moving_object_with_both_methods():
    # features: the object's tokens carry one direction, background another; the object moves right
    h, w, frames, d = 6, 10, 5, 16
    gen = torch.Generator().manual_seed(0)
    obj_dir, bg_dir = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    feats = bg_dir.repeat(frames, h, w, 1) + 0.05 * torch.randn(frames, h, w, d, generator=gen)
    truth = torch.zeros(frames, h, w, dtype=torch.bool)
    for t in range(frames):
        truth[t, 2:4, 1 + t : 3 + t] = True
        feats[t][truth[t]] = obj_dir + 0.05 * torch.randn(int(truth[t].sum()), d, generator=gen)
    for method in ("paper", "released"):
        got = rmpm(truth[:1], feats, anchors=3, method=method)
        assert torch.equal(got[0], truth), method


def test_anchor_frames_and_mask_change():
    assert anchor_frames(1, 3) == [0]
    assert anchor_frames(5, 1) == [0]
    assert anchor_frames(5, 3) == [0, 3, 4]
    old = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert mask_change(old, torch.tensor([1, 0, 1, 0], dtype=torch.bool)) == 1.0
    assert mask_change(old, old) == 0.0
    with pytest.raises(ValueError, match="anchors"):
        anchor_frames(3, 0)


def test_dmem_mask_thresholds_each_frame_at_its_own_mean():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 3, 4, generator=gen)  # 2 heads, 3 concept tokens
    k = torch.randn(1, 2, 3 * 5, 4, generator=gen)  # 3 latent frames x 5 tokens
    got = dmem_mask(q, k, num_frames=3)[0]
    for frame in range(3):
        scores = []
        for token in range(5):
            j = frame * 5 + token
            scores.append(sum(float(q[0, h, c] @ k[0, h, j]) for h in range(2) for c in range(3)) / 6)
        mean = sum(scores) / 5
        assert [s > mean for s in scores] == got[frame * 5 : frame * 5 + 5].tolist()


def brute_force_cross(text_len, spans, d_m, video_masks, parts):
    """docs/method.md#wan's table for a cross-attention, query by query and key by key: a video
    query in V^k reads M^k and Y_mo^k only (no other object's), context words always, and with a part
    off its keys stay open; a query left with nothing reads the whole text."""
    num_objects, num_video = video_masks.shape
    mask = torch.zeros(num_video, text_len + num_objects * d_m, dtype=torch.bool)
    for q in range(num_video):
        mine = {k for k in range(num_objects) if video_masks[k, q]}
        for j in range(text_len):
            owners = {k for k in range(num_objects) if j in spans[k]}
            mask[q, j] = "t2v" not in parts or not owners or bool(owners & mine)
        for j in range(num_objects * d_m):
            mask[q, text_len + j] = "m2v" not in parts or j // d_m in mine
        if not mask[q].any():
            mask[q, :text_len] = True
    return mask


def test_mdma_cross_matches_its_brute_force_on_random_layouts():
    from fleximmt.method.masks import CROSS_PARTS, mdma_cross_dense

    rng = random.Random(9)
    subsets = [frozenset(c) for r in range(3) for c in itertools.combinations(CROSS_PARTS, r)]
    for trial in range(80):
        text_len, spans, d_m, video_masks = random_layout(rng)
        parts = subsets[trial % len(subsets)]
        got = mdma_cross_dense(span_membership(text_len, spans), d_m, video_masks, parts)
        assert torch.equal(got, brute_force_cross(text_len, spans, d_m, video_masks, parts)), (trial, spans, parts)


def test_cross_attention_refuses_parts_and_closed_context_it_cannot_have():
    from fleximmt.method.masks import check_cross_parts

    for part in ("m2m", "t2t", "t2m"):
        with pytest.raises(ValueError, match=f"'{part}'.*do not exist"):
            check_cross_parts(("m2v", part))
    with pytest.raises(ValueError, match="context_text='closed' is not possible"):
        check_cross_parts(("m2v", "t2v"), "closed")
