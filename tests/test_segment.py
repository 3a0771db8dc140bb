"""Segmentation: the real loading code on tiny random models saved to disk and loaded back from
there (their outputs mean nothing, so shapes, dtypes and what flows between the stages are what is
checked), the offline optical-flow propagation on a synthetic video, and the PNG mask files."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from helpers import break_torchvision, forget_torchvision

from fleximmt.evaluation import segment

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None  # SAM 2's processors need it


def random_image(seed=0, height=48, width=80):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def gdino(tmp_path_factory):
    """A tiny random Grounding-DINO (Swin backbone, BERT text encoder) and its processor, saved to disk."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    root = tmp_path_factory.mktemp("gdino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "tiger", "man", "a", "dog", "red", "ball"]
    (root / "vocab.txt").write_text("\n".join(words))
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(
        GroundingDinoConfig(
            backbone_config=SwinConfig(
                image_size=64,
                patch_size=4,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[1, 1],
                window_size=2,
                out_features=["stage1", "stage2"],
            ),
            text_config=BertConfig(
                vocab_size=len(words),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
            ),
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_queries=10,
            num_feature_levels=2,
            encoder_n_points=2,
            decoder_n_points=2,
            max_text_len=16,
            use_timm_backbone=False,
            backbone=None,
            use_pretrained_backbone=False,
        )
    )
    model.save_pretrained(root / "model")
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}),
        tokenizer=BertTokenizer(str(root / "vocab.txt")),
    ).save_pretrained(root / "model")
    return str(root / "model")


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    """A tiny random SAM (64-pixel ViT, 16-channel neck) and its processor, saved to disk."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam import SamImageProcessorPil
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    path = tmp_path_factory.mktemp("sam") / "model"
    torch.manual_seed(0)
    SamModel(
        SamConfig(
            vision_config=SamVisionConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=64,
                patch_size=16,
                output_channels=16,
                mlp_dim=64,
                window_size=2,
                global_attn_indexes=[1],
                num_pos_feats=8,
            ),
            prompt_encoder_config=SamPromptEncoderConfig(
                hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4
            ),
            mask_decoder_config=SamMaskDecoderConfig(
                hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
            ),
        )
    ).save_pretrained(path)
    SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sam2(tmp_path_factory):
    """A tiny random SAM 2 video model saved to disk (with its processor where torchvision is installed).
    Its hidden size must be a multiple of 64 above 64: transformers fixes the memory width at 64."""
    from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VideoModel, Sam2VisionConfig
    from transformers.models.sam2_video.configuration_sam2_video import (
        Sam2VideoMaskDecoderConfig,
        Sam2VideoPromptEncoderConfig,
    )

    path = tmp_path_factory.mktemp("sam2") / "model"
    torch.manual_seed(0)
    hiera = Sam2HieraDetConfig(  # 64-pixel input; a global-attention block must not be a pooling one
        hidden_size=8,
        image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 2],
        global_attention_blocks=[3],
    )
    Sam2VideoModel(
        Sam2VideoConfig(
            vision_config=Sam2VisionConfig(
                backbone_config=hiera,
                backbone_channel_list=[64, 32, 16, 8],
                backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
                fpn_hidden_size=128,
            ),
            prompt_encoder_config=Sam2VideoPromptEncoderConfig(
                hidden_size=128, image_size=64, patch_size=16, mask_input_channels=4
            ),
            mask_decoder_config=Sam2VideoMaskDecoderConfig(
                hidden_size=128, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16
            ),
            image_size=64,
            num_maskmem=2,
            memory_attention_hidden_size=128,
            memory_attention_num_layers=1,
            memory_attention_feed_forward_hidden_size=32,
            memory_attention_rope_feat_sizes=[4, 4],
            memory_encoder_hidden_size=128,
            memory_encoder_output_channels=64,
            mask_downsampler_embed_dim=128,
            memory_fuser_embed_dim=128,
            memory_fuser_intermediate_dim=32,
        )
    ).save_pretrained(path)
    if HAS_TORCHVISION:
        from transformers import Sam2ImageProcessor, Sam2VideoProcessor, Sam2VideoVideoProcessor

        Sam2VideoProcessor(
            image_processor=Sam2ImageProcessor(size={"height": 64, "width": 64}, mask_size={"height": 16, "width": 16}),
            video_processor=Sam2VideoVideoProcessor(size={"height": 64, "width": 64}),
        ).save_pretrained(path)
    else:  # the processor file such a checkpoint has, written by hand
        size, mask_size = {"height": 64, "width": 64}, {"height": 16, "width": 16}
        (path / "processor_config.json").write_text(
            json.dumps(
                {
                    "processor_class": "Sam2VideoProcessor",
                    "target_size": 64,
                    "point_pad_value": -10,
                    "image_processor": {
                        "image_processor_type": "Sam2ImageProcessor",
                        "size": size,
                        "mask_size": mask_size,
                    },
                    "video_processor": {"video_processor_type": "Sam2VideoVideoProcessor", "size": size},
                }
            )
        )
    return str(path)


# ------------------------------------------------------------------------------------------- Grounding-DINO + SAM


def test_detect_boxes_loads_grounding_dino_from_disk_and_returns_one_box_per_phrase_inside_the_image(gdino):
    boxes = segment.detect_boxes(
        random_image(), ["tiger", "red ball"], detector=gdino, box_threshold=0.0, text_threshold=0.0
    )
    assert len(boxes) == 2
    assert all(len(b) == 4 and 0 <= b[0] <= b[2] <= 80 and 0 <= b[1] <= b[3] <= 48 for b in boxes)


def test_detect_boxes_keeps_the_highest_scoring_box_clipped_to_the_image(gdino, monkeypatch):
    from transformers import GroundingDinoProcessor

    def detections(self, outputs, input_ids=None, threshold=0.25, text_threshold=0.25, target_sizes=None, **kw):
        return [
            {
                "scores": torch.tensor([0.4, 0.9, 0.5]),
                "boxes": torch.tensor([[1.0, 1, 5, 5], [-3.0, 10, 30, 60], [2.0, 2, 8, 8]]),
            }
        ]

    monkeypatch.setattr(GroundingDinoProcessor, "post_process_grounded_object_detection", detections)
    assert segment.detect_boxes(random_image(), ["tiger"], detector=gdino) == [[0.0, 10.0, 30.0, 48.0]]


def test_masks_from_words_gives_sam_the_detectors_box_for_each_word(gdino, sam, monkeypatch):
    from transformers import SamProcessor

    image = random_image()
    boxes = segment.detect_boxes(image, ["tiger", "man"], detector=gdino, box_threshold=0.0, text_threshold=0.0)
    given = []
    real_call = SamProcessor.__call__

    def spy(self, *args, **kwargs):
        given.append(kwargs.get("input_boxes"))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(SamProcessor, "__call__", spy)
    masks = segment.masks_from_words(
        image, ["tiger", "man"], detector=gdino, segmenter=sam, box_threshold=0.0, text_threshold=0.0
    )
    assert masks.shape == (2, 48, 80) and masks.dtype == torch.bool
    assert given == [[boxes]]


def test_sam_keeps_its_best_scoring_mask_of_three(sam):
    from transformers import SamProcessor

    processor = SamProcessor.from_pretrained(sam)
    proposals = torch.full((1, 2, 3, 16, 16), -1.0)  # per box: three low-resolution mask logits
    proposals[0, 0, 1, :8] = 1.0  # box 0, proposal 1: top half
    proposals[0, 1, 2, :, :8] = 1.0  # box 1, proposal 2: left half

    class ThreeProposals(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **inputs):
            iou_scores = torch.tensor([[[0.1, 0.8, 0.3], [0.2, 0.1, 0.9]]])
            return type("Out", (), {"pred_masks": proposals, "iou_scores": iou_scores})

    masks = segment.masks_from_points(
        random_image(height=64, width=64),
        boxes=[[0, 0, 10, 10], [5, 5, 20, 20]],
        segmenter=(ThreeProposals(), processor),
    )
    expected = torch.zeros(2, 64, 64, dtype=torch.bool)
    expected[0, :32], expected[1, :, :32] = True, True
    assert torch.equal(masks, expected)


def test_masks_from_points_takes_clicks_or_boxes_or_a_box_with_clicks(sam):
    image = random_image(1)
    boxes = segment.masks_from_points(image, boxes=[[5, 5, 30, 30], [40, 10, 70, 40]], segmenter=sam)
    assert boxes.shape == (2, 48, 80)
    clicks = segment.masks_from_points(image, points=[[10, 10], [20, 12]], labels=[1, 0], segmenter=sam)
    assert clicks.shape == (1, 48, 80)
    both = segment.masks_from_points(image, points=[[10, 10]], boxes=[[5, 5, 30, 30]], segmenter=sam)
    assert both.shape == (1, 48, 80) and both.dtype == torch.bool


def test_a_word_not_found_names_the_word_and_the_fixes(gdino):
    with pytest.raises(ValueError, match=r"no 'dog' found.*box_threshold.*mask as a PNG"):
        segment.detect_boxes(random_image(), ["dog"], detector=gdino, box_threshold=1.01)


@pytest.mark.parametrize(
    ("words", "message"),
    [([], "at least one phrase"), ("tiger", r"list of phrases.*\['tiger'\]"), (["tiger", " "], "non-empty")],
)
def test_bad_word_lists_are_refused_before_loading_a_model(words, message):
    with pytest.raises(ValueError, match=message):
        segment.masks_from_words(random_image(), words, detector="/nonexistent/gdino", segmenter="/nonexistent/sam")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "points .* or boxes"),
        ({"points": [[1, 2, 3]]}, r"a point is \[x, y\]"),
        ({"boxes": [[30, 5, 10, 20]]}, "x0 <= x1"),
        ({"points": [[1, 2]], "boxes": [[0, 0, 5, 5], [1, 1, 9, 9]]}, "at most one box"),
        ({"points": [[1, 2]], "labels": [1, 1]}, "one per point"),
        ({"points": [[1, 2]], "labels": [2]}, "1 .object. or 0"),
        ({"points": [[500, 2]]}, "outside the 80x48 image"),
    ],
)
def test_bad_sam_prompts_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        segment.masks_from_points(random_image(), segmenter="/nonexistent/sam", **kwargs)


def test_bad_images_and_missing_models_name_the_fix(sam, tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\].*float64"):
        segment.masks_from_points(np.zeros((8, 8, 3)), boxes=[[0, 0, 4, 4]], segmenter=sam)
    with pytest.raises(ValueError, match="does not exist"):
        segment.masks_from_points(tmp_path / "missing.png", boxes=[[0, 0, 4, 4]], segmenter=sam)
    with pytest.raises(ValueError, match=r"model folder '/nonexistent/sam' does not exist.*PNG"):
        segment.masks_from_points(random_image(), boxes=[[1, 1, 4, 4]], segmenter="/nonexistent/sam")
    with pytest.raises(ValueError, match=r"could not load 'nobody/no-such-sam'.*local folder"):
        segment.masks_from_points(random_image(), boxes=[[1, 1, 4, 4]], segmenter="nobody/no-such-sam")  # offline
    with pytest.raises(ValueError, match=r"could not load .*local folder"):
        segment.masks_from_points(random_image(), boxes=[[1, 1, 4, 4]], segmenter=tmp_path)  # an empty folder
    with pytest.raises(ValueError, match=r"\(model, processor\) pair"):
        segment.masks_from_points(random_image(), boxes=[[1, 1, 4, 4]], segmenter=(1, 2, 3))


# ------------------------------------------------------------------------------------------- propagation


def moving_square(frames=8, size=64):
    """A textured 16 x 16 square moving right 2 px per frame over a textured background, and its true masks."""
    rng = np.random.RandomState(0)
    background = (rng.rand(size, size, 3) * 80 + 40).astype(np.uint8)
    texture = (rng.rand(16, 16, 3) * 200 + 40).astype(np.uint8)
    video = np.repeat(background[None], frames, 0)
    truth = np.zeros((frames, size, size), bool)
    for t in range(frames):
        video[t, 20:36, 10 + 2 * t : 26 + 2 * t] = texture
        truth[t, 20:36, 10 + 2 * t : 26 + 2 * t] = True
    return video, truth


def test_flow_propagation_follows_a_moving_square():
    video, truth = moving_square()
    masks = segment.propagate_masks(video, truth[0][None], method="flow")
    assert masks.shape == (1, 8, 64, 64) and masks.dtype == torch.bool
    for t in range(8):
        iou = (masks[0, t].numpy() & truth[t]).sum() / (masks[0, t].numpy() | truth[t]).sum()
        assert iou > 0.7, (t, iou)


def test_flow_propagation_does_not_drag_a_tail_over_the_uncovered_background():
    video, truth = moving_square(frames=16)  # the square ends 30 px right of where it started
    masks = segment.propagate_masks(video, truth[0], method="flow")[0].numpy()
    assert abs(masks[-1].sum() / truth[-1].sum() - 1) < 0.15  # the square keeps its size
    assert (masks[-1] & truth[-1]).sum() / (masks[-1] | truth[-1]).sum() > 0.8


def test_flow_propagation_carries_each_object_separately_and_accepts_a_single_mask():
    video, truth = moving_square()
    still = np.zeros((64, 64), bool)
    still[45:60, 45:60] = True  # a patch of background that does not move
    masks = segment.propagate_masks(video, np.stack([truth[0], still]), method="flow")
    assert masks.shape == (2, 8, 64, 64)
    assert (masks[1, -1].numpy() & still).sum() / (masks[1, -1].numpy() | still).sum() > 0.7
    assert segment.propagate_masks(video, truth[0].astype(np.uint8), method="flow").shape == (1, 8, 64, 64)


@pytest.mark.parametrize(
    ("frames", "masks", "message"),
    [
        (np.zeros((4, 64, 64, 3), np.float32), np.zeros((1, 64, 64), bool), r"uint8 \[T, H, W, 3\]"),
        (np.zeros((4, 64, 64), np.uint8), np.zeros((1, 64, 64), bool), r"uint8 \[T, H, W, 3\]"),
        (np.zeros((4, 64, 64, 3), np.uint8), np.zeros((1, 32, 32), bool), "do not match"),
        (np.zeros((4, 64, 64, 3), np.uint8), np.full((1, 64, 64), 255, np.uint8), "boolean .or 0/1.*mask > 127"),
        (np.zeros((4, 64, 64, 3), np.uint8), np.zeros((0, 64, 64), bool), r"\[K, H, W\]"),
    ],
)
def test_bad_videos_and_masks_name_the_problem(frames, masks, message):
    with pytest.raises(ValueError, match=message):
        segment.propagate_masks(frames, masks, method="flow")


def test_an_unknown_propagation_method_names_the_choices():
    video, truth = moving_square(frames=2)
    with pytest.raises(ValueError, match=r"choose 'sam2'.*'flow'"):
        segment.propagate_masks(video, truth[0], method="optical")


class StandInVideoProcessor:
    """Resize to 64 x 64 and normalise, as Sam2VideoVideoProcessor does, without torchvision."""

    def __call__(self, videos, device=None, return_tensors=None):
        video = torch.from_numpy(np.asarray(videos)).permute(0, 3, 1, 2).float() / 255
        pixels = torch.nn.functional.interpolate(video, (64, 64), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        pixels = ((pixels - mean) / std)[None]  # one video [1, T, 3, 64, 64]
        return type("Batch", (), {"pixel_values_videos": pixels, "original_sizes": [video.shape[-2:]]})


class StandInImageProcessor:
    def post_process_masks(self, masks, original_sizes, mask_threshold=0.0, binarize=True, *args, **kwargs):
        return [
            torch.nn.functional.interpolate(m.float(), tuple(s), mode="bilinear") > mask_threshold
            for m, s in zip(masks, original_sizes)
        ]


def test_sam2_propagation_runs_the_video_model_loaded_from_disk(sam2):
    """The real SAM 2 model and the real session / prompt code of Sam2VideoProcessor; only the
    pixel pre- and post-processing, which need torchvision, are stood in for."""
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    processor = object.__new__(Sam2VideoProcessor)
    processor.video_processor, processor.image_processor = StandInVideoProcessor(), StandInImageProcessor()
    processor.target_size, processor.point_pad_value = 64, -10
    model = Sam2VideoModel.from_pretrained(sam2, use_safetensors=True).eval()
    video, truth = moving_square(frames=5)
    first = np.stack([truth[0], ~truth[0]])
    masks = segment.propagate_masks(video, first, method="sam2", model=(model, processor))
    assert masks.shape == (2, 5, 64, 64) and masks.dtype == torch.bool
    assert torch.equal(masks[:, 0], torch.from_numpy(first))


def test_sam2_without_torchvision_names_the_install_and_the_offline_method(sam2, monkeypatch):
    video, truth = moving_square(frames=2)
    forget_torchvision(monkeypatch)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it now fails, installed or not
    with pytest.raises(ValueError, match=r"not installed.*fleximmt\[vision\].*method='flow'"):
        segment.propagate_masks(video, truth[0], model=sam2)
    monkeypatch.delitem(sys.modules, "torchvision")
    break_torchvision(monkeypatch)
    with pytest.raises(
        ValueError, match=r"does not load next to this torch \(operator torchvision::nms.*method='flow'"
    ):
        segment.propagate_masks(video, truth[0], model=sam2)


# SAM 2 with its real processors: they need torchvision, so `make test-vision` runs these (tests/conftest.py).


@pytest.mark.vision
def test_sam2_propagation_loads_model_and_processor_from_a_folder(sam2):
    """The real model and processors on a video that is not square (SAM 2 resizes it to 64 x 64):
    masks come back at the video's size, one per object, frame 0 as given, the same on a second run
    (the random weights say nothing about where the objects go)."""
    video, truth = moving_square(frames=4)
    first = np.stack([truth[0, :40], ~truth[0, :40]])
    masks = segment.propagate_masks(video[:, :40], first, model=sam2)
    assert masks.shape == (2, 4, 40, 64) and masks.dtype == torch.bool
    assert torch.equal(masks[:, 0], torch.from_numpy(first))
    assert torch.equal(segment.propagate_masks(video[:, :40], first, model=sam2), masks)


@pytest.mark.vision
@pytest.mark.parametrize("height", [64, 40])
def test_sam2_real_processors_do_what_the_stand_ins_assume(sam2, height):
    """What test_sam2_propagation_runs_the_video_model_loaded_from_disk assumes without torchvision:
    frames resized to 64 x 64 and ImageNet-normalised, mask logits resized back and cut at 0."""
    from transformers import Sam2VideoProcessor

    processor = Sam2VideoProcessor.from_pretrained(sam2)
    video = moving_square(frames=3)[0][:, :height]
    real = processor.video_processor(videos=video, return_tensors="pt")
    stand_in = StandInVideoProcessor()(video)
    assert real.pixel_values_videos.shape == stand_in.pixel_values_videos.shape == (1, 3, 3, 64, 64)
    assert [list(s) for s in real.original_sizes] == [[height, 64]]
    tolerance = 1e-5 if height == 64 else 0.05  # resizing: torchvision's and torch's bilinear differ slightly
    torch.testing.assert_close(real.pixel_values_videos.float(), stand_in.pixel_values_videos, atol=tolerance, rtol=0)
    logits = [torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))]
    real_masks = processor.post_process_masks(logits, original_sizes=[[height, 64]])[0]
    assert torch.equal(real_masks, StandInImageProcessor().post_process_masks(logits, [[height, 64]])[0])


class KnownMasks(torch.nn.Module):
    """Stands in for Sam2VideoModel: yields, frame by frame, known low-resolution mask logits
    (``truth`` [K, T, 16, 16]: +10 inside, -10 outside), objects in reverse order."""

    def __init__(self, truth):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the session runs
        self.truth, self.sessions = truth, []

    def propagate_in_video_iterator(self, session, start_frame_idx=0):
        self.sessions.append(session)
        ids = list(session.obj_ids)[::-1]
        for t in range(start_frame_idx, self.truth.shape[1]):
            logits = torch.where(self.truth[[i - 1 for i in ids], t], 10.0, -10.0)[:, None]  # [K, 1, 16, 16]
            yield type("Step", (), {"frame_idx": t, "object_ids": ids, "pred_masks": logits})


@pytest.mark.vision
def test_sam2_propagation_carries_each_objects_masks_to_its_place_in_a_moving_square_video(sam2):
    """A SAM 2 that finds two moving squares (one going right, one going down) exactly: the real
    processors and propagate_masks' bookkeeping must give back each object's true masks in its own
    slot, at the video's size."""
    from transformers import Sam2VideoProcessor

    frames = 6
    truth = torch.zeros(2, frames, 64, 64, dtype=torch.bool)
    video = np.repeat(moving_square(frames=1)[0], frames, 0)
    texture = (np.random.RandomState(5).rand(16, 16, 3) * 200 + 40).astype(np.uint8)
    for t in range(frames):  # 4 px (one 16 x 16 logit cell) a frame
        truth[0, t, 8:24, 4 + 4 * t : 20 + 4 * t] = True
        truth[1, t, 4 + 4 * t : 20 + 4 * t, 40:56] = True
        video[t][truth[0, t].numpy()] = texture.reshape(-1, 3)
        video[t][truth[1, t].numpy()] = texture[::-1].reshape(-1, 3)
    low = torch.nn.functional.avg_pool2d(truth.float(), 4) > 0.5  # [2, T, 16, 16], exact: boxes on the 4 px grid
    model = KnownMasks(low)
    processor = Sam2VideoProcessor.from_pretrained(sam2)
    masks = segment.propagate_masks(video, truth[:, 0], model=(model, processor))
    assert masks.shape == (2, frames, 64, 64)
    assert torch.equal(masks[:, 0], truth[:, 0])
    for k in range(2):
        for t in range(1, frames):  # bilinear upsampling rounds the box's 4 corner pixels off, nothing else
            assert not (masks[k, t] & ~truth[k, t]).any() and (truth[k, t] & ~masks[k, t]).sum() <= 4, (k, t)
    session = model.sessions[0]  # each first-frame mask went in under its own object id, on frame 0
    assert session.obj_ids == [1, 2]
    for k in range(2):
        given = session.mask_inputs_per_obj[session.obj_id_to_idx(k + 1)][0]
        assert torch.equal(given[0, 0].bool(), truth[k, 0])


# ------------------------------------------------------------------------------------------- PNG files


def test_png_masks_round_trip_as_0_and_255(tmp_path):
    from PIL import Image

    _, truth = moving_square()
    paths = segment.save_mask_pngs(truth, tmp_path / "masks", prefix="object0")
    assert [p.name for p in paths] == [f"object0_{t:04d}.png" for t in range(8)]
    pixels = np.array(Image.open(paths[0]))
    assert pixels.dtype == np.uint8 and set(np.unique(pixels)) == {0, 255}
    assert torch.equal(segment.load_mask_pngs(tmp_path / "masks", "object0"), torch.from_numpy(truth))


def test_png_writes_are_atomic_and_leave_no_temporary_files(tmp_path, monkeypatch):
    from PIL import Image

    _, truth = moving_square()
    segment.save_mask_pngs(truth, tmp_path, prefix="object0")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"object0_{t:04d}.png" for t in range(8)]
    before = (tmp_path / "object0_0000.png").read_bytes()

    def half_written(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        segment.save_mask_pngs(~truth, tmp_path, prefix="object0")
    assert (tmp_path / "object0_0000.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"object0_{t:04d}.png" for t in range(8)]


def test_saving_fewer_frames_removes_the_older_extra_frames_of_that_prefix_only(tmp_path):
    _, truth = moving_square()
    segment.save_mask_pngs(truth, tmp_path, prefix="object0")
    segment.save_mask_pngs(truth, tmp_path, prefix="object1")
    segment.save_mask_pngs(truth[:3], tmp_path, prefix="object0")
    assert segment.load_mask_pngs(tmp_path, "object0").shape == (3, 64, 64)
    assert segment.load_mask_pngs(tmp_path, "object1").shape == (8, 64, 64)


def test_bad_mask_files_and_arrays_name_the_fix(tmp_path):
    _, truth = moving_square()
    with pytest.raises(ValueError, match="does not exist"):
        segment.load_mask_pngs(tmp_path / "nowhere", "object0")
    with pytest.raises(ValueError, match=r"no object0_NNNN\.png"):
        segment.load_mask_pngs(tmp_path, "object0")
    segment.save_mask_pngs(truth, tmp_path, prefix="object0")
    (tmp_path / "object0_0003.png").unlink()
    with pytest.raises(ValueError, match=r"skip frames \[3\]"):
        segment.load_mask_pngs(tmp_path, "object0")
    with pytest.raises(ValueError, match=r"\[T, H, W\]"):
        segment.save_mask_pngs(truth[0], tmp_path, prefix="object0")
    with pytest.raises(ValueError, match="boolean"):
        segment.save_mask_pngs(truth * 0.5, tmp_path, prefix="object0")
    with pytest.raises(ValueError, match="prefix"):
        segment.save_mask_pngs(truth, tmp_path, prefix="../object0")
