"""Tiny real-architecture models and hand-built multimodal batches: for the engine's tests and for
its run-time self-check (`v2drop.self_check`), which is why they live in a package, not in tests/.

Inputs are built the way the families' processors build them (chat template, one placeholder
token per visual feature, left padding, `mm_token_type_ids`, `second_per_grid_ts`), with random
pixel values: the engine never looks at pixels, only at the hidden states they produce. Two input
layouts exist: Qwen-style (flattened patches + grids, `temporal_patch_size` 2) and LLaVA-OneVision's
([n, T, C, H, W] frames); the family's row says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from vlm import tiny
from vlm.families import FAMILIES


@dataclass(frozen=True)
class Visual:
    kind: str  # "video" | "image"
    grid: tuple[int, int, int]  # Qwen: (t, h, w) in patches; LLaVA-OV video: (frames, 0, 0)


@dataclass(frozen=True)
class Sample:
    question: str
    visual: Visual | None


@cache
def tokenizer(family: str):
    return tiny.build_tokenizer(family)


def model(family: str, *, num_layers: int = 8, dtype=torch.float32, attn: str = "sdpa", seed: int = 0):
    config = tiny.build_config(family, tokenizer(family), num_layers=num_layers)
    built = tiny.build_model(config, seed=seed).to(dtype)
    built.config._attn_implementation = attn
    for sub in (built.config.text_config, built.config.vision_config):
        sub._attn_implementation = attn
    return built


def num_visual_tokens(family: str, visual: Visual | None) -> int:
    if visual is None:
        return 0
    if FAMILIES[family].patch_grid_inputs:
        t, h, w = visual.grid
        return t * h * w // 4  # spatial merge 2x2
    frames = visual.grid[0]
    return frames * 4 * 4 + 1  # 8x8 SigLIP patches pooled 2x2 per frame, plus one newline


def _placeholder(family: str, kind: str) -> str:
    row = FAMILIES[family]
    return row.video_token if kind == "video" else row.image_token


def _prompt_text(family: str, sample: Sample) -> str:
    content = [{"type": "text", "text": sample.question}]
    if sample.visual is not None:
        content.insert(0, {"type": sample.visual.kind})
    text = tokenizer(family).apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if sample.visual is None:
        return text
    marker = _placeholder(family, sample.visual.kind)
    if FAMILIES[family].timestamped_video_spans and sample.visual.kind == "video":
        # Qwen3-VL's processor gives each temporal patch its own span behind a timestamp.
        t, h, w = sample.visual.grid
        frame = marker * (h * w // 4)
        frames = "<|vision_end|>".join(f"<{k:.1f} seconds><|vision_start|>{frame}" for k in range(t))
        return text.replace(f"<|vision_start|>{marker}", frames, 1)
    return text.replace(marker, marker * num_visual_tokens(family, sample.visual), 1)


def batch(family: str, samples: list[Sample], *, seed: int = 0) -> dict:
    """Left-padded inputs for `samples`, as the family's processor would return them."""
    tok = tokenizer(family)
    ids = [tok(_prompt_text(family, s))["input_ids"] for s in samples]
    length = max(len(i) for i in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(i)) + i for i in ids])
    attention_mask = torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i in ids])
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    visuals = [s.visual for s in samples if s.visual is not None]
    if FAMILIES[family].patch_grid_inputs:
        inputs.update(_patch_grid_inputs(family, tok, input_ids, visuals, generator))
    elif visuals:
        frames = visuals[0].grid[0]
        assert all(v.kind == "video" and v.grid[0] == frames for v in visuals), "LLaVA-OV: same-length videos"
        inputs["pixel_values_videos"] = torch.randn(len(visuals), frames, 3, 112, 112, generator=generator)
    return inputs


def _patch_grid_inputs(family: str, tok, input_ids, visuals: list[Visual], generator) -> dict:
    row = FAMILIES[family]
    video_id = tok.convert_tokens_to_ids(row.video_token)
    image_id = tok.convert_tokens_to_ids(row.image_token)
    out = {"mm_token_type_ids": (input_ids == image_id).int() + 2 * (input_ids == video_id).int()}
    for kind, prefix in (("video", "_videos"), ("image", "")):
        grids = [v.grid for v in visuals if v.kind == kind]
        if grids:
            patches = sum(t * h * w for t, h, w in grids)
            out[f"pixel_values{prefix}"] = torch.randn(patches, row.patch_dim, generator=generator)
            out[f"{kind}_grid_thw"] = torch.tensor(grids)
    if row.second_per_grid_ts and any(v.kind == "video" for v in visuals):
        out["second_per_grid_ts"] = torch.tensor([1.0] * sum(v.kind == "video" for v in visuals))
    return out


def select(inputs: dict, family: str, samples: list[Sample], index: int) -> dict:
    """The inputs of sample `index` alone (unpadded), rebuilt with the same pixels."""
    single = batch(family, [samples[index]])
    visual = samples[index].visual
    if visual is None:
        return single
    # Reuse the batch's pixels for this sample so its outputs can be compared.
    order = [i for i, s in enumerate(samples) if s.visual is not None]
    position = order.index(index)
    if FAMILIES[family].patch_grid_inputs:
        kind = visual.kind
        same_kind = [i for i in order if (v := samples[i].visual) is not None and v.kind == kind]
        prefix = "_videos" if kind == "video" else ""
        sizes = [_patches(v) for i in same_kind if (v := samples[i].visual) is not None]
        start = sum(sizes[: same_kind.index(index)])
        single[f"pixel_values{prefix}"] = inputs[f"pixel_values{prefix}"][start : start + sizes[same_kind.index(index)]]
    else:
        single["pixel_values_videos"] = inputs["pixel_values_videos"][position : position + 1]
    return single


def _patches(visual: Visual) -> int:
    t, h, w = visual.grid
    return t * h * w
