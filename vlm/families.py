"""The one family table: everything the project knows about a model family, keyed by `config.model_type`.

Imports neither torch nor transformers (pipeline.preflight reads it before any cluster or model
work), so classes are named, not imported, and the tiny builder's configs and processor settings
are keyword dicts that `vlm.tiny` hands to those classes.

Adding a family: one `Family` row here and one adapter file in `v2drop/adapters/`
(tests/vlm/test_families.py checks that no other source file names a family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlm import templates

PATCH_SIZE = 14  # Qwen2-VL, Qwen2.5-VL and SigLIP (LLaVA-OneVision)
QWEN3_VL_PATCH_SIZE = 16
TINY_IMAGE_SIZE_PX = 112  # the tiny LLaVA-OV SigLIP input side; 112 / 14 = 8x8 patches per crop

# (tokenizer ids of the special tokens, text-config dict, vision width, vision depth) -> config kwargs
TinyConfig = Callable[[dict[str, int], dict[str, Any], int, int], dict[str, Any]]
# max_pixels -> {"image_processor": kwargs, "video_processor": kwargs, "processor": kwargs}
TinyProcessor = Callable[[int], dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    # transformers class names (imported by name where they are used)
    config_class: str
    model_class: str
    processor_class: str
    image_processor_class: str
    video_processor_class: str
    image_token: str  # the placeholder strings the processor expands, one per visual feature
    video_token: str
    visual_token_id_keys: tuple[str, ...]  # config attributes holding the placeholder ids
    # pixel_values_videos is one [B, T, C, H, W] tensor: every video of a batch needs one frame count
    equal_frame_count: bool
    # Qwen3-VL: each temporal patch is its own vision span behind "<t seconds>"
    timestamped_video_spans: bool
    # Qwen2.5-VL: the processor returns second_per_grid_ts (the spacing of temporal M-RoPE ids)
    second_per_grid_ts: bool
    patch_size: int
    temporal_patch_size: int  # frames per temporal patch (1: frames are encoded one by one)
    # the tiny random-weight builder (vlm.tiny)
    special_tokens: tuple[str, ...]
    chat_template: str
    tiny_config: TinyConfig
    tiny_processor: TinyProcessor
    # the vision tower's attention class whose per-window loop v2drop.vision batches; None: the
    # tower already runs its frames as one batch (SigLIP)
    vision_attention_class: str | None = None

    @property
    def patch_grid_inputs(self) -> bool:
        """Qwen-style pixels: flattened patches plus a (t, h, w) grid per visual, rather than frames."""
        return not self.equal_frame_count

    @property
    def patch_dim(self) -> int:
        """Values per flattened Qwen patch: channels * temporal_patch * patch² (3 * 2 * 14 * 14 = 1176)."""
        return 3 * self.temporal_patch_size * self.patch_size**2


# --------------------------------------------------------------------------------------------- tiny configs
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


def _qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen2_5_vl_config(ids: dict[str, int], text: dict[str, Any], vision_width: int, depth: int) -> dict[str, Any]:
    vision = dict(
        depth=depth, hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=2,
        patch_size=PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
        window_size=112,  # 112 px = 4x4 merged patches per attention window, as in the real model
        out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=[depth - 1],  # the real model ends each group with full attention
        tokens_per_second=2,
    )  # fmt: skip
    text = dict(text, rope_parameters=_mrope(text, theta=1e6))
    return dict(text_config=text, vision_config=vision, **_qwen_token_ids(ids))


def _qwen2_vl_config(ids: dict[str, int], text: dict[str, Any], vision_width: int, depth: int) -> dict[str, Any]:
    """Qwen2.5-VL's text model; a vision tower without window attention."""
    vision = dict(
        depth=depth, embed_dim=vision_width,
        hidden_size=text["hidden_size"],  # the merger's output, i.e. the text model's width
        mlp_ratio=2, num_heads=2, patch_size=PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    text = dict(text, rope_parameters=_mrope(text, theta=1e6))
    return dict(text_config=text, vision_config=vision, **_qwen_token_ids(ids))


def _qwen3_vl_config(ids: dict[str, int], text: dict[str, Any], vision_width: int, depth: int) -> dict[str, Any]:
    """Patch 16, learned vision position embeddings, interleaved M-RoPE, and DeepStack features
    taken from every vision block (the real 8B takes blocks 8, 16 and 24 of 27)."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text = dict(text, head_dim=head_dim, rope_parameters=_mrope(text, theta=5e6, mrope_interleaved=True))
    vision = dict(
        depth=depth, hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=2,
        patch_size=QWEN3_VL_PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,  # an 8x8 grid, interpolated to each input's size
        deepstack_visual_indexes=list(range(depth)),
    )  # fmt: skip
    return dict(text_config=text, vision_config=vision, **_qwen_token_ids(ids))


def llava_grid_pinpoints(max_crops_per_side: int = 3) -> list[list[int]]:
    """The real pinpoints are multiples of the 384 px SigLIP input; the tiny ones of 112 px."""
    sides = [TINY_IMAGE_SIZE_PX * k for k in range(1, max_crops_per_side + 1)]
    return [[h, w] for h in sides for w in sides]


def _llava_onevision_config(ids: dict[str, int], text: dict[str, Any], vision_width: int, depth: int) -> dict[str, Any]:
    vision = dict(
        model_type="siglip_vision_model", hidden_size=vision_width, intermediate_size=2 * vision_width,
        num_hidden_layers=depth, num_attention_heads=2, image_size=TINY_IMAGE_SIZE_PX, patch_size=PATCH_SIZE,
        vision_use_head=False,
    )  # fmt: skip
    return dict(
        vision_config=vision,
        text_config=dict(text, model_type="qwen2", rope_theta=1e6),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: every patch is a feature
        vision_feature_layer=-1,
        image_grid_pinpoints=llava_grid_pinpoints(),
        vision_aspect_ratio="anyres_max_9",
    )


# --------------------------------------------------------------------------------------------- tiny processors
def _qwen2_vl_processor(max_pixels: int) -> dict[str, dict[str, Any]]:
    """Qwen2-VL's and Qwen2.5-VL's processors take the same settings."""
    # Small pixel bounds: a 112x112 frame stays 112x112 (8x8 patches); larger frames shrink to <= max_pixels.
    vision = dict(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels},
                  patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=2)
    # cap_pixels_per_frame=False: the per-frame bound is max_pixels alone (as before qwen-vl-utils' cap).
    video = dict(vision, do_sample_frames=False, cap_pixels_per_frame=False)
    return {"image_processor": vision, "video_processor": video, "processor": {}}


def _qwen3_vl_processor(max_pixels: int) -> dict[str, dict[str, Any]]:
    # Qwen3-VL's video budget covers t * h * w: up to 32 frames of max_pixels each.
    vision = dict(patch_size=QWEN3_VL_PATCH_SIZE, temporal_patch_size=2, merge_size=2,
                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return {
        "image_processor": dict(vision, size={"shortest_edge": 64 * 64, "longest_edge": max_pixels}),
        "video_processor": dict(vision, size={"shortest_edge": 64 * 64, "longest_edge": 32 * max_pixels},
                                do_sample_frames=False, cap_pixels_per_frame=False),
        "processor": {},
    }


def _llava_onevision_processor(max_pixels: int) -> dict[str, dict[str, Any]]:
    size = {"height": TINY_IMAGE_SIZE_PX, "width": TINY_IMAGE_SIZE_PX}  # SigLIP's fixed input: max_pixels unused
    return {
        "image_processor": dict(size=size, image_grid_pinpoints=llava_grid_pinpoints(), do_pad=True),
        "video_processor": dict(size=size),
        "processor": dict(
            num_image_tokens=(TINY_IMAGE_SIZE_PX // PATCH_SIZE) ** 2,  # 8x8 SigLIP patches per 112 px crop
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ),
    }


# --------------------------------------------------------------------------------------------- the table
_QWEN: dict[str, Any] = dict(
    image_token="<|image_pad|>", video_token="<|video_pad|>",
    visual_token_id_keys=("image_token_id", "video_token_id"),
    equal_frame_count=False, temporal_patch_size=2,
    special_tokens=templates.QWEN_SPECIAL_TOKENS, chat_template=templates.QWEN2_5_VL_CHAT_TEMPLATE,
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            model_type="qwen2_5_vl", config_class="Qwen2_5_VLConfig",
            model_class="Qwen2_5_VLForConditionalGeneration", processor_class="Qwen2_5_VLProcessor",
            image_processor_class="Qwen2VLImageProcessor", video_processor_class="Qwen2VLVideoProcessor",
            timestamped_video_spans=False, second_per_grid_ts=True, patch_size=PATCH_SIZE,
            tiny_config=_qwen2_5_vl_config, tiny_processor=_qwen2_vl_processor,
            vision_attention_class="Qwen2_5_VLVisionAttention", **_QWEN,
        ),
        Family(
            model_type="qwen3_vl", config_class="Qwen3VLConfig",
            model_class="Qwen3VLForConditionalGeneration", processor_class="Qwen3VLProcessor",
            image_processor_class="Qwen2VLImageProcessor", video_processor_class="Qwen3VLVideoProcessor",
            timestamped_video_spans=True, second_per_grid_ts=False, patch_size=QWEN3_VL_PATCH_SIZE,
            tiny_config=_qwen3_vl_config, tiny_processor=_qwen3_vl_processor,
            vision_attention_class="Qwen3VLVisionAttention", **_QWEN,
        ),
        Family(
            model_type="llava_onevision", config_class="LlavaOnevisionConfig",
            model_class="LlavaOnevisionForConditionalGeneration", processor_class="LlavaOnevisionProcessor",
            image_processor_class="LlavaOnevisionImageProcessor",
            video_processor_class="LlavaOnevisionVideoProcessor",
            image_token="<image>", video_token="<video>",
            visual_token_id_keys=("image_token_id", "video_token_id"),
            equal_frame_count=True, timestamped_video_spans=False, second_per_grid_ts=False,
            patch_size=PATCH_SIZE, temporal_patch_size=1,
            special_tokens=templates.LLAVA_SPECIAL_TOKENS, chat_template=templates.LLAVA_ONEVISION_CHAT_TEMPLATE,
            tiny_config=_llava_onevision_config, tiny_processor=_llava_onevision_processor,
        ),
        Family(
            model_type="qwen2_vl", config_class="Qwen2VLConfig",
            model_class="Qwen2VLForConditionalGeneration", processor_class="Qwen2VLProcessor",
            image_processor_class="Qwen2VLImageProcessor", video_processor_class="Qwen2VLVideoProcessor",
            timestamped_video_spans=False, second_per_grid_ts=False, patch_size=PATCH_SIZE,
            tiny_config=_qwen2_vl_config, tiny_processor=_qwen2_vl_processor,
            vision_attention_class="VisionAttention", **_QWEN,
        ),
    )
}  # fmt: skip

# What `tiny:<model_type>` may name (the offline preset's choices): every row, model and processor.
TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def family(model_type: str | None) -> Family:
    """The row for `model_type`, or a ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(config: Any) -> Family:
    """The row for a transformers config (anything with `model_type`)."""
    return family(getattr(config, "model_type", None))


def needs_equal_frame_count(config: Any) -> bool:
    """True when one generate call's videos must share a frame count; False for unknown families."""
    row = FAMILIES.get(str(getattr(config, "model_type", "")))
    return bool(row and row.equal_frame_count)


def visual_token_ids(config: Any) -> tuple[int, ...]:
    """The image and video placeholder ids of a model config, in the table's key order."""
    return tuple(int(getattr(config, key)) for key in family_of(config).visual_token_id_keys)
