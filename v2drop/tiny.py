"""Tiny vision-language models with RANDOM (seeded) weights, built offline from real transformers classes.

Why: tests, the offline preset (`model.source: tiny:<family>`) and benchmarks need a model that runs the
exact code paths of the real checkpoints (real config classes, real modeling files, a real byte-level BPE
tokenizer with the family's special tokens and chat template, the family's real processor) without
downloading anything. Nothing here is a mock: only the sizes are small and the weights random.

    from v2drop import tiny
    path = tiny.build_cached("qwen2_5_vl", "~/.cache/v2drop-batch/tiny", num_layers=8)
    model, processor = tiny.load(path)

Token counts with the defaults (patch 14, 112 px):
  qwen2_5_vl       4 frames 112x112 -> grid (t=2, h=8, w=8) -> 2*8*8/2**2 = 32 <|video_pad|>; image 112x112 -> 16
  qwen3_vl         patch 16: 4 frames 112x112 -> 128x128 -> grid (2, 8, 8) -> 2 timestamped spans of 16
  llava_onevision  4 frames 112x112 -> 4 * ceil(8/2)**2 + 1 newline = 65 <video>;
                   image 112x112 -> anyres 2x2 crops: 64 base + 8*8 unpadded + 8 newlines = 136 <image>

transformers 5.23 builds the video processors (and therefore both families' processors, whose
constructors look up the video-processor base class) only when torchvision is importable. Without
it, `build` still writes every processor file, from the same keyword dicts the real classes are
built from, so the directory loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")
# Families whose config, model and tokenizer tiny builds for the engine tests, without a saved
# processor directory: OfflineProcessor has no video processor for Qwen2-VL.
ENGINE_ONLY_FAMILIES = ("qwen2_vl",)
# Bump when the built directory changes for the same arguments, so `build_cached` rebuilds.
BUILDER_VERSION = 1
MARKER_FILE = "RANDOM_WEIGHTS.json"

PATCH_SIZE = 14
QWEN3_VL_PATCH_SIZE = 16
IMAGE_SIZE_PX = 112  # LLaVA-OV SigLIP input side; 112 / 14 = 8x8 patches per crop

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
LLAVA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# The Qwen2-VL / Qwen2.5-VL Instruct template as published with the checkpoints (default system prompt included).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The template of transformers' LLaVA-OneVision conversion script (llava-hf/llava-onevision-qwen2-*-hf).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough ordinary English that prompts, captions and questions tokenize into words, not bytes.
_TRAINING_TEXT = """
Describe this video in detail. What is happening in the video? What is the person doing?
Summarize the main events of the clip. How many people are there? What color is the car?
A man is walking his dog along a quiet street on a sunny morning. The dog stops to sniff a tree.
A woman sits at a wooden table and reads a book while drinking a cup of coffee near the window.
Two children are playing football in a green park; one of them kicks the ball towards the goal.
The camera slowly pans across a kitchen where someone is chopping vegetables and boiling water.
A red car drives down a busy road in the city at night, passing shops, lights and tall buildings.
The video shows a cat jumping onto a sofa, then lying down and falling asleep in the warm sun.
In the first scene a chef prepares pasta; in the second scene he serves it to smiling guests.
A group of friends hike up a mountain trail, stop at the top and look at the view of the valley.
The weather is cloudy and it starts to rain, so people open their umbrellas and hurry home.
A bird flies over the lake, lands on a branch and sings while the water moves in the wind.
The presenter stands in front of a screen and explains a chart with numbers about the year.
Answer the question based on the video. Is the door open or closed? Where does this take place?
The image contains a white plate with bread, cheese and fresh fruit on a blue kitchen table.
First, second, third, then, after that, finally, before, during, while, because, however.
the a an and or but of to in on at for with from by over under into through between above below
is are was were be been being have has had do does did will would can could should may might
one two three four five six seven eight nine ten hundred thousand left right up down front back
""".strip()


# --------------------------------------------------------------------------------------------- tokenizer
def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains a byte-level BPE with Qwen2's exact normalizer and pre-tokenizer, so the vocab and merges
    drop into the real `Qwen2Tokenizer` and split text the way the real checkpoints do."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer(family: str, *, bpe_vocab_size: int = 1024) -> Any:
    """A real `Qwen2Tokenizer` (every family here uses Qwen's tokenizer) with the family's special tokens
    appended after the BPE vocab, as in the real checkpoints, and its chat template attached."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _train_bpe(bpe_vocab_size)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    specials = QWEN_SPECIAL_TOKENS if family.startswith("qwen") else LLAVA_SPECIAL_TOKENS
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.chat_template = _chat_template(family)
    tokenizer.model_max_length = 32768
    return tokenizer


def _chat_template(family: str) -> str:
    # Qwen3-VL's own template differs only in the system prompt; its processor, not the template,
    # writes the per-frame timestamps.
    return QWEN2_5_VL_CHAT_TEMPLATE if family.startswith("qwen") else LLAVA_ONEVISION_CHAT_TEMPLATE


# --------------------------------------------------------------------------------------------- configs
def _mrope_section(head_dim: int) -> list[int]:
    """Splits head_dim/2 rotary frequencies over (t, h, w) in the real checkpoints' 1/4, 3/8, 3/8 ratio.

    Example: head_dim 128 (7B) -> [16, 24, 24]; head_dim 16 (tiny) -> [2, 3, 3]."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _mrope(text: dict[str, Any], *, theta: float, **extra: Any) -> dict[str, Any]:
    """rope_parameters of the Qwen families' 3-D M-RoPE for a text config dict."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": _mrope_section(head_dim), **extra}


def _qwen_visual_token_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _padded_vocab_size(tokenizer: Any, multiple: int = 64) -> int:
    """Rounds the tokenizer length up, as real checkpoints do (Qwen: 151665 tokens, 152064 embeddings)."""
    return math.ceil(len(tokenizer) / multiple) * multiple


def _text_config(
    tokenizer: Any,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int | None,
) -> dict[str, Any]:
    """Fields shared by both families' Qwen2 text models; `vocab_size` may exceed the tokenizer (7B shape)."""
    vocab_size = vocab_size or _padded_vocab_size(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def _qwen2_5_vl_config(tokenizer: Any, text: dict[str, Any], vision_hidden_size: int, vision_depth: int) -> Any:
    from transformers import Qwen2_5_VLConfig

    text = dict(text, rope_parameters=_mrope(text, theta=1e6))
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,  # 112 px = 4x4 merged patches per attention window, as in the real model
        out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=[vision_depth - 1],  # the real model ends each group with full attention
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_visual_token_ids(tokenizer))


def _qwen2_vl_config(tokenizer: Any, text: dict[str, Any], vision_hidden_size: int, vision_depth: int) -> Any:
    """Qwen2-VL: Qwen2.5-VL's text model; a vision tower without window attention."""
    from transformers import Qwen2VLConfig

    vision = dict(
        depth=vision_depth,
        embed_dim=vision_hidden_size,
        hidden_size=text["hidden_size"],  # the merger's output, i.e. the text model's width
        mlp_ratio=2,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = dict(text, rope_parameters=_mrope(text, theta=1e6))
    return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_visual_token_ids(tokenizer))


def _qwen3_vl_config(tokenizer: Any, text: dict[str, Any], vision_hidden_size: int, vision_depth: int) -> Any:
    """Qwen3-VL: patch 16, learned vision position embeddings, interleaved M-RoPE, and DeepStack
    features taken from every vision block (the real 8B takes blocks 8, 16 and 24 of 27)."""
    from transformers import Qwen3VLConfig

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text = dict(text, head_dim=head_dim, rope_parameters=_mrope(text, theta=5e6, mrope_interleaved=True))
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=2,
        patch_size=QWEN3_VL_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,  # an 8x8 grid, interpolated to each input's size
        deepstack_visual_indexes=list(range(vision_depth)),
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_visual_token_ids(tokenizer))


def _llava_grid_pinpoints(max_crops_per_side: int = 3) -> list[list[int]]:
    """The real pinpoints are multiples of the 384 px SigLIP input; ours are multiples of 112 px."""
    sides = [IMAGE_SIZE_PX * k for k in range(1, max_crops_per_side + 1)]
    return [[h, w] for h in sides for w in sides]


def _llava_onevision_config(tokenizer: Any, text: dict[str, Any], vision_hidden_size: int, vision_depth: int) -> Any:
    from transformers import LlavaOnevisionConfig

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_depth,
        num_attention_heads=2,
        image_size=IMAGE_SIZE_PX,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=dict(text, model_type="qwen2", rope_theta=1e6),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: every patch is a feature
        vision_feature_layer=-1,
        image_grid_pinpoints=_llava_grid_pinpoints(),
        vision_aspect_ratio="anyres_max_9",
    )


def build_config(
    family: str,
    tokenizer: Any,
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
) -> Any:
    """The family's real config class with small sizes; pass 7B sizes (hidden_size=3584, num_heads=28,
    num_kv_heads=4, intermediate_size=18944, num_layers=28, vocab_size=152064) for benchmark shapes."""
    if family not in FAMILIES + ENGINE_ONLY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; supported: {', '.join(FAMILIES + ENGINE_ONLY_FAMILIES)}")
    text = _text_config(
        tokenizer,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
    )
    make = {
        "qwen2_5_vl": _qwen2_5_vl_config,
        "qwen2_vl": _qwen2_vl_config,
        "qwen3_vl": _qwen3_vl_config,
        "llava_onevision": _llava_onevision_config,
    }
    return make[family](tokenizer, text, vision_hidden_size, vision_depth)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; supported: {', '.join(FAMILIES)}")


# --------------------------------------------------------------------------------------------- model
def build_model(config: Any, *, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Instantiates the family's real model class. The RNG is forked so seeding here does not disturb the
    caller's random state; `device="meta"` gives a weightless model for 7B-shaped FLOP/shape checks."""
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, config.text_config.bos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


# --------------------------------------------------------------------------------------------- processor
def _processor_parts(family: str, max_pixels: int) -> dict[str, dict[str, Any]]:
    """Keyword arguments of the image processor, video processor and processor, in one place so the
    torchvision path (real classes) and the fallback path (written files) cannot drift apart."""
    if family == "qwen2_5_vl":
        # Small pixel bounds: a 112x112 frame stays 112x112 (8x8 patches); larger frames shrink to <= max_pixels.
        size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
        vision = dict(size=size, patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=2)
        return {
            "image_processor": dict(vision, image_processor_type="Qwen2VLImageProcessor"),
            "video_processor": dict(vision, do_sample_frames=False, video_processor_type="Qwen2VLVideoProcessor"),
            "processor": dict(processor_class="Qwen2_5_VLProcessor"),
        }
    if family == "qwen3_vl":
        # Qwen3-VL's video budget covers t * h * w: up to 32 frames of max_pixels each.
        vision = dict(patch_size=QWEN3_VL_PATCH_SIZE, temporal_patch_size=2, merge_size=2,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return {
            "image_processor": dict(vision, size={"shortest_edge": 64 * 64, "longest_edge": max_pixels},
                                    image_processor_type="Qwen2VLImageProcessor"),
            "video_processor": dict(vision, size={"shortest_edge": 64 * 64, "longest_edge": 32 * max_pixels},
                                    do_sample_frames=False, cap_pixels_per_frame=False,
                                    video_processor_type="Qwen3VLVideoProcessor"),
            "processor": dict(processor_class="Qwen3VLProcessor"),
        }
    size = {"height": IMAGE_SIZE_PX, "width": IMAGE_SIZE_PX}
    return {
        "image_processor": dict(
            size=size,
            image_grid_pinpoints=_llava_grid_pinpoints(),
            do_pad=True,
            image_processor_type="LlavaOnevisionImageProcessor",
        ),
        "video_processor": dict(size=size, video_processor_type="LlavaOnevisionVideoProcessor"),
        "processor": dict(
            processor_class="LlavaOnevisionProcessor",
            num_image_tokens=(IMAGE_SIZE_PX // PATCH_SIZE) ** 2,  # 8x8 SigLIP patches per 112 px crop
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ),
    }


def _without_type(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if not k.endswith("_type") and k != "processor_class"}


def has_video_processor_backend() -> bool:
    """transformers 5.23 video processors (and the processors that hold one) need torchvision."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def build_processor(family: str, tokenizer: Any, *, max_pixels: int = 224 * 224) -> Any:
    """The family's real processor; needs torchvision (see `has_video_processor_backend`)."""
    import transformers

    processor_name, image_name, video_name = {
        "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
        "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
        "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor", "LlavaOnevisionVideoProcessor"),
    }[family]
    parts = _processor_parts(family, max_pixels)
    return getattr(transformers, processor_name)(
        image_processor=getattr(transformers, image_name)(**_without_type(parts["image_processor"])),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, video_name)(**_without_type(parts["video_processor"])),
        chat_template=_chat_template(family),
        **_without_type(parts["processor"]),
    )


def _write_processor_files(family: str, tokenizer: Any, out_dir: Path, *, max_pixels: int) -> None:
    """Writes what `processor.save_pretrained` writes, without constructing the classes that need
    torchvision: the tokenizer and the PIL image processor through their own `save_pretrained`, the
    video processor and processor configs as JSON from the same keyword dicts."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    parts = _processor_parts(family, max_pixels)
    image_cls = Qwen2VLImageProcessorPil if family.startswith("qwen") else LlavaOnevisionImageProcessorPil
    image = image_cls(**_without_type(parts["image_processor"]))
    image.save_pretrained(out_dir)
    owner = {"processor_class": parts["processor"]["processor_class"]}
    _patch_json(out_dir / "preprocessor_config.json", parts["image_processor"] | owner)
    tokenizer.save_pretrained(out_dir)
    video = parts["video_processor"] | owner
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    (out_dir / "processor_config.json").write_text(json.dumps(parts["processor"], indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(_chat_template(family))


def _patch_json(path: Path, updates: dict[str, Any]) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | updates, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- build / load
_TEXT_OVERRIDES = ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "vision_hidden_size", "vision_depth")
_BUILD_OVERRIDES = ("bpe_vocab_size", "max_pixels")


def build(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Builds config, random seeded model, tokenizer and processor and saves them into `out_dir`.

    Overrides: num_heads, num_kv_heads, intermediate_size, vocab_size, vision_hidden_size, vision_depth
    (reach the config), bpe_vocab_size, max_pixels (tokenizer, Qwen pixel bound). Same arguments -> identical
    files (weights, vocab)."""
    _check_family(family)
    unknown = set(overrides) - set(_TEXT_OVERRIDES) - set(_BUILD_OVERRIDES)
    if unknown:
        allowed = _TEXT_OVERRIDES + _BUILD_OVERRIDES
        raise TypeError(f"unknown tiny.build overrides {sorted(unknown)}; allowed: {allowed}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family, bpe_vocab_size=overrides.get("bpe_vocab_size", 1024))
    config_kwargs = {k: v for k, v in overrides.items() if k in _TEXT_OVERRIDES}
    config = build_config(family, tokenizer, num_layers=num_layers, hidden_size=hidden_size, **config_kwargs)
    build_model(config, seed=seed).save_pretrained(out_dir)
    _save_processor(family, tokenizer, out_dir, max_pixels=overrides.get("max_pixels", 224 * 224))
    _write_marker(out_dir, family, dict(num_layers=num_layers, hidden_size=hidden_size, seed=seed, **overrides))
    return out_dir


def _save_processor(family: str, tokenizer: Any, out_dir: Path, *, max_pixels: int) -> None:
    if has_video_processor_backend():
        build_processor(family, tokenizer, max_pixels=max_pixels).save_pretrained(out_dir)
    else:
        _write_processor_files(family, tokenizer, out_dir, max_pixels=max_pixels)


def _write_marker(out_dir: Path, family: str, kwargs: dict[str, Any]) -> None:
    """The marker lets `is_random_weights` (and anyone reading the folder) tell these apart from real weights."""
    marker = {"v2drop_tiny": BUILDER_VERSION, "family": family, "weights": "random", "build_kwargs": kwargs}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(
        f"# Tiny {family} with RANDOM weights\n\n"
        "Built offline by `v2drop.tiny` for tests and the offline preset. The weights are random (seeded):\n"
        "outputs are meaningless text. Arguments: `" + json.dumps(kwargs, sort_keys=True) + "`.\n"
    )


def is_random_weights(path: str | Path) -> bool:
    """True for directories written by `build` (they carry the marker file)."""
    marker = Path(path) / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("weights") == "random"
    except (OSError, ValueError):
        return False


def cache_key(family: str, **kwargs: Any) -> str:
    """Directory name for a build: family plus a hash of every argument and the builder version."""
    payload = json.dumps({"family": family, "v": BUILDER_VERSION, **kwargs}, sort_keys=True, default=str)
    return f"{family}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def build_cached(family: str, cache_dir: str | Path, **kwargs: Any) -> Path:
    """Builds once per argument set into `cache_dir/<family>-<hash>`; concurrent callers (several Ray
    actors on one node) each build into a private temp dir and the first rename wins."""
    _check_family(family)
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / cache_key(family, **kwargs)
    if is_random_weights(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        build(family, tmp, **kwargs)
        os.rename(tmp, target)  # atomic on one filesystem; fails if another process already renamed
    except OSError:
        if not is_random_weights(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Any:
    """Loads the saved model through the Auto class, as the workers load real checkpoints."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(model, processor) from a built directory; the processor is `v2drop.processing.load_processor`'s
    (the real one where torchvision is importable, the offline one otherwise)."""
    from v2drop.processing import load_processor

    return load_model(path, dtype=dtype, attn_implementation=attn_implementation), load_processor(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight VLM offline.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.family, args.out_dir, num_layers=args.num_layers, hidden_size=args.hidden_size, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
