"""The families' real Hugging Face processors, plus the one thing the project adds: the metadata of
frames it sampled itself.

The decode stage samples and decodes the frames (pipeline.video), so the processor must not sample
again (`do_sample_frames=False`) and needs to be told the rate the frames were taken at: Qwen2.5-VL
turns it into `second_per_grid_ts` (temporal_patch_size / fps, the spacing of its temporal M-RoPE
ids) and Qwen3-VL writes each temporal patch's time (frames_indices / fps) into the prompt. Without
`video_metadata` both assume 24 fps.

    processor = load_processor("Qwen/Qwen2.5-VL-7B-Instruct")       # or a `vlm.tiny` directory
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], videos=[frames_thwc_uint8], do_sample_frames=False, padding=True,
                       video_metadata=[sampled_video_metadata(len(frames_thwc_uint8), fps=2.0)])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_processor(path_or_id: str | Path, *, padding_side: str = "left", **kwargs: Any) -> Any:
    """The checkpoint's own processor (`AutoProcessor`), padding on `padding_side` ("left" for
    generation: every sample's last prompt token sits at the end, where generate appends).
    `kwargs` (revision, cache_dir, ...) reach `from_pretrained`."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path_or_id, **kwargs)
    processor.tokenizer.padding_side = padding_side
    log.info("vlm.processing: %s for %s", type(processor).__name__, path_or_id)
    return processor


def sampled_video_metadata(num_frames: int, fps: float, *, height: int | None = None,
                           width: int | None = None) -> dict[str, Any]:
    """`video_metadata` of one video whose `num_frames` frames were already sampled at `fps`.

    Example: (4, 2.0) -> frames at 0, 0.5, 1.0, 1.5 s; Qwen2.5-VL's second_per_grid_ts = 2 / 2.0 = 1.0."""
    if num_frames < 1 or not fps > 0:
        raise ValueError(f"sampled_video_metadata needs num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    return {"total_num_frames": num_frames, "fps": float(fps), "frames_indices": list(range(num_frames)),
            "height": height, "width": width}
