"""The two attention forms' fast mask kernels against the dense reference, values and gradients, on
random layouts (no model): joint (CogVideoX) and cross (Wan); the kernels' registry and its constraints."""

import random

import pytest
import torch

from fleximmt.method import attention
from fleximmt.method.kernels import MASK_KERNELS, Mdma, check, grouped, mask_kernel
from fleximmt.method.kernels.grouped import GroupedJoint, chain_order
from fleximmt.method.masks import CROSS_PARTS, PARTS, span_membership


def layout(form, member, d_m, video_masks, parts, context="open", kernel="auto", text_valid=None, pad_queries=False):
    """``kernel``'s layout of one video's MDMA for attention form ``form``."""
    mdma = Mdma(member, d_m, video_masks, frozenset(parts), context, text_valid)
    return mask_kernel(kernel).layout(form, mdma, pad_queries=pad_queries)


def layout_inputs(rng: random.Random, num_objects: int, text_len=7, d_m=3, num_video=40):
    spans = []
    for _ in range(num_objects):
        size = rng.randint(1, 2)
        start = rng.randint(0, text_len - size)
        spans.append(list(range(start, start + size)))
    member = span_membership(text_len, spans)
    video_masks = torch.tensor([[rng.random() < 0.4 for _ in range(num_video)] for _ in range(num_objects)])
    return member, d_m, video_masks


def tensors(batch, heads, lengths, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64).requires_grad_(True) for n in lengths]


def padded_on_this_device(monkeypatch, bucket: int) -> None:
    """Pad the group queries of DMEM's per-block layouts to ``bucket`` here as on CUDA (where cuDNN
    plans are per shape)."""
    monkeypatch.setitem(grouped.QUERY_BUCKETS, "cpu", bucket)


def assert_padded(layout, bucket: int, num_video: int) -> None:
    for group in layout.groups:
        assert group.count == group.queries.numel() == num_video or group.queries.numel() % bucket == 0
        assert group.queries[group.count :].eq(group.queries[0]).all()  # padded with a real query
    if isinstance(layout, GroupedJoint):
        assert layout.masked_queries.numel() % bucket == 0
        assert layout.masked_rows.shape[0] - layout.member.shape[1] == layout.masked_queries.numel()


@pytest.mark.parametrize("bucket", [1, 7])
@pytest.mark.parametrize("num_objects", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_joint_auto_equals_dense_in_values_and_gradients(num_objects, seed, bucket, monkeypatch):
    padded_on_this_device(monkeypatch, bucket)
    rng = random.Random(seed * 10 + num_objects)
    member, d_m, video_masks = layout_inputs(rng, num_objects)
    parts = frozenset(rng.sample(PARTS, rng.randint(2, len(PARTS))))
    text_len, num_video, m_len = member.shape[1], video_masks.shape[1], num_objects * d_m
    outs, grads = [], []
    for backend in ("auto", "dense"):
        joint = layout("joint", member, d_m, video_masks, parts, "open", backend, pad_queries=True)
        if backend == "auto":
            assert_padded(joint, bucket, num_video)
        q, k, v, mq, mk, mv = tensors(2, 2, [text_len + num_video] * 3 + [m_len] * 3, seed=seed)
        out = joint.attend(q, k, v, mq, mk, mv, text_len)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v, mk, mv)])
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    for auto, dense in zip(*grads):
        assert torch.allclose(auto, dense, atol=1e-9)


@pytest.mark.parametrize("backend", ["auto", "dense"])
@pytest.mark.parametrize("seed", range(3))
def test_video_first_tokens_give_the_same_attention(backend, seed):
    """A processor that lays its tokens out ``[video | text | motion]`` (what CogVideoX's does) gets,
    from either backend, the dense reference's outputs and gradients in that order, stored as
    ``[B, N, H, d]``; the auto backend rewrites only the text and motion rows of keys and values."""
    rng = random.Random(200 + seed)
    member, d_m, video_masks = layout_inputs(rng, 3)
    text_len, num_video, m_len = member.shape[1], video_masks.shape[1], 3 * d_m
    reference = layout("joint", member, d_m, video_masks, PARTS, "open", "dense")
    q, k, v, mq, mk, mv = tensors(2, 2, [text_len + num_video] * 3 + [m_len] * 3, seed=seed)
    expected = reference.attend(q, k, v, mq, mk, mv, text_len)
    expected.pow(2).sum().backward()
    want = [t.grad.clone() for t in (q, k, v, mk, mv)]

    def first(x, m):  # [text | video] and motion -> [video | text | motion]
        return torch.cat([x[:, :, text_len:], x[:, :, :text_len], m], dim=2)

    qs, ks, vs, mqs, mks, mvs = (t.detach().clone().requires_grad_(True) for t in (q, k, v, mq, mk, mv))
    keys, values = first(ks, mks), first(vs, mvs)
    video_keys = keys[:, :, :num_video].detach().clone()
    joint = layout("joint", member, d_m, video_masks, PARTS, "open", backend)
    out = joint.attend_video_first(first(qs, mqs), keys, values, text_len)
    assert out.shape == (2, 2, num_video + text_len, 8) and out.transpose(1, 2).is_contiguous()
    assert torch.equal(keys[:, :, :num_video], video_keys)
    assert torch.allclose(out, torch.cat([expected[:, :, text_len:], expected[:, :, :text_len]], dim=2), atol=1e-10)
    out.pow(2).sum().backward()
    for got, ref in zip((qs.grad, ks.grad, vs.grad, mks.grad, mvs.grad), want):
        assert torch.allclose(got, ref, atol=1e-9)


def test_training_layouts_read_slices_of_one_key_buffer():
    # one object (training): inside the object reads text + motion, outside text only - nested sets,
    # so every group reads a prefix of the buffer and nothing is copied per group under autograd
    member = span_membership(6, [[2, 3]])
    masks = torch.zeros(1, 60, dtype=torch.bool)
    masks[0, 10:40] = True
    joint = layout("joint", member, 4, masks, {"m2v", "m2m", "t2m"}, "open")
    assert joint.groups and all(g.chained for g in joint.groups)


def test_chain_order_puts_nested_key_sets_first():
    sets = [(0, 1, 2, 5), (0, 1), (0, 1, 3), (0,)]
    order, chained = chain_order(sets, 6)
    assert sorted(order) == list(range(6))
    assert chained[1] and chained[3] and sum(chained) == 3  # (0, 1, 2, 5) and (0, 1, 3) cannot both be
    for keys, is_prefix in zip(sets, chained):
        assert (set(order[: len(keys)]) == set(keys)) == is_prefix


@pytest.mark.parametrize("bucket", [1, 7])
@pytest.mark.parametrize("num_objects", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_cross_auto_equals_dense_in_values_and_gradients(num_objects, seed, bucket, monkeypatch):
    padded_on_this_device(monkeypatch, bucket)
    rng = random.Random(100 + seed * 10 + num_objects)
    member, d_m, video_masks = layout_inputs(rng, num_objects)
    parts = frozenset(rng.sample(CROSS_PARTS, rng.randint(0, 2)))
    text_len, num_video, m_len = member.shape[1], video_masks.shape[1], num_objects * d_m
    outs, grads = [], []
    for backend in ("auto", "dense"):
        cross = layout("cross", member, d_m, video_masks, parts, "open", backend, pad_queries=True)
        if backend == "auto":
            assert_padded(cross, bucket, num_video)
        q, k, v, mk, mv = tensors(2, 2, [num_video, text_len, text_len, m_len, m_len], seed=seed)
        out = cross.attend(q, k, v, mk, mv)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v, mk, mv)])
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    for auto, dense in zip(*grads):
        assert torch.allclose(auto, dense, atol=1e-9)


def test_only_layouts_built_in_every_block_are_padded(monkeypatch):
    """DMEM's layouts (new group sizes in every block) are padded where cuDNN builds plans per shape;
    a step's layout (RMPM's: one shape for all blocks) is not: padding only costs time there."""
    from fleximmt.method.attention import motion_state_for

    padded_on_this_device(monkeypatch, 7)
    rng = random.Random(5)
    member, d_m, video_masks = layout_inputs(rng, 2)
    tokens = torch.randn(2, 1, 1, d_m, 16)
    step = motion_state_for(tokens, member)
    step.set_video_masks(video_masks)
    assert all(g.queries.numel() == g.count for g in step.layouts.step_layouts[0].groups)
    dmem = motion_state_for(tokens, member, dmem=True, concept_member=member, num_frames=1)
    q, k, v = tensors(1, 2, [video_masks.shape[1] + member.shape[1] + 2 * d_m] * 3)
    dmem.joint_attention(0, q, k.detach().clone(), v.detach().clone(), member.shape[1])
    built = dmem.layouts.dmem_layouts[(0, 0)]
    assert all(g.queries.numel() % 7 == 0 or g.count == video_masks.shape[1] for g in built.groups)
    assert any(g.queries.numel() > g.count for g in built.groups) or built.masked_queries.numel() > built.num_merged


@pytest.mark.parametrize("seed", range(3))
def test_flex_equals_dense_in_values(seed):
    """The "flex" backend (one FlexAttention call, a block mask over token classes) against the dense
    reference, joint and cross form, random parts and masks; float32, compiled as torch runs it (on a
    CPU: inference only). Three objects in every case: one compiled shape per form."""
    rng = random.Random(300 + seed)
    member, d_m, video_masks = layout_inputs(rng, 3)
    text_len, num_video, m_len = member.shape[1], video_masks.shape[1], 3 * d_m
    parts = frozenset(rng.sample(PARTS, rng.randint(2, len(PARTS))))
    context = rng.choice(["open", "closed"])
    q, k, v, mq, mk, mv = (
        t.detach().float() for t in tensors(2, 2, [text_len + num_video] * 3 + [m_len] * 3, seed=seed)
    )
    with torch.no_grad():
        flex, dense = (
            layout("joint", member, d_m, video_masks, parts, context, b).attend(q, k, v, mq, mk, mv, text_len)
            for b in ("flex", "dense")
        )
        assert ((flex - dense).norm() / dense.norm()).item() < 1e-4
        cross_parts = frozenset(rng.sample(CROSS_PARTS, rng.randint(1, 2)))
        qv, kt, vt = (t.detach().float() for t in tensors(2, 2, [num_video, text_len, text_len], seed=seed + 1))
        flex, dense = (
            layout("cross", member, d_m, video_masks, cross_parts, "open", b).attend(qv, kt, vt, mk, mv)
            for b in ("flex", "dense")
        )
        assert ((flex - dense).norm() / dense.norm()).item() < 1e-4


def test_flex_refuses_gradients_on_a_cpu_before_it_attends():
    """The flex kernel's constraint, checked where the state attends: gradients flowing on a CPU (the motion
    tokens' in training, or the inputs') are refused naming the fix; without gradients it runs."""
    from fleximmt.method.attention import motion_state_for

    member, d_m, video_masks = layout_inputs(random.Random(5), 3)
    tokens = torch.randn(3, 1, 1, d_m, 16, requires_grad=True)
    state = motion_state_for(tokens, member, form="cross", parts=frozenset(CROSS_PARTS), mask_kernel="flex")
    state.set_video_masks(video_masks)
    qv, kt, vt = (t.detach().float() for t in tensors(1, 2, [video_masks.shape[1], 7, 7]))
    project = lambda x, kind: x.reshape(1, -1, 2, 8).transpose(1, 2).float()  # [n, 16] -> [1, H, n, d]
    with pytest.raises(ValueError, match=r"mask_kernel='flex' has no backward on a CPU .* train with 'auto'"):
        state.cross_attention(0, 0, qv, kt, vt, project)
    with torch.no_grad():
        assert state.cross_attention(0, 0, qv, kt, vt, project).shape == qv.shape


def test_every_kernel_is_registered_once_with_its_layouts_and_constraints():
    """The kernels' registry: "auto" first (the default), each with a layout per attention form; an unknown
    name is refused with the choices; flex's constraint says where it cannot run, the others run anywhere."""
    assert MASK_KERNELS == ("auto", "dense", "flex")
    for name in MASK_KERNELS:
        kernel = mask_kernel(name)
        assert kernel.name == name and callable(kernel.joint) and callable(kernel.cross)
    assert mask_kernel("auto").opaque_when_compiled and not mask_kernel("flex").opaque_when_compiled
    with pytest.raises(ValueError, match=r"mask_kernel='flash': choose from \['auto', 'dense', 'flex'\]"):
        mask_kernel("flash")
    for name in ("auto", "dense"):
        check(mask_kernel(name), torch.device("cpu"), grad=True)
    check(mask_kernel("flex"), torch.device("cpu"), grad=False)
    check(mask_kernel("flex"), torch.device("cuda"), grad=True)
    with pytest.raises(ValueError, match="no backward on a CPU"):
        check(mask_kernel("flex"), torch.device("cpu"), grad=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on a GPU only")
@pytest.mark.parametrize("seed", range(2))
def test_flex_equals_dense_in_gradients_on_a_gpu(seed):
    rng = random.Random(400 + seed)
    member, d_m, video_masks = layout_inputs(rng, 3)
    member, video_masks = member.cuda(), video_masks.cuda()
    text_len, num_video, m_len = member.shape[1], video_masks.shape[1], 3 * d_m
    grads = []
    for backend in ("flex", "dense"):
        q, k, v, mq, mk, mv = (
            t.detach().float().cuda().requires_grad_(True)
            for t in tensors(2, 2, [text_len + num_video] * 3 + [m_len] * 3, seed=seed)
        )
        out = layout("joint", member, d_m, video_masks, PARTS, "open", backend).attend(q, k, v, mq, mk, mv, text_len)
        out.pow(2).sum().backward()
        grads.append([t.grad for t in (q, k, v, mk, mv)])
    for flex, dense in zip(*grads):
        assert ((flex - dense).norm() / dense.norm()).item() < 1e-4


# -- padded text keys (HunyuanVideo 1.5's text; docs/method.md#hunyuanvideo-15) ------------------------------------
def cross_brute_force(member, owner, video_masks, valid):
    """Which text and motion keys each video query reads, pair by pair (docs/method.md#wan, docs/method.md#hunyuanvideo-15):
    a padded key never; a motion word only of the query's objects; context words always; motion tokens
    only of its objects; a query left with nothing reads the whole valid text."""
    _K, L = member.shape
    out = torch.zeros(video_masks.shape[1], L + owner.shape[1], dtype=torch.bool)
    for v in range(video_masks.shape[1]):
        mine = set(video_masks[:, v].nonzero().flatten().tolist())
        for y in range(L):
            words = set(member[:, y].nonzero().flatten().tolist())
            out[v, y] = bool(valid[y]) and (not words or bool(words & mine))
        for j in range(owner.shape[1]):
            out[v, L + j] = bool(set(owner[:, j].nonzero().flatten().tolist()) & mine)
        if not out[v].any():
            out[v, :L] = valid
    return out


@pytest.mark.parametrize("seed", range(3))
def test_cross_layouts_with_padded_text_equal_a_brute_force_and_auto_equals_dense(seed):
    rng = random.Random(seed)
    member, d_m, video_masks = layout_inputs(rng, 2, text_len=9)
    valid = torch.arange(9) < 6 + seed  # the last 3 - seed text keys are padding
    member &= valid
    owner = torch.arange(2 * d_m)[None] // d_m == torch.arange(2)[:, None]
    dense = layout("cross", member, d_m, video_masks, CROSS_PARTS, kernel="dense", text_valid=valid)
    assert torch.equal(dense.dense, cross_brute_force(member, owner, video_masks, valid))
    auto = layout("cross", member, d_m, video_masks, CROSS_PARTS, kernel="auto", text_valid=valid)
    q, k, v, mk, mv = tensors(2, 2, [40, 9, 9, 2 * d_m, 2 * d_m], seed=seed)
    expected = dense.attend(q, k, v, mk, mv)
    assert torch.allclose(auto.attend(q, k, v, mk, mv), expected, atol=1e-10)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, ~valid], v2[:, :, ~valid] = 7.0, -7.0  # padded keys: nothing moves
    assert torch.allclose(auto.attend(q, k2, v2, mk, mv), expected, atol=1e-10)


def test_text_keys_place_motion_words_after_other_context_and_never_in_padding():
    member = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    placed, valid = attention.TextKeys(offset=3, valid=7).place(member, 9)
    assert placed.int().tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]  # object 2's word: padding
    assert valid.tolist() == [True] * 7 + [False] * 2
    assert attention.TextKeys().place(member, 5)[1] is None


# -- the state's parts ----------------------------------------------------------------------------------------
def test_batch_rows_say_which_video_each_row_is_and_which_rows_feed_rmpm():
    from fleximmt.method.rows import BatchRows

    cfg = BatchRows([0, 1, 0, 1], [2, 3])  # two videos in one forward with CFG: [uncond | cond]
    assert cfg.conditional_halves() and cfg.videos(4) == [0, 1, 0, 1]
    assert cfg.of_batch(2) == ([0, 1], [0, 1])  # the conditional half alone (FasterCache): one row per video
    sets = cfg.sets(4, None, torch.device("cpu"))
    assert [(video, text, rows.tolist()) for video, text, rows in sets] == [(0, None, [0, 2]), (1, None, [1, 3])]
    assert cfg.feature_row_within(1, 2) == 1  # video 1's rows 1 and 3: its conditional row is the second
    with pytest.raises(ValueError, match="4 batch rows declared, the transformer got 3"):
        cfg.videos(3)
    split = BatchRows([0], [0], first_forward_only=True)  # each branch its own forward, the conditional first
    seen = []
    for _ in range(2):
        split.begin_step()
        for _ in range(2):
            split.begin_forward()
            seen.append(split.feature_rows)
    assert seen == [[0], None, [0], None] and not split.conditional_halves()
    driver = BatchRows(first_forward_only=True)  # rows given forward by forward
    driver.begin_step()
    driver.begin_forward([0, 0], [1])
    assert (driver.rows, driver.feature_rows) == ([0, 0], [1])
    driver.begin_forward([0], [0])
    assert (driver.rows, driver.feature_rows) == ([0], None)


def test_feature_capture_means_every_feature_block_or_says_it_is_partial():
    from fleximmt.method.capture import FeatureCapture

    capture = FeatureCapture(2, frozenset({0, 1}))
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # [B, N_v, D]: video v in row 1 - v
    capture.add(0, features, [1, 0])
    assert not capture.complete(0)  # block 1 has not given its features yet
    capture.add(1, features * 3, [1, 0])
    assert capture.complete(0) and capture.complete(1)
    assert torch.equal(capture.take(0), features[1] * 2) and torch.equal(capture.take(1), features[0] * 2)
    assert capture.take(0) is None and not capture.complete(0)  # taken: the next step starts empty
    capture.stop()
    assert capture.blocks == frozenset()
