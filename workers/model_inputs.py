"""From clip rows to model inputs: frames from bytes, prompts per clip, one padded batch.

Columns read from each clip row (written by the decode stage):
    frames        bytes        raw frame pixels, C order
    frames_shape  [T, H, W, 3] shape of `frames`
    frames_dtype  'uint8'      numpy dtype name of `frames`
    timestamps_s  [T] float    time of each frame in the source video; gives the sampling fps
    questions     [str] | None optional, manifest rows: extra questions for task=qa

Worked example (task=qa, prompt.questions = ["What happens?"], one row with
questions=["Who speaks?"]): `expand_prompts` yields two items, (row, "What happens?") and
(row, "Who speaks?"); `build_inputs` turns them into one left-padded batch of two sequences,
each holding its own copy of the clip's video tokens.

The processor may work on the model's GPU (`device`): workers.device_inputs says why and when.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm.processing import sampled_video_metadata
from workers.rows import Row
from workers.settings import PromptConfig

if TYPE_CHECKING:  # the driver imports this module: no torch at run time
    import torch

FRAME_COLUMNS = ("frames", "frames_shape", "frames_dtype", "timestamps_s")
_FALLBACK_FPS = 1.0  # only when a row carries neither >= 2 timestamps nor a clip duration

Item = tuple[Row, str]  # (clip row, prompt text): one model sequence, one output row


def decode_frames(row: Mapping[str, Any]) -> np.ndarray:
    """The clip's frames as a [T, H, W, 3] array viewing the row's bytes (no copy).

    Raises ValueError naming the column when the bytes do not hold the declared shape.
    """
    raw = row.get("frames")
    if raw is None:
        raise ValueError("frames: the row has no frame bytes")
    if row.get("frames_shape") is None:
        raise ValueError("frames_shape: the row has frame bytes but no shape")
    shape = tuple(int(d) for d in np.asarray(row["frames_shape"]).reshape(-1))
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"frames_shape: expected [T, H, W, 3] with T, H, W >= 1, got {list(shape)}")
    dtype = np.dtype(str(row.get("frames_dtype") or "uint8"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"frames: {len(raw)} bytes do not hold frames_shape {list(shape)} of {dtype} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def clip_fps(row: Mapping[str, Any]) -> float:
    """Frames per second of the sampled frames (not of the source video).

    Qwen2.5-VL turns it into `second_per_grid_ts` (temporal patch / fps), which spaces the
    temporal M-RoPE ids. Example: 16 frames at 0.3125, 0.9375, ..., 9.6875 s -> 15 / 9.375 = 1.6.
    """
    timestamps = np.asarray(row.get("timestamps_s") if row.get("timestamps_s") is not None else [], float)
    if timestamps.size >= 2 and timestamps[-1] > timestamps[0]:
        return float((timestamps.size - 1) / (timestamps[-1] - timestamps[0]))
    start, end = row.get("start_s"), row.get("end_s")
    if start is not None and end is not None and float(end) > float(start):
        num_frames = int(np.asarray(row.get("frames_shape"))[0])
        return num_frames / (float(end) - float(start))
    return _FALLBACK_FPS


def row_questions(row: Mapping[str, Any]) -> list[str]:
    """A manifest row's own `questions` (a list, an array, or one string)."""
    value = row.get("questions")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    return [str(q) for q in value if q is not None and str(q).strip()]  # a blank one would take the key of prompt 


def expand_prompts(batch_rows: Sequence[Row], prompt_cfg: PromptConfig) -> list[Item]:
    """One item per (clip, prompt): caption -> the caption prompt; qa -> every configured question
    then the row's own, without repeats (the output key is (clip_id, prompt))."""
    items: list[Item] = []
    for row in batch_rows:
        for prompt in prompts_for_row(row, prompt_cfg):
            items.append((row, prompt))
    return items


def prompts_for_row(row: Mapping[str, Any], prompt_cfg: PromptConfig) -> list[str]:
    if prompt_cfg.task == "caption":
        return [prompt_cfg.caption]
    # qa (PromptConfig allows no other task): the job's questions, then the row's own, once each
    return list(dict.fromkeys([str(q) for q in prompt_cfg.questions] + row_questions(row)))


def chat_text(processor: Any, prompt: str, system: str | None) -> str:
    """The model's own chat template with one video before the prompt (visual prefix first, so the
    V²Drop kept set does not depend on the question)."""
    messages = [] if not system else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def video_metadata(row: Mapping[str, Any], frames: np.ndarray) -> dict[str, Any]:
    """What the video processor needs about the clip's frames, which the decode stage already
    sampled: their count and their rate, from the decoded timestamps (vlm.processing explains)."""
    num_frames, height, width, _ = frames.shape
    return sampled_video_metadata(num_frames, clip_fps(row), height=height, width=width)


def build_inputs(processor: Any, items: Sequence[Item], system: str | None = None,
                 device: torch.device | None = None) -> Any:
    """One left-padded BatchFeature for `items` (see `process`)."""
    return process(processor, [chat_text(processor, prompt, system) for _, prompt in items],
                   [row for row, _ in items], device)


def process(processor: Any, texts: Sequence[str], rows: Sequence[Row], device: torch.device | None = None) -> Any:
    """One left-padded BatchFeature of `texts`, each with its row's video, holding everything the
    processor returns (input_ids, attention_mask, pixel_values_videos, video_grid_thw,
    second_per_grid_ts, mm_token_type_ids for Qwen2.5-VL): the model needs all of them for correct
    3-D positions. `device`: where the video processor works and leaves the pixel values
    (workers.device_inputs); None: the CPU."""
    processor.tokenizer.padding_side = "left"
    videos = [np.array(decode_frames(row)) for row in rows]  # writable copy for torch
    metadata = [video_metadata(row, video) for row, video in zip(rows, videos)]
    on_device = {} if device is None else {"device": str(device)}
    return processor(text=list(texts), videos=videos, video_metadata=metadata, do_sample_frames=False,
                     padding=True, return_tensors="pt", **on_device)
