"""A model call's inputs on the model's device, built there when the processor allows it.

Its resize, normalize and patchify are passes over float32
copies of the frames: on one CPU thread, 115-215 ms per Qwen2.5-VL clip of 16 frames at 448x448
(1 to 64 clips per call; bench/results/inputs-cpu.md), as long as or longer than the clip's whole
model time on an H200 (114.5 ms), and the GPU waits meanwhile: the model actor runs them before
each call. On a GPU they run there (`inputs_device`): the uint8 frames are copied over and the
float work is a few kernels. `device_disagreement` checks once per actor that the GPU's inputs
are the CPU's: tokens and grids equal, pixels within one level of the 8-bit frames (a resize to
the patch grid rounds floats on the GPU where the CPU's uint8 kernel uses fixed point: about 0.2 %
of pixels differ by one level; frames already at the grid size give the same bits). The float
work peaks at about three float32 copies of the call's pixels (115 MB per such clip), freed
before the model runs and below one prefill layer's activations per clip (v2drop.memory), so the
memory-sized calls stand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from workers.model_inputs import chat_text, process
from workers.rows import Row

log = logging.getLogger(__name__)


def move_inputs(inputs: Any, model: Any) -> dict[str, Any]:
    """Tensors to the model's device; pixel values also to its dtype (ids and grids stay integer)."""
    moved = {}
    for name, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device)
            if name.startswith("pixel_values"):
                value = value.to(model.dtype)
        moved[name] = value
    return moved


def timed_inputs(model: Any, make: Callable[[], Any]) -> tuple[dict[str, Any], float]:
    """`move_inputs(make(), model)` and its wall time in ms, to the end of the device's work. Only
    the moved inputs outlive the call: float32 pixel values built on the GPU are freed before the
    model runs."""
    started = time.perf_counter()
    inputs = move_inputs(make(), model)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return inputs, (time.perf_counter() - started) * 1000.0


def inputs_device(model: Any, processor: Any) -> torch.device | None:
    """Where the model stage builds its inputs: the model's GPU when the processor's inputs there are
    the CPU's (`device_disagreement`), else None (the CPU; why is logged)."""
    if model.device.type != "cuda":
        return None
    problem = device_disagreement(processor, model.device)
    if problem is not None:
        log.warning("video inputs are built on the CPU: %s", problem)
        return None
    return model.device


def device_disagreement(processor: Any, device: torch.device) -> str | None:
    """Why the processor's inputs built on `device` are not the CPU's, or None when they agree:
    every non-pixel tensor equal, pixel values within one level of the 8-bit frames (module
    docstring). Checked on two seeded clips of 4 frames, one at a size the processor resizes."""
    rows = [noise_clip_row(4, height, width, seed) for seed, (height, width) in enumerate(((100, 150), (112, 112)))]
    texts = [chat_text(processor, "Describe this video.", None)] * len(rows)
    try:
        on_cpu, on_device = process(processor, texts, rows), process(processor, texts, rows, device)
        for name, expected in on_cpu.items():
            problem = _tensor_disagreement(name, expected, on_device.get(name), one_level(processor))
            if problem is not None:
                return f"{problem} when built on {device}"
    except Exception as error:  # noqa: BLE001 - any failure there means: build on the CPU
        return f"the processor failed on {device} ({type(error).__name__}: {error})"
    return None


def noise_clip_row(num_frames: int, height: int, width: int, seed: int) -> Row:
    """A decoded clip row of seeded noise frames, 0.5 s apart (the check above; bench_inputs)."""
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    return {"frames": frames.tobytes(), "frames_shape": list(frames.shape), "frames_dtype": "uint8",
            "timestamps_s": [0.5 * (i + 1) for i in range(num_frames)]}


def _tensor_disagreement(name: str, expected: Any, got: Any, level: float) -> str | None:
    if not isinstance(expected, torch.Tensor):
        return None if expected == got else f"{name} differs"
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        return f"{name} differs in shape or dtype"
    got = got.cpu()
    if not name.startswith("pixel_values"):
        return None if torch.equal(got, expected) else f"{name} differs"
    levels = float((got.double() - expected.double()).abs().max()) / level if expected.numel() else 0.0
    return None if levels <= 1.001 else f"{name} differs by {levels:.2f} levels of the 8-bit frames"


def one_level(processor: Any) -> float:
    """One step of the 8-bit input in the processor's normalized units: rescale / std."""
    video = processor.video_processor
    std = np.min(np.atleast_1d(video.image_std)) if video.do_normalize else 1.0
    return float((video.rescale_factor if video.do_rescale else 1.0) / std)
