"""Segmentation: real loading code on tiny random models saved to disk, and the offline propagation."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from fleximmt import segment


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamModel,
        SamProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam import SamImageProcessorPil
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    sam = SamModel(SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                      patch_size=16, output_channels=16, mlp_dim=64, window_size=2,
                                      global_attn_indexes=[1], num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                                 iou_head_hidden_dim=16),
    ))  # fmt: skip
    sam.save_pretrained(root / "sam")
    SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16},
    )).save_pretrained(root / "sam")  # fmt: skip
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "tiger", "man", "a", "dog"]
    (root / "vocab.txt").write_text("\n".join(words))
    detector = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=2, out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, max_text_len=16, use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
    ))  # fmt: skip
    detector.save_pretrained(root / "gdino")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}),
                           tokenizer=BertTokenizer(str(root / "vocab.txt"))).save_pretrained(root / "gdino")  # fmt: skip
    return str(root / "gdino"), str(root / "sam")


def test_words_to_masks_loads_both_models_from_disk_and_feeds_the_box_to_sam(tiny_models, monkeypatch):
    gdino, sam = tiny_models
    image = (np.random.RandomState(0).rand(48, 80, 3) * 255).astype(np.uint8)
    boxes = segment.detect_boxes(image, ["tiger", "man"], detector=gdino, box_threshold=0.0, text_threshold=0.0)
    assert len(boxes) == 2 and all(0 <= b[0] <= b[2] <= 80 and 0 <= b[1] <= b[3] <= 48 for b in boxes)
    seen = {}
    real = segment.masks_from_points

    def spy(image, points=None, boxes=None, labels=None, segmenter=None):
        seen["boxes"] = boxes
        return real(image, points, boxes, labels, segmenter)

    monkeypatch.setattr(segment, "masks_from_points", spy)
    masks = segment.masks_from_words(image, ["tiger", "man"], detector=gdino, segmenter=sam, box_threshold=0.0,
                                     text_threshold=0.0)  # fmt: skip
    assert masks.shape == (2, 48, 80) and masks.dtype == torch.bool
    assert seen["boxes"] == boxes


def test_points_and_boxes_to_masks(tiny_models):
    _, sam = tiny_models
    image = (np.random.RandomState(1).rand(48, 80, 3) * 255).astype(np.uint8)
    assert segment.masks_from_points(image, boxes=[[5, 5, 30, 30], [40, 10, 70, 40]], segmenter=sam).shape == (2, 48, 80)
    assert segment.masks_from_points(image, points=[[10, 10], [20, 12]], labels=[1, 0], segmenter=sam).shape == (1, 48, 80)


def test_missing_detection_and_bad_input_name_the_fix(tiny_models):
    gdino, _ = tiny_models
    image = (np.random.RandomState(0).rand(48, 80, 3) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="no 'dog' found.*box_threshold"):
        segment.detect_boxes(image, ["dog"], detector=gdino, box_threshold=1.01)
    with pytest.raises(ValueError, match="at least one phrase"):
        segment.detect_boxes(image, [], detector=gdino)
    with pytest.raises(ValueError, match="points .* or boxes"):
        segment.masks_from_points(image)
    with pytest.raises(ValueError, match="could not load"):
        segment.masks_from_points(image, boxes=[[1, 1, 4, 4]], segmenter="/nonexistent/sam")


def moving_square(frames=8, size=64):
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
    assert masks.shape == (1, 8, 64, 64)
    for t in range(8):
        inter = (masks[0, t].numpy() & truth[t]).sum()
        union = (masks[0, t].numpy() | truth[t]).sum()
        assert inter / union > 0.7, t
    with pytest.raises(ValueError, match="do not match"):
        segment.propagate_masks(video, np.zeros((1, 32, 32), bool), method="flow")
    with pytest.raises(ValueError, match="choose"):
        segment.propagate_masks(video, truth[0], method="optical")


def test_png_masks_round_trip_atomically(tmp_path):
    _, truth = moving_square()
    paths = segment.save_mask_pngs(truth, tmp_path / "masks", prefix="obj0")
    assert len(paths) == 8
    assert torch.equal(segment.load_mask_pngs(tmp_path / "masks", "obj0"), torch.from_numpy(truth))
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [p.name for p in paths]  # no temporary files
