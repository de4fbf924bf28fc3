"""Turn decoded video frames (and images) plus prompts into model inputs, with or without torchvision.

Why: transformers 5.23 builds the Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision processors only when torchvision is
importable (their video processors subclass the torchvision backend), and no CPU build of torchvision
exists for torch 2.13. GPU production images have it; CPU machines and CI do not. `load_processor`
returns the real processor where it can be built and an `OfflineProcessor` elsewhere.

`OfflineProcessor` is not a re-implementation of the processor: it is the family's REAL processor class
(`Qwen2_5_VLProcessor` / `Qwen3VLProcessor` / `LlavaOnevisionProcessor`: chat template, placeholder expansion, tokenization,
padding, `mm_token_type_ids`, `second_per_grid_ts`) holding the family's REAL PIL image processor, with
one part swapped: the video processor, replaced by a numpy + PIL one (`QwenVideoFramesProcessor`,
`Qwen3VideoFramesProcessor`, `LlavaOnevisionVideoFramesProcessor`) that reads the same config files and computes the same tensors. The
only expected difference from the torchvision video processor is the bicubic resize (PIL on uint8 versus
torchvision on uint8 tensors), which may differ by rounding: about one grey level where frames are resized
(1 / 255 / std = 0.015 after normalisation), none where they keep their size. Written for transformers 5.23-5.24 (`v2drop.compat.TESTED_TRANSFORMERS`, `_check_transformers_version`).

    processor = load_processor("Qwen/Qwen2.5-VL-7B-Instruct")       # or a `v2drop.tiny` directory
    text = processor.apply_chat_template(conversation)              # "...<|vision_start|><|video_pad|>..."
    inputs = processor(text=[text], videos=[frames_thwc_uint8], padding=True,
                       video_metadata=video_metadata([len(frames_thwc_uint8)], fps=2.0))

Token counts (one placeholder per visual feature the model consumes):
  qwen2_5_vl       4 frames 112x112, patch 14, merge 2, temporal patch 2 -> grid (t=2, h=8, w=8)
                   -> 2 * 8 * 8 / 2**2 = 32 <|video_pad|>; 3 frames are padded to 4 by repeating the last.
                   A 120x90 frame -> smart_resize to multiples of 28 -> 112x84 -> grid (h=8, w=6).
  qwen3_vl         4 frames 112x112, patch 16, merge 2 -> sides rounded to multiples of 32 -> 128x128
                   -> grid (2, 8, 8) -> 2 spans of 8 * 8 / 2**2 = 16 <|video_pad|>, each behind its time
                   ("<0.2 seconds><|vision_start|>...<|vision_end|>"), from video_metadata's frames_indices.
  llava_onevision  4 frames resized to 112x112 (8x8 SigLIP patches, num_image_tokens=64)
                   -> 4 * ceil(8 / 2)**2 + 1 newline = 65 <video>; every video of a batch needs the same
                   frame count (the model takes one [n, T, C, H, W] tensor).

Frames per second: Qwen's `second_per_grid_ts` is temporal_patch_size / fps per video, with fps read from
`video_metadata` exactly as the real processor reads it (24 when absent); `fps=` alone asks transformers
to SAMPLE frames and is ignored when `do_sample_frames` is false. Pass `video_metadata(...)`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor

logger = logging.getLogger(__name__)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)  # Qwen3-VL
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resample of both families' configs


# --------------------------------------------------------------------------------------------- entry points
def has_torchvision() -> bool:
    """The real processors of both families need torchvision in transformers 5.23."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def load_processor(path_or_id: str | Path, *, padding_side: str = "left", **kwargs: Any) -> Any:
    """The real processor (`AutoProcessor`) where torchvision is importable, else `OfflineProcessor`.

    Both pad on `padding_side` ("left" for generation) unless a call passes its own `padding_side`.
    Logs one line naming the class."""
    if has_torchvision():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path_or_id, **kwargs)
        processor.tokenizer.padding_side = padding_side
    else:
        processor = OfflineProcessor.from_pretrained(path_or_id, padding_side=padding_side, **kwargs)
    name = type(processor).__name__
    logger.info("v2drop.processing: %s for %s (torchvision: %s)", name, path_or_id, has_torchvision())
    return processor


def video_metadata(frame_counts: list[int], fps: float | list[float]) -> list[dict[str, Any]]:
    """`video_metadata=` for frames already sampled at `fps`. Qwen2.5-VL's processor reads
    `second_per_grid_ts = temporal_patch_size / fps` from it (example: ([4, 6], 2.0) -> 2 / 2.0 =
    1.0 s); Qwen3-VL's writes each temporal patch's time, from `frames_indices` / fps, into the prompt."""
    rates = fps if isinstance(fps, (list, tuple)) else [fps] * len(frame_counts)
    return [
        {"total_num_frames": n, "fps": float(rate), "frames_indices": list(range(n))}
        for n, rate in zip(frame_counts, rates, strict=True)
    ]


class OfflineProcessor:
    """The family's processor for environments without torchvision: same call signature and outputs as the real one.

    Holds the real processor class with the real PIL image processor and a numpy + PIL video processor
    (see the module docstring). Attributes: `family`, `tokenizer`, `image_processor`, `video_processor`,
    `chat_template`, `processor` (the wrapped real processor class)."""

    def __init__(self, family: str, processor: Any) -> None:
        self.family = family
        self.processor = processor

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def video_processor(self) -> Any:
        return self.processor.video_processor

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template

    @property
    def model_input_names(self) -> list[str]:
        return self.processor.model_input_names

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, padding_side: str = "left", **kwargs: Any) -> OfflineProcessor:
        """Reads what real checkpoints ship and `v2drop.tiny` writes: tokenizer, chat template,
        preprocessor_config.json, video_preprocessor_config.json (falling back to the image config, as
        transformers does) and processor_config.json. `kwargs` (revision, cache_dir, ...) reach every loader."""
        _check_transformers_version()
        family = detect_family(path_or_id, **kwargs)
        processor = _build_processor(family, str(path_or_id), **kwargs)
        processor.tokenizer.padding_side = padding_side
        return cls(family, processor)

    def __call__(
        self,
        text: list[str] | str,
        videos: Any = None,
        images: Any = None,
        *,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Qwen2.5-VL -> input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video),
        pixel_values_videos [sum(t*h*w), C*temporal_patch*patch*patch], video_grid_thw [n, 3],
        second_per_grid_ts [n], pixel_values + image_grid_thw for images.
        LLaVA-OneVision -> input_ids, attention_mask, pixel_values_videos [n, T, C, H, W],
        pixel_values [n, crops, C, H, W] + image_sizes + batch_num_images for images.
        Other keywords (padding_side, video_metadata, size, ...) go to the real processor as usual."""
        return self.processor(
            images=images, text=text, videos=videos, padding=padding, return_tensors=return_tensors, **kwargs
        )

    def apply_chat_template(
        self, conversation: list[dict[str, Any]] | list[list[dict[str, Any]]], tokenize: bool = False,
        add_generation_prompt: bool = True, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Renders the processor's chat template through the tokenizer (text; str or list of str)."""
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=tokenize,
            add_generation_prompt=add_generation_prompt, **kwargs,
        )  # fmt: skip

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def __repr__(self) -> str:
        return f"OfflineProcessor(family={self.family!r}, processor={type(self.processor).__name__})"


# --------------------------------------------------------------------------------------------- loading
def _check_transformers_version() -> None:
    """The swap relies on transformers internals (a `BaseVideoProcessor` subclass builds without
    torchvision; the processors call `video_processor(videos, **videos_kwargs)`); warn, do not refuse,
    outside the tested series (v2drop.compat, the one list)."""
    from v2drop import compat

    if not compat.is_tested():
        logger.warning(
            "v2drop.processing.OfflineProcessor was written for transformers %s; found %s. Run "
            "tests/v2drop/test_processing.py before trusting its outputs.",
            ", ".join(compat.TESTED_TRANSFORMERS),
            compat.installed_version(),
        )


def _read_json(path_or_id: str | Path, filename: str, **kwargs: Any) -> dict[str, Any]:
    from transformers.utils import cached_file

    resolved = cached_file(str(path_or_id), filename, _raise_exceptions_for_missing_entries=False, **kwargs)
    return json.loads(Path(resolved).read_text()) if resolved else {}


_PROCESSOR_CLASS_FAMILY = {
    "Qwen2_5_VLProcessor": "qwen2_5_vl",
    "Qwen3VLProcessor": "qwen3_vl",
    "LlavaOnevisionProcessor": "llava_onevision",
}


def detect_family(path_or_id: str | Path, **kwargs: Any) -> str:
    """`model_type` of config.json, else the `processor_class` of the processor/preprocessor config."""
    model_type = _read_json(path_or_id, "config.json", **kwargs).get("model_type")
    if model_type in FAMILIES:
        return model_type
    for filename in ("processor_config.json", "preprocessor_config.json"):
        family = _PROCESSOR_CLASS_FAMILY.get(_read_json(path_or_id, filename, **kwargs).get("processor_class"))
        if family:
            return family
    raise ValueError(
        f"{path_or_id}: no supported processor (model_type {model_type!r}); OfflineProcessor supports "
        f"{', '.join(FAMILIES)}. Install torchvision to use transformers' own processor for other models."
    )


def _build_processor(family: str, path_or_id: str, **kwargs: Any) -> Any:
    """The real processor class around the real tokenizer, the PIL image processor and our video processor."""
    from transformers import AutoTokenizer

    real_cls, image_cls, video_cls = _classes(family)
    init_kwargs = _processor_init_kwargs(real_cls, _read_json(path_or_id, "processor_config.json", **kwargs))
    processor_cls = type(real_cls.__name__, (_AcceptFramesVideoProcessor, real_cls), {"__module__": __name__})
    return processor_cls(
        image_processor=image_cls.from_pretrained(path_or_id, **kwargs),
        tokenizer=AutoTokenizer.from_pretrained(path_or_id, **kwargs),
        video_processor=video_cls.from_pretrained(path_or_id, **kwargs),
        chat_template=_chat_template(path_or_id, **kwargs),
        **init_kwargs,
    )


def _classes(family: str) -> tuple[type, type, type]:
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, QwenVideoFramesProcessor
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen3VLProcessor, Qwen2VLImageProcessorPil, Qwen3VideoFramesProcessor
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionProcessor, LlavaOnevisionImageProcessorPil, LlavaOnevisionVideoFramesProcessor


class _AcceptFramesVideoProcessor:
    """Mixed in before the real processor class: its argument check looks the video-processor base class up
    in transformers' video-processor registry, which is a torchvision-only placeholder without torchvision."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> type:
        if argument_name == "video_processor" and isinstance(argument, _FramesVideoProcessor):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


def _processor_init_kwargs(processor_cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys of processor_config.json that the processor's __init__ takes (num_image_tokens, ...)."""
    import inspect

    parts = {"self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs"}
    accepted = set(inspect.signature(processor_cls.__init__).parameters) - parts
    return {k: v for k, v in saved.items() if k in accepted}


def _chat_template(path_or_id: str, **kwargs: Any) -> str | None:
    """chat_template.jinja, else chat_template.json, else processor_config.json, else the tokenizer's."""
    from transformers.utils import cached_file

    jinja = cached_file(path_or_id, "chat_template.jinja", _raise_exceptions_for_missing_entries=False, **kwargs)
    if jinja:
        return Path(jinja).read_text()
    for filename in ("chat_template.json", "processor_config.json"):
        template = _read_json(path_or_id, filename, **kwargs).get("chat_template")
        if template:
            return template
    return None  # the processor then falls back to tokenizer.chat_template


# --------------------------------------------------------------------------------------------- frames
def frames_to_uint8_thwc(video: Any) -> np.ndarray:
    """One decoded video -> uint8 [T, H, W, 3]. Accepts [T, H, W, C] or [T, C, H, W] numpy/torch uint8
    (C = 1 or 3; `make_batched_videos` has already turned lists of PIL frames into arrays); grey frames
    are repeated to RGB, as `do_convert_rgb` does."""
    array = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.dtype != np.uint8:
        raise TypeError(f"video frames must be uint8 (decoded pixels), got {array.dtype}")
    if array.ndim != 4:
        raise ValueError(f"a video must be 4-D [T, H, W, C] or [T, C, H, W], got shape {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3:
        raise ValueError(f"video frames need 1 or 3 channels, got shape {array.shape}")
    return array


def resize_frames(frames: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3] with PIL (the torchvision resize of the real
    video processor may differ by rounding)."""
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    resized = [np.asarray(Image.fromarray(frame).resize((width, height), resample=resample)) for frame in frames]
    return np.stack(resized)


def rescale_normalize(frames: np.ndarray, rescale_factor: float | None, mean: Any, std: Any) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W]: x * rescale_factor, then (x - mean) / std per channel
    (either step skipped when its argument is None)."""
    pixels = frames.astype(np.float32).transpose(0, 3, 1, 2)
    if rescale_factor is not None:
        pixels = pixels * np.float32(rescale_factor)
    if mean is not None:
        pixels = (pixels - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return pixels


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor` (patch * merge = 28), area within
    [min_pixels, max_pixels], aspect ratio kept. Example: (90, 120), 28, 3136, 50176 -> (84, 112)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as real_smart_resize

    return real_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_patchify(
    pixels: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [T, C, H, W] -> patches [t*h*w, C*temporal_patch*patch*patch] and grid (t, h, w).

    Frames are padded to a multiple of temporal_patch_size by repeating the last; patches are ordered
    as Qwen2VLVideoProcessor.patchify orders them (merge windows contiguous). Example: 3 frames 112x84,
    patch 14, merge 2, temporal 2 -> 4 frames, grid (2, 8, 6), patches [96, 1176]."""
    if pad := -len(pixels) % temporal_patch_size:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    frames, channels, height, width = pixels.shape
    grid = (frames // temporal_patch_size, height // patch_size, width // patch_size)
    patches = pixels.reshape(
        1, grid[0], temporal_patch_size, channels,
        grid[1] // merge_size, merge_size, patch_size, grid[2] // merge_size, merge_size, patch_size,
    )  # fmt: skip
    patches = patches.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(math.prod(grid), channels * temporal_patch_size * patch_size * patch_size), grid


# --------------------------------------------------------------------------------------------- video processors
class _FramesVideoKwargs(VideosKwargs, total=False):
    """The Qwen2VLVideoProcessor keywords (its TypedDict lives in a module that imports torchvision)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int


class _FramesVideoProcessor(BaseVideoProcessor):
    """A `BaseVideoProcessor` (so the real processor accepts it) whose `preprocess` runs on numpy + PIL.
    Class attributes mirror the torchvision class's defaults; `from_pretrained` is the inherited one, so the
    saved config is found exactly as transformers finds it (processor_config.json "video_processor", then
    video_preprocessor_config.json, then preprocessor_config.json). Each family's subclass defines
    `_pixels(videos, options)`: uint8 [T, H, W, 3] videos -> that family's pixel tensors."""

    resample = BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    rescale_factor = 1 / 255
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = False

    def preprocess(self, videos: Any, **kwargs: Any) -> BatchFeature:
        """Frames of each video -> this family's pixel tensors, plus `video_metadata` when asked
        (the Qwen processor reads the fps from it)."""
        options = self._standardize_kwargs(**self._options(kwargs))
        if options["do_sample_frames"]:
            raise ValueError(
                "OfflineProcessor takes frames already sampled (do_sample_frames=False); sample while decoding "
                "and pass video_metadata=v2drop.processing.video_metadata(frame_counts, fps)"
            )
        if options.get("do_center_crop"):
            raise ValueError("do_center_crop: OfflineProcessor video processors do not center-crop (none of these families does)")
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        batch = make_batched_videos(videos)
        metadata = make_batched_metadata(batch, video_metadata=options["video_metadata"])
        data = self._pixels([frames_to_uint8_thwc(video) for video in batch], options)
        if options["return_metadata"]:
            data["video_metadata"] = metadata
        return BatchFeature(data, tensor_type=options["return_tensors"], skip_tensor_conversion=["video_metadata"])

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every valid keyword: the call's value, else this processor's (from the saved config or class)."""
        names = self.valid_kwargs.__annotations__
        return {name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name, None) for name in names}

    def _frames_to_pixels(self, frames: np.ndarray, height: int, width: int, options: dict[str, Any]) -> np.ndarray:
        """uint8 [T, H, W, 3] -> float32 [T, 3, height, width], each step as the options say."""
        if options["do_resize"]:
            frames = resize_frames(frames, height, width, int(options["resample"]))
        rescale = options["rescale_factor"] if options["do_rescale"] else None
        mean, std = (options["image_mean"], options["image_std"]) if options["do_normalize"] else (None, None)
        return rescale_normalize(frames, rescale, mean, std)


class QwenVideoFramesProcessor(_FramesVideoProcessor):
    """Qwen2VLVideoProcessor on numpy + PIL -> pixel_values_videos [sum(t*h*w), C*2*14*14], video_grid_thw [n, 3]."""

    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    min_frames = 4
    max_frames = 768
    cap_pixels_per_frame = None
    max_video_tokens = 128000
    valid_kwargs = _FramesVideoKwargs
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs: Any) -> None:
        # As Qwen2VLVideoProcessor: legacy min_pixels / max_pixels (Qwen2.5-VL-7B's config) become size bounds.
        size = dict(kwargs.pop("size", None) or self.size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
        super().__init__(size={k: v for k, v in size.items() if k in ("shortest_edge", "longest_edge")}, **kwargs)

    def target_size(self, num_frames: int, height: int, width: int, options: dict[str, Any]) -> tuple[int, int]:
        """smart_resize with the size bounds; with `cap_pixels_per_frame` (qwen-vl-utils' total budget) the
        max per frame is min(longest_edge, 0.9 * max_video_tokens * 28**2 * 2 / T), at least 1.05 * shortest_edge."""
        size, factor = options["size"], options["patch_size"] * options["merge_size"]
        max_pixels = size.longest_edge
        if options["cap_pixels_per_frame"]:
            total = int(options["max_video_tokens"] * factor * factor * 0.9)
            per_frame = total * options["temporal_patch_size"] // num_frames
            max_pixels = max(min(max_pixels, per_frame), int(size.shortest_edge * 1.05))
        return smart_resize(height, width, factor, size.shortest_edge, max_pixels)

    def _pixels(self, videos: list[np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
        patches, grids = [], []
        for frames in videos:
            height, width = frames.shape[1:3]
            if options["do_resize"]:
                height, width = self.target_size(len(frames), height, width, options)
            pixels = self._frames_to_pixels(frames, height, width, options)
            sizes = options["patch_size"], options["temporal_patch_size"], options["merge_size"]
            video_patches, grid = qwen_patchify(pixels, *sizes)
            patches.append(torch.from_numpy(np.ascontiguousarray(video_patches)))
            grids.append(grid)
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}


class Qwen3VideoFramesProcessor(QwenVideoFramesProcessor):
    """Qwen3VLVideoProcessor on numpy + PIL -> pixel_values_videos [sum(t*h*w), C*2*16*16], video_grid_thw [n, 3].

    Differs from Qwen2-VL's in patch 16 (sides multiples of 32), mean/std 0.5, and a pixel budget
    over the whole video (t * h * w) rather than per frame."""

    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16
    max_video_tokens = 768

    def target_size(self, num_frames: int, height: int, width: int, options: dict[str, Any]) -> tuple[int, int]:
        """Qwen3-VL's video smart_resize; with `cap_pixels_per_frame` the budget per frame is
        max(min(max_video_tokens * 32**2, longest_edge / T), 1.05 * shortest_edge)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as video_smart_resize

        size, factor = options["size"], options["patch_size"] * options["merge_size"]
        max_pixels = size.longest_edge
        if options["cap_pixels_per_frame"]:
            per_frame = max(min(options["max_video_tokens"] * factor * factor, size.longest_edge // num_frames),
                            int(size.shortest_edge * 1.05))
            max_pixels = per_frame * num_frames
        return video_smart_resize(num_frames, height, width, temporal_factor=options["temporal_patch_size"],
                                  factor=factor, min_pixels=size.shortest_edge, max_pixels=max_pixels)


class LlavaOnevisionVideoFramesProcessor(_FramesVideoProcessor):
    """LlavaOnevisionVideoProcessor on numpy + PIL -> pixel_values_videos, one [T, C, H, W] per video
    (stacked to [n, T, C, H, W] by the processor's BatchFeature, so frame counts must agree)."""

    size = {"height": 384, "width": 384}
    default_to_square = False
    model_input_names = ["pixel_values_videos"]

    def _pixels(self, videos: list[np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
        size = options["size"]
        if options["do_resize"] and not (size.height and size.width):
            raise ValueError(f"OfflineProcessor needs a LLaVA-OneVision video size with height and width, got {size}")
        frame_counts = [len(frames) for frames in videos]
        if options["return_tensors"] and len(set(frame_counts)) > 1:
            raise ValueError(
                f"LLaVA-OneVision takes one [n, T, C, H, W] video tensor: every video of a batch needs the same "
                f"number of frames, got {frame_counts}; decode a fixed num_frames or batch by frame count"
            )
        pixels = [
            self._frames_to_pixels(frames, size.height or frames.shape[1], size.width or frames.shape[2], options)
            for frames in videos
        ]
        return {"pixel_values_videos": [torch.from_numpy(p) for p in pixels]}
