"""The shadow sample: a few clips also run with V²Drop off, in the same actor, to price the drop.

`quality.shadow_fraction` of the clips (0.02 by default) is chosen by a hash of the clip id, so a
resumed run, or another actor, picks the same clips (`in_sample`). After the batch's own
generate, each chosen (clip, prompt) item is run again on the same inputs with the same sampling
settings:

1. one forward over the prompt with V²Drop as configured: the dropped model's next-token logits;
2. V²Drop off (`v2drop_off`), one `generate`: the full-token output, whose first-step logits are
   caught on the way out of the LM head (`FirstLogits`), so the full model's prefill runs once.

The measures (workers.agreement) compare the row's own (dropped) output text with the full-token
one, and the two first-token distributions. All of a clip's prompts are in or out together.

Columns added to a chosen row (null on every other row; pipeline.schema):
    shadow_output_text      the full-token output
    shadow_exact_match, shadow_token_f1, shadow_lcs_ratio, shadow_first_diff_word   (text)
    shadow_top1_agree, shadow_kl_first_token                                        (first token)
    shadow_ms               the shadow's wall time, an equal share per item of its call
    shadow_flops            analytic prefill FLOPs the shadow spent on the item: the dropped
                            forward (1.) plus the full-token prefill (2.)

With V²Drop off for the whole run (retention 1.0) both passes run the stock model, and the
measures say the outputs agree. With `model.scorer: random`, switching V²Drop back on re-seeds its
generator, so the random kept sets after a shadow call restart from the seed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

import v2drop
from workers import agreement
from workers.device_inputs import timed_inputs
from workers.generation import generate_batch
from workers.model_inputs import Item, build_inputs, decode_frames
from workers.rows import GenResult
from workers.settings import GenerationConfig

log = logging.getLogger(__name__)

Reenable = Callable[[Any], None]  # switches V²Drop back on for a model, as the run configured it


def sample_draw(clip_id: str) -> float:
    """The clip's fixed draw in [0, 1): the first 8 bytes of sha256(clip_id) over 2**64."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") / 2**64


def in_sample(clip_id: str, fraction: float) -> bool:
    """Is this clip in the shadow sample? Deterministic, and independent of the batch and actor.
    Example: fraction 0.02 takes about 2 clips in 100; 0 takes none, 1 takes all."""
    return fraction > 0 and sample_draw(clip_id) < fraction


@contextmanager
def v2drop_off(model: Any, reenable: Reenable) -> Iterator[None]:
    """The stock model inside the block; V²Drop back on after it (if it was on), even on error."""
    was_on = v2drop.is_enabled(model)
    if was_on:
        v2drop.disable(model)
    try:
        yield
    finally:
        if was_on:
            reenable(model)


class FirstLogits:
    """Holds the LM head's first output inside a `with` block: in `generate`, the prefill's
    next-token logits. `logits` is [B, V], the last position of each row (left padding puts every
    row's last prompt token there)."""

    def __init__(self, model: Any) -> None:
        self.head = model.get_output_embeddings()
        self.logits: torch.Tensor | None = None

    def __enter__(self) -> FirstLogits:
        self._handle = self.head.register_forward_hook(self._catch)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _catch(self, module: Any, args: Any, output: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = output[:, -1, :].detach().float()


def dropped_first_logits(model: Any, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, list[float]]:
    """One prefill forward with the model as it runs (V²Drop on if enabled): the [B, V] logits of
    the next token, and each row's analytic prefill FLOPs (v2drop.prefill_stats)."""
    marker = v2drop.stats_marker(model)
    with torch.inference_mode():
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    stats = v2drop.prefill_stats(model, inputs["input_ids"], inputs["attention_mask"], marker)
    return out.logits[:, -1, :].float(), [s.flops_dropped for s in stats]


def compare(
    model: Any, processor: Any, items: Sequence[Item], dropped_texts: Sequence[str | None], system: str | None,
    generation_cfg: GenerationConfig, reenable: Reenable, device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Shadow columns for `items` (one model call: equal frame counts where the family needs it),
    whose dropped outputs were `dropped_texts`; see the module docstring. `device`: where the video
    processor works (workers.device_inputs)."""
    started = time.perf_counter()
    inputs, _ = timed_inputs(model, lambda: build_inputs(processor, items, system, device))
    dropped_logits, dropped_flops = dropped_first_logits(model, inputs)
    with v2drop_off(model, reenable), FirstLogits(model) as first:
        full = generate_batch(model, processor, inputs, generation_cfg)
    if first.logits is None:
        raise RuntimeError("shadow: the LM head never ran during generate")
    share_ms = (time.perf_counter() - started) * 1000.0 / len(items)
    top1 = agreement.top1_agree(first.logits, dropped_logits.to(first.logits.device))
    kl = agreement.kl_full_dropped(first.logits, dropped_logits.to(first.logits.device))
    return [
        row_columns(result, dropped, top1[i], kl[i], share_ms, dropped_flops[i])
        for i, (result, dropped) in enumerate(zip(full, dropped_texts))
    ]


def row_columns(
    full: GenResult, dropped_text: str | None, top1: bool, kl: float, ms: float, dropped_flops: float
) -> dict[str, Any]:
    """One shadowed item's columns: `full` is its full-token result, `dropped_text` the row's own output."""
    return {
        "shadow_output_text": full.output_text,
        **agreement.text_measures(full.output_text, dropped_text),
        "shadow_top1_agree": top1,
        "shadow_kl_first_token": kl,
        "shadow_ms": ms,
        "shadow_flops": float(full.flops_full or 0.0) + float(dropped_flops),
    }


def shadow_columns(
    model: Any, processor: Any, items: Sequence[Item], results: Sequence[GenResult], system: str | None,
    generation_cfg: GenerationConfig, *, fraction: float, reenable: Reenable, chunk: int,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Per item, its shadow columns ({} when not in the sample, or when its own generate failed).

    Chosen items run in calls of at most `chunk` items with one frame count each (LLaVA-OneVision
    stacks a call's videos into one tensor; the shadow sample is small, so the cost is small).
    A failing shadow call is logged and leaves its rows' shadow columns null: the guard never
    costs a row its output.
    """
    chosen = [i for i, ((row, _), result) in enumerate(zip(items, results))
              if result.status == "ok" and in_sample(str(row.get("clip_id")), fraction)]
    columns: list[dict[str, Any]] = [{} for _ in items]
    for call in calls_by_frame_count(items, chosen, chunk):
        try:
            measured = compare(model, processor, [items[i] for i in call], [results[i].output_text for i in call],
                               system, generation_cfg, reenable, device)
        except Exception as error:  # noqa: BLE001 - the shadow must not fail the rows it shadows
            log.warning("shadow call of %d items failed: %s: %s", len(call), type(error).__name__, error)
            continue
        for i, values in zip(call, measured):
            columns[i] = values
    return columns


def calls_by_frame_count(items: Sequence[Item], chosen: Sequence[int], chunk: int) -> list[list[int]]:
    """`chosen` grouped by frame count, then cut into calls of at most `chunk`.
    Example: frame counts {0: 4, 2: 8, 3: 4}, chosen [0, 2, 3], chunk 1 -> [0], [3], [2]."""
    groups: dict[int, list[int]] = {}
    for index in chosen:
        groups.setdefault(decode_frames(items[index][0]).shape[0], []).append(index)
    return [group[start : start + chunk] for group in groups.values() for start in range(0, len(group), chunk)]
