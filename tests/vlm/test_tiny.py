"""vlm.tiny: real classes, random seeded weights, offline; token counts agree between processor and model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlm import loading, tiny  # noqa: E402
from vlm.families import FAMILIES, TINY_FAMILIES  # noqa: E402
from vlm.processing import load_processor, sampled_video_metadata  # noqa: E402

NUM_LAYERS = 3
# 4 frames of 112x112 and one 112x112 image; see the module docstring of vlm.tiny for the arithmetic.
# Qwen3-VL: patch 16, sides rounded to multiples of 32 (112 -> 128): the same counts as Qwen2.5-VL's 112 / 14.
EXPECTED_TOKENS = {"qwen2_5_vl": {"video": 32, "image": 16}, "qwen3_vl": {"video": 32, "image": 16},
                   "llava_onevision": {"video": 65, "image": 136}, "qwen2_vl": {"video": 32, "image": 16}}
QWEN_PADS = {"video": "<|video_pad|>", "image": "<|image_pad|>"}
PAD_TOKENS = {"qwen2_5_vl": QWEN_PADS, "qwen3_vl": QWEN_PADS, "qwen2_vl": QWEN_PADS,
              "llava_onevision": {"video": "<video>", "image": "<image>"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.build(family, root / family, num_layers=NUM_LAYERS) for family in TINY_FAMILIES}


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _messages() -> list[dict]:
    content = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Describe this video in detail."}]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_saves_real_model_whose_token_ids_match_the_tokenizer(built: dict[str, Path], family: str) -> None:
    model = loading.load_model(built[family])
    tokenizer = _tokenizer(built[family])
    expected_class = {"qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL", "llava_onevision": "LlavaOnevision",
                      "qwen2_vl": "Qwen2VL"}[family]
    assert type(model).__name__ == f"{expected_class}ForConditionalGeneration"
    assert model.use_kernels is False  # no Hub kernels in the layers v2drop patches (vlm.loading)
    assert model.config.text_config.num_hidden_layers == NUM_LAYERS
    assert model.config.text_config.vocab_size >= len(tokenizer)
    pads = PAD_TOKENS[family]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(pads["image"])
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids(pads["video"])
    assert model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Ordinary words are whole tokens, not bytes: the BPE was trained, not left empty.
    words = ["Describe", "Ġthis", "Ġvideo", "Ġin", "Ġdetail", "."]
    assert tokenizer.tokenize("Describe this video in detail.") == words


def test_qwen_special_ids_and_mrope_section(built: dict[str, Path]) -> None:
    config = loading.load_model(built["qwen2_5_vl"]).config
    tokenizer = _tokenizer(built["qwen2_5_vl"])
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]  # head_dim 16 -> 8 frequencies
    assert config.vision_config.fullatt_block_indexes == [1]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chat_template_renders_family_tokens(built: dict[str, Path], family: str) -> None:
    rendered = _tokenizer(built[family]).apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    qwen = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Describe this video in detail.<|im_end|>\n<|im_start|>assistant\n"
    )
    expected = {
        "qwen2_5_vl": qwen,
        "qwen3_vl": qwen,
        "qwen2_vl": qwen,
        "llava_onevision": "<|im_start|>user\n<image>\n<video>\nDescribe this video in detail.<|im_end|>\n"
        "<|im_start|>assistant\n",
    }
    assert rendered == expected[family]
    assert (built[family] / "chat_template.jinja").read_text() == FAMILIES[family].chat_template


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_seed_gives_identical_weights(built: dict[str, Path], family: str, tmp_path: Path) -> None:
    again = loading.load_model(tiny.build(family, tmp_path / "again", num_layers=NUM_LAYERS)).state_dict()
    first = loading.load_model(built[family]).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = loading.load_model(tiny.build(family, tmp_path / "other", num_layers=NUM_LAYERS, seed=1)).state_dict()
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
    assert (built[family] / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()


def test_random_weight_marker(built: dict[str, Path], tmp_path: Path) -> None:
    assert all(tiny.is_random_weights(path) for path in built.values())
    assert "RANDOM" in (built["qwen2_5_vl"] / "README.md").read_text()
    assert not tiny.is_random_weights(tmp_path)
    (tmp_path / tiny.MARKER_FILE).write_text("not json")
    assert not tiny.is_random_weights(tmp_path)


def test_build_cached_builds_once(tmp_path: Path) -> None:
    first = tiny.build_cached("llava_onevision", tmp_path, num_layers=1)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = tiny.build_cached("llava_onevision", tmp_path, num_layers=1)
    assert second == first and (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny.build_cached("llava_onevision", tmp_path, num_layers=2) != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_7b_shaped_overrides_reach_the_text_config() -> None:
    tokenizer = tiny.build_tokenizer("qwen2_5_vl")
    config = tiny.build_config(
        "qwen2_5_vl", tokenizer, num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
        intermediate_size=18944, vocab_size=152064,
    )  # fmt: skip
    text = config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (3584, 28, 4)
    assert (text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (18944, 28, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]  # the real 7B split
    assert config.vision_config.out_hidden_size == 3584
    model = tiny.build_model(config, device="meta")
    assert 7.0e9 < sum(p.numel() for p in model.model.language_model.parameters()) < 8.0e9


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="supported: qwen2_5_vl, qwen3_vl, llava_onevision"):
        tiny.build("llama", tmp_path)
    with pytest.raises(TypeError, match="num_head"):
        tiny.build("qwen2_5_vl", tmp_path, num_head=4)


def test_cli_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.main(["llava_onevision", str(tmp_path / "cli"), "--num-layers", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / tiny.MARKER_FILE).read_text())["build_kwargs"]["num_layers"] == 1


# ----------------------------------------------------------------------- processor counts vs model features
def _frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8)


def _vision_inputs(family: str, path: Path) -> tuple[dict, dict[str, int]]:
    """Pixel tensors for one image (real image processor) and one 4-frame video (layout of the real video
    processor), plus the placeholder counts the real processor's own methods give for them."""
    processor = load_processor(path)
    image = processor.image_processor(images=[_frames()[0]], return_tensors="pt")
    if family == "qwen2_5_vl":
        video_grid_thw = torch.tensor([[2, 8, 8]])  # 4 frames / temporal patch 2; 112 / 14 = 8
        pixel_values_videos = torch.randn(int(video_grid_thw.prod()), 3 * 2 * 14 * 14)
        video_replacement = processor.replace_video_token({"video_grid_thw": video_grid_thw}, 0)
        counts = {
            "image": len(processor.replace_image_token(image, 0)) // len(processor.image_token),
            "video": len(video_replacement) // len(processor.video_token),
        }
        video = {
            "pixel_values_videos": pixel_values_videos,
            "video_grid_thw": video_grid_thw,
            "second_per_grid_ts": torch.tensor([1.0]),
        }
    else:
        height, width = image["pixel_values"][0][0].shape[-2:]
        counts = {
            "image": processor._get_number_of_features(112, 112, height, width),
            "video": processor._get_num_multimodal_tokens(video_sizes=[(4, 112, 112)])["num_video_tokens"][0],
        }
        video = {"pixel_values_videos": torch.randn(1, 4, 3, 112, 112)}
    return {**dict(image), **video}, counts


def _prompt_ids(family: str, path: Path, counts: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders the chat template and expands each placeholder as the processor does; returns input_ids and
    mm_token_type_ids (0 text, 1 image, 2 video), which Qwen2.5-VL needs for its 3-D positions."""
    tokenizer = _tokenizer(path)
    text = tokenizer.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    for kind in ("image", "video"):
        text = text.replace(PAD_TOKENS[family][kind], PAD_TOKENS[family][kind] * counts[kind])
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    ids = {kind: tokenizer.convert_tokens_to_ids(PAD_TOKENS[family][kind]) for kind in ("image", "video")}
    types = (input_ids == ids["image"]).int() + 2 * (input_ids == ids["video"]).int()
    return input_ids, types


# Qwen3-VL's per-frame spans are checked through its processor in test_real_processor_round_trip.
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_processor_counts_equal_model_features(built: dict[str, Path], family: str) -> None:
    """The model raises unless every placeholder gets exactly one visual feature, so a generate and a
    forward that succeed prove the processor's counts and the model's feature counts agree."""
    model = loading.load_model(built[family])
    vision, counts = _vision_inputs(family, built[family])
    assert counts == EXPECTED_TOKENS[family]
    input_ids, mm_token_type_ids = _prompt_ids(family, built[family], counts)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **vision}
    if family == "qwen2_5_vl":
        inputs["mm_token_type_ids"] = mm_token_type_ids
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len(out.hidden_states) == NUM_LAYERS + 1
    assert out.hidden_states[-1].shape == (1, input_ids.shape[1], model.config.text_config.hidden_size)
    assert generated.shape == (1, input_ids.shape[1] + 3)
    with pytest.raises(ValueError, match="do not match"), torch.no_grad():
        model(**_one_video_token_short(inputs, model.config.video_token_id))


def _one_video_token_short(inputs: dict, video_token_id: int) -> dict:
    """Drops one video placeholder: a model fed fewer placeholders than features must refuse to run."""
    keep = torch.ones_like(inputs["input_ids"][0], dtype=torch.bool)
    keep[(inputs["input_ids"][0] == video_token_id).nonzero()[0]] = False
    per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
    return {k: v[:, keep] if k in per_token else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_real_processor_round_trip(built: dict[str, Path], family: str) -> None:
    model, processor = loading.load(built[family])
    text = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    inputs = processor(
        text=[text], videos=[_frames()], images=[_frames()[0]], video_metadata=[sampled_video_metadata(4, 2.0)],
        do_sample_frames=False, padding=True, return_tensors="pt",
    )
    ids = inputs["input_ids"][0]
    for kind in ("image", "video"):
        pad_id = processor.tokenizer.convert_tokens_to_ids(PAD_TOKENS[family][kind])
        assert int((ids == pad_id).sum()) == EXPECTED_TOKENS[family][kind]
    if family != "llava_onevision":
        assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]] and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
        assert "mm_token_type_ids" in inputs and ("second_per_grid_ts" in inputs) == FAMILIES[family].second_per_grid_ts
    if family == "qwen3_vl":  # one span per temporal patch, behind its time: frames 0-1 and 2-3 at 2 fps
        text = processor.tokenizer.decode(ids)
        assert "<0.2 seconds><|vision_start|>" in text and "<1.2 seconds><|vision_start|>" in text
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[0] + 3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_processor_loads_as_the_real_classes_the_table_names(built: dict[str, Path], family: str) -> None:
    processor = load_processor(built[family])
    row = FAMILIES[family]
    loaded = (type(processor), type(processor.image_processor), type(processor.video_processor))
    assert tuple(cls.__name__ for cls in loaded) == (
        row.processor_class, row.image_processor_class, row.video_processor_class)
    assert processor.tokenizer.padding_side == "left"
    assert type(loading.load_model(built[family])).__name__ == row.model_class


def test_loading_refuses_a_family_outside_the_table_before_reading_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights at all
    with pytest.raises(ValueError, match="unsupported model_type 'llama'; supported: qwen2_5_vl"):
        loading.load_model(tmp_path)
