"""The caption / QA stage: a Ray Data actor class and the pure functions it delegates to.

    ds.map_batches(Captioner, fn_constructor_args=(cfg.model, cfg.generation, cfg.prompt, cfg.quality, cfg.actors),
                   batch_size=actors.batch_size, num_gpus=actors.num_gpus, concurrency=(min, max))

It takes the typed config sections of workers.settings (picklable dataclasses), never dicts.

Cardinality: 1:N. A clip row becomes one row per prompt (caption: 1; qa: one per question);
a row whose incoming `status` is not 'ok' (an upstream 'error' or 'skipped') passes through as
one row with prompt '' (pipeline.schema: '' marks a clip-level row; prompt is never null).
Clips in the shadow sample (`quality.shadow_fraction`, workers.shadow) also run with V²Drop off;
their rows carry the full-token output and the agreement measures (shadow.SHADOW_COLUMNS).

Columns in: every column of the clip row; read are `frames`, `frames_shape`, `frames_dtype`,
`timestamps_s` (see workers.inputs), optional `questions`, `status`.
Columns out: every input column except `frames` (bytes stay out of the written blocks), then
OUTPUT_COLUMNS below. `status` is 'ok' or 'error'; a failed row says why in `error` with
`error_stage` 'model' (bad frame bytes, a processor or generate failure, an OOM at batch size 1).

Failure handling: a failing batched generate is retried item by item so one bad clip costs
only its own rows; a CUDA out-of-memory error halves the batch and retries both halves. Rows
made by such a retry say so (`fallback_reason`, and `fallback_batch_id`: the failed call), so the
run summary counts the failed calls per reason.

Model loading runs `v2drop.self_check` once per actor: a failure fails the actor's construction
(the driver exits 3) instead of writing rows. Every row carries the provenance columns of
`workers.provenance` (versions, engine fingerprint, schedule, attention, dtype, self-check).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import v2drop
from vlm.families import needs_equal_frame_count
from workers import shadow, shared_prefix
from workers.call_size import CallSizer, call_sizer, memory_budget_bytes
from workers.generation import GenResult, generate_batch
from workers.inputs import Item, Row, build_inputs, decode_frames, expand_prompts, prompts_for_row
from workers.loading import ResolvedModel, choose_device, load_model, resolve_model_source
from workers.provenance import engine_columns, engine_fingerprint
from workers.settings import ActorsConfig, GenerationConfig, ModelConfig, PromptConfig, QualityConfig

__all__ = ["Captioner", "caption_rows", "expand_prompts", "build_inputs", "generate_batch", "OUTPUT_COLUMNS"]

log = logging.getLogger(__name__)

ERROR_STAGE = "model"
CLIP_LEVEL_PROMPT = ""  # rows about the whole clip (passthrough, unusable frames), not one prompt
DROPPED_INPUT_COLUMNS = ("frames",)
OUTPUT_COLUMNS = (
    "prompt",
    "output_text",
    "status",
    "error",
    "error_stage",
    "model_id",
    "model_revision",
    "model_random_weights",
    "retention_asked",
    "retention_achieved",
    "visual_tokens_per_stage",
    "prompt_tokens",
    "output_tokens",
    "prefill_ms",
    "generate_ms",
    "flops_full",
    "flops_dropped",
    "peak_memory_bytes",
    "worker_host",
    "started_at",
    "finished_at",
    "batch_id",
    "fallback_reason",
    "fallback_batch_id",
    *shadow.SHADOW_COLUMNS,
)


@dataclass
class LoadedModel:
    """A model ready to caption, and the identity stamped on each of its output rows."""

    model: Any
    processor: Any
    resolved: ResolvedModel
    retention_asked: float  # model.retention; 1.0 = V²Drop off, the stock model
    provenance: dict[str, Any]  # workers.provenance.engine_columns: stamped on every row
    scorer: str = "variation"  # model.scorer: how V²Drop ranks visual tokens (v2drop.SCORERS)
    sizer: CallSizer | None = None  # rows per model call from a memory budget; None: actors.batch_size alone


class Captioner:
    """Ray Data actor: loads the model once in __init__, then captions batches of clip rows."""

    def __init__(
        self,
        model: ModelConfig,
        generation: GenerationConfig,
        prompt: PromptConfig,
        quality: QualityConfig | None = None,
        actors: ActorsConfig | None = None,
        *,
        storage: Any = None,
    ) -> None:
        """`quality` None: no shadow guard; `actors` None: its defaults (a GPU when one is visible).
        `storage` is the picklable pipeline.storage.Storage, needed only for an s3:// model.source."""
        self.generation, self.prompt, self.quality = generation, prompt, quality
        actors = actors or ActorsConfig()
        fingerprint = engine_fingerprint(model, generation, prompt.system)
        self.loaded = load_for_captioning(model, storage, actors.num_gpus, fingerprint)
        loaded_model = self.loaded.model
        budget = memory_budget_bytes(loaded_model.device, actors.memory_fraction, actors.memory_budget_gib)  # after loading
        self.loaded.sizer = call_sizer(loaded_model, v2drop.schedule_of(loaded_model), generation.max_new_tokens, budget)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows = batch_to_rows(batch)
        return rows_to_columns(caption_rows(self.loaded, rows, self.prompt, self.generation, self.quality))


def load_for_captioning(
    model_cfg: ModelConfig, storage: Any = None, num_gpus: float | None = None, fingerprint: str | None = None,
) -> LoadedModel:
    """Resolve, load, switch V²Drop on when model.retention < 1, and self-check the engine.
    `fingerprint` (workers.provenance.engine_fingerprint) is stamped on every row."""
    resolved = resolve_model_source(
        model_cfg.source, revision=model_cfg.revision, cache_dir=model_cfg.cache_dir, storage=storage
    )
    model, processor = load_model(
        resolved,
        dtype=model_cfg.dtype,
        attn_implementation=model_cfg.attn_implementation,
        device=choose_device(num_gpus),
    )
    v2drop.vision.install(model)  # batched window attention on sdpa towers, stock and V²Drop alike
    retention, scorer = model_cfg.retention, model_cfg.scorer
    enable_v2drop(model, retention, scorer)
    # Also at retention 1.0: the row says which engine produced it, and a broken stack fails here.
    check = v2drop.self_check(model)
    log.info("v2drop self-check %s", check.describe())
    return LoadedModel(model, processor, resolved, retention, engine_columns(model, fingerprint, check.describe()), scorer)


def enable_v2drop(model: Any, retention: float, scorer: str = "variation") -> None:
    """Retention 1.0 leaves the stock model alone; below it, the layer-averaged schedule."""
    if retention >= 1.0:
        return
    num_layers = model.config.get_text_config().num_hidden_layers
    schedule = v2drop.Schedule.for_retention(num_layers, retention)
    v2drop.enable(model, schedule, scorer=scorer)
    log.info("V²Drop on (%s): %s over %d layers (retention %.3f)", scorer, schedule, num_layers, retention)


# -- pure functions: rows in, rows out --------------------------------------------------------


def caption_rows(
    loaded: LoadedModel, rows: Sequence[Row], prompt_cfg: PromptConfig, generation_cfg: GenerationConfig,
    quality_cfg: QualityConfig | None = None,
) -> list[Row]:
    """Output rows for a batch of clip rows, in input order (see the module docstring)."""
    started_at = utc_now()
    plan = [(row, None if is_passthrough(row) else row_problem(row, prompt_cfg)) for row in rows]
    runnable = [row for row, problem in plan if problem is None and not is_passthrough(row)]
    items = expand_prompts(runnable, prompt_cfg)
    chunk = max(1, len(rows))
    generated = run_items(loaded, items, prompt_cfg.system, generation_cfg, chunk=chunk)
    shadows = iter(run_shadow(loaded, items, generated, prompt_cfg.system, generation_cfg, quality_cfg, chunk))
    results = iter(generated)
    finished_at = utc_now()
    stamp = {**identity_columns(loaded), "started_at": started_at, "finished_at": finished_at}
    out: list[Row] = []
    for row, problem in plan:
        if is_passthrough(row):
            out.append(passthrough_row(row))
        elif problem is not None:
            out.append(result_row(row, CLIP_LEVEL_PROMPT, GenResult(status="error", error=problem), stamp))
        else:
            out.extend({**result_row(row, prompt, next(results), stamp), **next(shadows)}
                       for prompt in prompts_for_row(row, prompt_cfg))
    return out


def run_shadow(
    loaded: LoadedModel, items: Sequence[Item], results: Sequence[GenResult], system: str | None,
    generation_cfg: GenerationConfig, quality_cfg: QualityConfig | None, chunk: int,
) -> list[Row]:
    """Per item, the shadow columns of workers.shadow ({} outside the sample); the shadow runs
    after the batch's own generate, so the row's timings do not include it. No quality section:
    no shadow."""
    fraction = quality_cfg.shadow_fraction if quality_cfg is not None else 0.0
    return shadow.shadow_columns(
        loaded.model, loaded.processor, items, results, system, generation_cfg, fraction=fraction, chunk=chunk,
        reenable=lambda model: enable_v2drop(model, loaded.retention_asked, loaded.scorer),
    )


def is_passthrough(row: Mapping[str, Any]) -> bool:
    """Rows failed or skipped upstream are written as they came (their error is the first one)."""
    return row.get("status") not in (None, "ok")


def row_problem(row: Mapping[str, Any], prompt_cfg: PromptConfig) -> str | None:
    """Why this stage cannot use the row (bad frames, no question), or None to run it."""
    try:
        decode_frames(row)
    except (ValueError, TypeError) as error:
        return str(error)
    if not prompts_for_row(row, prompt_cfg):
        return "prompt: task qa has no questions for this clip (prompt.questions is empty and the row has none)"
    return None


def run_items(
    loaded: LoadedModel, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig, chunk: int
) -> list[GenResult]:
    """Results for `items` in order, at most `chunk` clips per generate call.

    With `generation.share_video_prefix` (the default), each call holds whole clips and all their
    prompts, and a clip's video is prefilled once for all of them (workers.shared_prefix).
    Without it, a call holds at most `chunk` items, each with its own copy of the video.

    Families whose processor stacks each video's frames into one tensor (LLaVA-OneVision) can
    only batch clips with equal frame counts, so their items are grouped by frame count first.
    Example (unshared, one prompt per clip): frame counts [16, 16, 8, 16], chunk 2 -> calls
    [0, 1], [3], [2].
    """
    results: list[GenResult | None] = [None] * len(items)
    share = generation_cfg.share_video_prefix

    def rows() -> int:  # asked before each call, after the previous call's learn
        return loaded.sizer.rows_per_call(len(items)) if loaded.sizer else len(items)

    for indices in batch_groups(loaded.model, items):
        for part in planned_calls(items, indices, chunk, share, rows):
            outcomes = generate_with_fallback(loaded, [items[i] for i in part], system, generation_cfg)
            for i, outcome in zip(part, outcomes):
                results[i] = outcome
            if loaded.sizer:
                loaded.sizer.learn([(r.prompt_tokens, r.visual_tokens_per_stage[0]) for r in outcomes
                                    if r.status == "ok" and r.visual_tokens_per_stage])
    return results  # type: ignore[return-value] - every index was filled


def planned_calls(items: Sequence[Item], indices: list[int], chunk: int, share: bool,
                  rows: Callable[[], int]) -> Iterator[list[int]]:
    """`indices` cut into generate calls, lazily: `rows()` (the memory budget in items) is asked
    before each call, so it can learn from the one before."""
    remaining = list(indices)
    while remaining:
        part = next_call(items, remaining, chunk, rows(), share)
        taken = set(part)
        remaining = [i for i in remaining if i not in taken]
        yield part


def call_groups(items: Sequence[Item], indices: list[int], chunk: int, share: bool) -> list[list[int]]:
    """`indices` cut into generate calls without a memory budget: `chunk` whole clips per call when
    sharing the video prefill, else `chunk` items. Example: clips [a, a, b, c, c], chunk 2,
    share -> [0, 1, 2], [3, 4]."""
    return list(planned_calls(items, indices, chunk, share, lambda: len(indices)))


def next_call(items: Sequence[Item], remaining: list[int], chunk: int, rows: int, share: bool) -> list[int]:
    """The next generate call from `remaining`: at most `rows` items (the memory budget) and, when
    sharing the video prefill, whole clips, at most `chunk` of them; always at least one clip."""
    if not share:
        return remaining[:max(1, min(chunk, rows))]
    clips: dict[int, list[int]] = {}
    for index in remaining:
        clips.setdefault(id(items[index][0]), []).append(index)
    call: list[int] = []
    for number, clip in enumerate(clips.values()):
        if number == chunk or (call and len(call) + len(clip) > rows):
            break
        call += clip
    return call


def batch_groups(model: Any, items: Sequence[Item]) -> list[list[int]]:
    """Item indices grouped into what may share one generate call, in first-seen order."""
    if not needs_equal_frame_count(model.config):  # one [B, T, C, H, W] video tensor needs one T
        return [list(range(len(items)))]
    groups: dict[int, list[int]] = {}
    for index, (row, _) in enumerate(items):
        groups.setdefault(decode_frames(row).shape[0], []).append(index)
    return list(groups.values())


def generate_with_fallback(
    loaded: LoadedModel, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig
) -> list[GenResult]:
    """Batched generate; on OOM split in halves, on any other error retry items one by one."""
    try:
        return generate_items(loaded, items, system, generation_cfg)
    except torch.OutOfMemoryError as error:
        _release_cuda_memory()
        if len(items) == 1:
            return [GenResult.failed(error)]
        half = len(items) // 2
        log.warning("CUDA out of memory with %d items; retrying as %d + %d", len(items), half, len(items) - half)
        return retried("OutOfMemoryError: batch halved",
                       [*generate_with_fallback(loaded, items[:half], system, generation_cfg),
                        *generate_with_fallback(loaded, items[half:], system, generation_cfg)])
    except Exception as error:  # noqa: BLE001 - one bad clip must not fail the batch
        if len(items) == 1:
            log.warning("item failed: %s: %s", type(error).__name__, error)
            return [GenResult.failed(error)]
        log.warning("batch of %d failed (%s: %s); retrying each item alone", len(items), type(error).__name__, error)
        return retried(f"{type(error).__name__}: retried item by item",
                       [r for item in items for r in generate_with_fallback(loaded, [item], system, generation_cfg)])


def retried(reason: str, results: list[GenResult]) -> list[GenResult]:
    """Mark results made by retrying a failed call; an inner retry's reason is kept (the first
    cause), the outer failed call is named so the summary counts each failed call once."""
    failed_call = new_batch_id()
    for result in results:
        if result.fallback_reason is None:
            result.fallback_reason, result.fallback_batch_id = reason, failed_call
    return results


def new_batch_id() -> str:
    return uuid.uuid4().hex[:16]


def generate_items(
    loaded: LoadedModel, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig
) -> list[GenResult]:
    """One generate call; clips with several prompts share their video prefill when allowed."""
    results = None
    if generation_cfg.share_video_prefix and shared_prefix.has_shared_clips(items):
        results = shared_prefix.generate_shared(loaded.model, loaded.processor, items, system, generation_cfg)
    if results is None:
        inputs = build_inputs(loaded.processor, items, system)
        results = generate_batch(loaded.model, loaded.processor, inputs, generation_cfg)
    batch_id = new_batch_id()  # prefill_ms, generate_ms and peak_memory_bytes are this call's
    for result in results:
        result.batch_id = batch_id
    return results


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def identity_columns(loaded: LoadedModel) -> Row:
    """Columns that say which model and settings produced a row; on every row, errors included."""
    return {
        "model_id": loaded.resolved.model_id,
        "model_revision": loaded.resolved.revision,
        "model_random_weights": loaded.resolved.random_weights,
        "retention_asked": loaded.retention_asked,
        "worker_host": socket.gethostname(),
        **loaded.provenance,
    }


def input_columns(row: Mapping[str, Any]) -> Row:
    return {key: value for key, value in row.items() if key not in DROPPED_INPUT_COLUMNS}


def passthrough_row(row: Mapping[str, Any]) -> Row:
    """An upstream error/skip row: its own columns unchanged, the new ones empty. No model saw it,
    so it carries no model columns: the same row whether or not a run had a model stage."""
    new_columns = {column: None for column in OUTPUT_COLUMNS if column not in row}
    out = {**new_columns, **input_columns(row)}
    out["prompt"] = row.get("prompt") or CLIP_LEVEL_PROMPT
    return out


def result_row(row: Mapping[str, Any], prompt: str, result: GenResult, stamp: Mapping[str, Any]) -> Row:
    """One (clip, prompt) row; `started_at` stays the upstream one (decode start) when present."""
    fields = dataclasses.asdict(result)
    failed = result.status != "ok"
    return {
        **input_columns(row),
        **{column: fields.get(column) for column in OUTPUT_COLUMNS},
        **stamp,
        "started_at": row.get("started_at") or stamp["started_at"],
        "prompt": prompt,
        "error_stage": ERROR_STAGE if failed else None,
        "visual_tokens_per_stage": fields["visual_tokens_per_stage"] or None,
    }


def utc_now() -> dt.datetime:
    """Timezone-aware UTC datetimes: Arrow stores them as timestamp[us, UTC] (pipeline.schema)."""
    return dt.datetime.now(dt.UTC)


# -- Ray Data batches <-> rows ----------------------------------------------------------------


def batch_to_rows(batch: Mapping[str, Any]) -> list[Row]:
    """A Ray Data batch (dict of equal-length columns) as row dicts of plain Python values."""
    columns = {name: list(values) for name, values in batch.items()}
    num_rows = len(next(iter(columns.values()), []))
    return [{name: to_python(values[i]) for name, values in columns.items()} for i in range(num_rows)]


def to_python(value: Any) -> Any:
    """numpy scalars/arrays to Python values so Arrow sees plain types (bytes stay bytes)."""
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows_to_columns(rows: Sequence[Row]) -> dict[str, list]:
    """Row dicts back to one list per column (missing keys -> None), columns in first-seen order."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}
