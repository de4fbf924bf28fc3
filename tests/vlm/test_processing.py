"""vlm.processing: the families' real processors (torchvision video processors, on CPU too) turn
frames + prompts into inputs the tiny real models consume, with the frame rate we sampled at.

The pixel checks pin the settings `vlm.tiny` saves (patch sizes, mean/std, sizes) and the layout
the models read, through transformers' own processors: these are what production runs.

Token counts (tiny models: patch 14, merge 2, temporal patch 2; LLaVA-OV 112 px frames, 8x8 patches):
  qwen2_5_vl       3 frames 90x120 -> 84x112, padded to 4 frames -> grid (2, 6, 8) -> 2*6*8/4 = 24 tokens
                   4 frames 112x112 -> grid (2, 8, 8) -> 32 tokens
  qwen3_vl         patch 16, sides rounded to multiples of 32: 3 frames 90x120 -> 96x128 -> grid (2, 6, 8) -> 24;
                   4 frames 112x112 -> 128x128 -> grid (2, 8, 8) -> 32, in one timestamped span per temporal patch
  llava_onevision  4 frames of any size, resized to 112x112 -> 4 * 4*4 + 1 newline = 65 tokens
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vlm import loading, tiny
from vlm.families import FAMILIES, TINY_FAMILIES
from vlm.processing import load_processor, sampled_video_metadata

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # OPENAI_CLIP, saved by tiny.build
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# (frames, height, width) per video and the placeholder tokens each must expand to (module docstring).
VIDEOS = {
    "qwen2_5_vl": ([(3, 90, 120), (4, 112, 112)], [24, 32]),
    "qwen2_vl": ([(3, 90, 120), (4, 112, 112)], [24, 32]),
    "qwen3_vl": ([(3, 90, 120), (4, 112, 112)], [24, 32]),  # sides to multiples of 32: 96x128, 128x128
    "llava_onevision": ([(4, 90, 120), (4, 112, 112)], [65, 65]),
}
QUESTIONS = ("Describe this video.", "What is happening in the video? Describe the main events in detail.")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny_processing")
    return {family: tiny.build_cached(family, root, num_layers=2) for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def processors(built: dict) -> dict:
    return {family: load_processor(path) for family, path in built.items()}


def _random_video(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    frames, height, width = shape
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def _prompt(processor, kind: str, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def _call(processor, **kwargs):
    """The pipeline's way of calling a processor: frames already sampled, padded, torch tensors."""
    return processor(**{"do_sample_frames": False, "padding": True, "return_tensors": "pt", **kwargs})


def _count(processor, inputs, token: str) -> list[int]:
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return (inputs["input_ids"] == token_id).sum(dim=1).tolist()


def _video_batch(processor, family: str, fps: list[float] | None = None):
    shapes, _ = VIDEOS[family]
    videos = [_random_video(shape, seed) for seed, shape in enumerate(shapes)]
    texts = [_prompt(processor, "video", question) for question in QUESTIONS]
    metadata = [sampled_video_metadata(shape[0], rate) for shape, rate in zip(shapes, fps)] if fps else None
    return processor(text=texts, videos=videos, video_metadata=metadata, do_sample_frames=False, padding=True,
                     return_tensors="pt")


def _generate(path, inputs) -> torch.Tensor:
    model = loading.load_model(path)
    with torch.no_grad():  # the model raises if placeholder tokens and visual features disagree
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


# --------------------------------------------------------------------------------------------- loading
def test_load_processor_is_the_real_processor_padding_left_and_says_so(built, caplog):
    with caplog.at_level(logging.INFO, logger="vlm.processing"):
        processor = load_processor(built["qwen2_5_vl"])
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"  # the torchvision one
    assert [r.getMessage() for r in caplog.records if "Qwen2_5_VLProcessor" in r.getMessage()]
    assert processor.tokenizer.padding_side == "left"


def test_llava_onevision_parts_come_from_the_saved_files(processors):
    processor = processors["llava_onevision"]
    assert processor.num_image_tokens == 64  # processor_config.json
    assert (processor.video_processor.size.height, processor.video_processor.size.width) == (112, 112)


def test_qwen_video_settings_fall_back_to_the_image_config_as_released_checkpoints_need(built, tmp_path):
    """Qwen/Qwen2.5-VL-7B-Instruct ships no video_preprocessor_config.json and bounds pixels with
    min_pixels / max_pixels in preprocessor_config.json; transformers reads the video settings from there."""
    import json
    import shutil

    path = shutil.copytree(built["qwen2_5_vl"], tmp_path / "qwen")
    saved = json.loads((path / "processor_config.json").read_text())
    image = {k: v for k, v in saved["image_processor"].items() if k != "size"}
    image |= {"min_pixels": 3136, "max_pixels": 12845056, "processor_class": saved["processor_class"]}
    (path / "preprocessor_config.json").write_text(json.dumps(image))  # the released layout
    (path / "processor_config.json").unlink()
    size = load_processor(path).video_processor.size
    assert (size.shortest_edge, size.longest_edge) == (3136, 12845056)


@pytest.mark.parametrize(("num_frames", "fps"), [(0, 2.0), (4, 0.0), (4, float("nan"))])
def test_sampled_video_metadata_refuses_what_no_video_has(num_frames, fps):
    with pytest.raises(ValueError, match="num_frames >= 1 and fps > 0"):
        sampled_video_metadata(num_frames, fps)


# --------------------------------------------------------------------------------------------- videos
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_video_batch_runs_generate_with_one_placeholder_per_feature(built, processors, family):
    processor = processors[family]
    inputs = _video_batch(processor, family, fps=[2.0, 2.0])
    assert _count(processor, inputs, FAMILIES[family].video_token) == VIDEOS[family][1]
    out = _generate(built[family], inputs)
    assert out.shape[0] == 2 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_padding_is_left_by_default_and_padding_side_is_honoured(processors, family):
    processor = processors[family]
    left = _video_batch(processor, family)
    assert left["attention_mask"][:, -1].tolist() == [1, 1]
    assert left["attention_mask"][0, 0] == 0  # the shorter prompt is padded in front
    assert (left["input_ids"][left["attention_mask"] == 0] == processor.tokenizer.pad_token_id).all()
    shapes, _ = VIDEOS[family]
    videos = [_random_video(shape, seed) for seed, shape in enumerate(shapes)]
    texts = [_prompt(processor, "video", question) for question in QUESTIONS]
    right = _call(processor, text=texts, videos=videos, padding_side="right")
    assert right["attention_mask"][:, 0].tolist() == [1, 1] and right["attention_mask"][0, -1] == 0


def test_qwen_outputs_mark_video_tokens_and_time_per_grid(processors):
    processor = processors["qwen2_5_vl"]
    inputs = _video_batch(processor, "qwen2_5_vl", fps=[2.0, 4.0])
    text_keys = {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert set(inputs) == text_keys | {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == video_id).long() * 2)
    assert inputs["second_per_grid_ts"].tolist() == [2 / 2.0, 2 / 4.0]  # temporal_patch_size / fps
    assert inputs["video_grid_thw"].tolist() == [[2, 6, 8], [2, 8, 8]]
    assert inputs["pixel_values_videos"].shape == (2 * 6 * 8 + 2 * 8 * 8, 3 * 2 * 14 * 14)
    # As the real processor: no metadata -> transformers' default 24 fps.
    assert _video_batch(processor, "qwen2_5_vl")["second_per_grid_ts"].tolist() == pytest.approx([2 / 24] * 2)


def test_llava_onevision_outputs(processors):
    inputs = _video_batch(processors["llava_onevision"], "llava_onevision")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values_videos"}
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, 112, 112)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_equal_frame_count_rule_of_the_table_is_what_the_processor_needs(processors, family):
    """workers.model_stage batches by frame count exactly for the families whose row says so."""
    processor = processors[family]
    videos = [_random_video((4, 112, 112), 0), _random_video((6, 112, 112), 1)]
    texts = [_prompt(processor, "video", question) for question in QUESTIONS]
    if FAMILIES[family].equal_frame_count:
        with pytest.raises(ValueError, match="equal size"):
            _call(processor, text=texts, videos=videos)
    else:
        assert _count(processor, _call(processor, text=texts, videos=videos), FAMILIES[family].video_token)[1] > 0


def _solid_video() -> np.ndarray:
    """2 frames 56x56: pure red, then (0, 128, 255)."""
    video = np.zeros((2, 56, 56, 3), np.uint8)
    video[0, ..., 0] = 255
    video[1] = (0, 128, 255)
    return video


def _normalized(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.array(rgb, np.float32) / 255 - MEAN) / STD


def test_qwen_pixels_of_a_solid_video_equal_the_formula(processors):
    processor = processors["qwen2_5_vl"]
    inputs = _call(processor, text=[_prompt(processor, "video", "Hi")], videos=[_solid_video()])
    assert inputs["video_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 stays 56x56: 4x4 patches, 2 frames -> t=1
    assert _count(processor, inputs, "<|video_pad|>") == [4]  # 1*4*4 / 2**2
    frames = [_normalized((255, 0, 0)), _normalized((0, 128, 255))]
    # Each patch row is channel-major, then temporal, then 14x14 pixels: [3, 2, 196] flattened.
    row = np.stack([np.stack([np.full(196, frames[t][channel]) for t in range(2)]) for channel in range(3)])
    expected = np.tile(row.reshape(-1), (16, 1))
    np.testing.assert_allclose(inputs["pixel_values_videos"].numpy(), expected, atol=1e-5)


def test_qwen_patch_order_equals_a_loop_over_merge_windows(processors):
    """56x56 is kept as is (multiple of 28), so the patches can be cut out by hand in the model's order:
    temporal group, merge-window row, merge-window column, row inside the window, column inside it."""
    processor = processors["qwen2_5_vl"]
    video = _random_video((3, 56, 56), seed=7)  # 3 frames: the last is repeated to make 4
    inputs = _call(processor, text=[_prompt(processor, "video", "Hi")], videos=[video])
    pixels = (video.astype(np.float32) / 255 - MEAN) / STD  # [T, H, W, C]
    pixels = np.concatenate([pixels, pixels[-1:]]).transpose(0, 3, 1, 2)  # [4, C, H, W]
    rows = []
    for t in range(2):
        for window_y in range(2):
            for window_x in range(2):
                for y in range(2):
                    for x in range(2):
                        top, left = (window_y * 2 + y) * 14, (window_x * 2 + x) * 14
                        patch = pixels[2 * t : 2 * t + 2, :, top : top + 14, left : left + 14]  # [2, C, 14, 14]
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    np.testing.assert_allclose(inputs["pixel_values_videos"].numpy(), np.stack(rows), atol=1e-5)


def test_qwen3_pixels_and_spans_of_a_solid_video_equal_the_formula(processors):
    """Patch 16 and mean/std 0.5; 64x64 frames are kept (multiple of 32), so 2 frames -> grid (1, 4, 4)."""
    processor = processors["qwen3_vl"]
    video = np.stack([np.pad(frame, ((0, 8), (0, 8), (0, 0)), mode="edge") for frame in _solid_video()])  # 64x64
    inputs = _call(processor, text=[_prompt(processor, "video", "Hi")], videos=[video], video_metadata=[sampled_video_metadata(2, 2.0)])
    assert inputs["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert _count(processor, inputs, "<|video_pad|>") == [4]
    assert "<0.2 seconds><|vision_start|><|video_pad|>" in processor.tokenizer.decode(inputs["input_ids"][0])
    frames = [(np.array(rgb, np.float32) / 255 - 0.5) / 0.5 for rgb in ((255, 0, 0), (0, 128, 255))]
    row = np.stack([np.stack([np.full(256, frames[t][channel]) for t in range(2)]) for channel in range(3)])
    np.testing.assert_allclose(inputs["pixel_values_videos"].numpy(), np.tile(row.reshape(-1), (16, 1)), atol=1e-5)


def test_llava_onevision_pixels_of_a_solid_video_equal_the_formula(processors):
    processor = processors["llava_onevision"]
    inputs = _call(processor, text=[_prompt(processor, "video", "Hi")], videos=[_solid_video()])
    pixels = inputs["pixel_values_videos"].numpy()
    assert pixels.shape == (1, 2, 3, 112, 112)  # resized to the saved size
    assert _count(processor, inputs, "<video>") == [2 * 4 * 4 + 1]
    for t, rgb in enumerate([(255, 0, 0), (0, 128, 255)]):
        expected = np.broadcast_to(_normalized(rgb)[:, None, None], (3, 112, 112))
        np.testing.assert_allclose(pixels[0, t], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------- images
def test_qwen_images_equal_the_saved_image_processor_and_mix_with_videos(built, processors):
    from transformers import AutoImageProcessor

    processor = processors["qwen2_5_vl"]
    images = [_random_video((1, 100, 140), 3)[0], _random_video((1, 112, 112), 4)[0]]
    texts = [_prompt(processor, "image", question) for question in QUESTIONS]
    inputs = _call(processor, text=texts, images=images)
    direct = AutoImageProcessor.from_pretrained(built["qwen2_5_vl"])(images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], direct["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], direct["image_grid_thw"])
    grids = direct["image_grid_thw"]
    assert _count(processor, inputs, "<|image_pad|>") == (grids.prod(dim=1) // 4).tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_id).long())
    _generate(built["qwen2_5_vl"], inputs)

    mixed = _call(processor, 
        text=[_prompt(processor, "image", QUESTIONS[0]), _prompt(processor, "video", QUESTIONS[1])],
        images=images[:1],
        videos=[_random_video((4, 112, 112), 5)],
    )
    assert [set(row.tolist()) for row in mixed["mm_token_type_ids"]] == [{0, 1}, {0, 2}]
    _generate(built["qwen2_5_vl"], mixed)


def test_llava_onevision_image_runs_generate(built, processors):
    processor = processors["llava_onevision"]
    inputs = _call(processor, text=[_prompt(processor, "image", QUESTIONS[0])], images=[_random_video((1, 112, 112), 6)[0]])
    assert _count(processor, inputs, "<image>") == [136]  # anyres 2x2: 64 base + 8*8 + 8 newlines (vlm.tiny docstring)
    _generate(built["llava_onevision"], inputs)


# --------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chat_template_and_decode_delegate_to_the_tokenizer(processors, family):
    processor = processors[family]
    text = _prompt(processor, "video", "Describe this video.")
    assert text.endswith("<|im_start|>assistant\n") and FAMILIES[family].video_token in text
    ids = processor.tokenizer("Describe this video.")["input_ids"]
    assert processor.decode(ids) == "Describe this video."
    assert processor.batch_decode([ids, ids]) == ["Describe this video."] * 2
