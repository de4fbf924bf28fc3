"""The model stage: a Ray Data actor class that captions clips or answers questions about them,
and the pure functions it delegates to.

    ds.map_batches(VideoModelWorker, fn_constructor_args=(cfg.model, cfg.generation, cfg.prompt, cfg.quality,
                   cfg.actors), batch_size=actors.batch_size, batch_format="pyarrow", num_gpus=actors.num_gpus, ...)

It takes the typed config sections of workers.settings (picklable dataclasses), never dicts, and
Arrow batches, like the other stages (pipeline.run wraps it as pipeline._model.ModelStage).

Cardinality: 1:N. A clip row becomes one row per prompt (caption: 1; qa: one per question);
a row whose incoming `status` is not 'ok' (an upstream 'error' or 'skipped') passes through as
one row with prompt '' (pipeline.schema: '' marks a clip-level row; prompt is never null).
Clips in the shadow sample (`quality.shadow_fraction`, workers.shadow) also run with V²Drop off;
their rows carry the full-token output and the agreement measures (rows.SHADOW_COLUMNS).

Columns in: every column of the clip row; read are `frames`, `frames_shape`, `frames_dtype`,
`timestamps_s` (see workers.model_inputs), optional `questions`, `status`.
Columns out: every input column except `frames` (bytes stay out of the written blocks), then
workers.rows.MODEL_COLUMNS and the provenance columns of `workers.provenance` (versions, engine
fingerprint, schedule, attention, dtype, self-check). `status` is 'ok' or 'error'; a failed row
says why in `error` with `error_stage` 'model' (bad frame bytes, a processor or generate failure,
an OOM at batch size 1).

How items become generate calls (cut, shared video prefill or not, retried on failure) is
workers.model_calls. Rows made by a retry say so (`fallback_reason`, and `fallback_batch_id`: the
failed call), so the run summary counts the failed calls per reason.

Model loading runs `v2drop.self_check` once per actor: a failure fails the actor's construction
(the driver exits 3) instead of writing rows.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch

import v2drop
from workers import shadow
from workers.call_size import CallSizer, call_sizer, memory_budget_bytes
from workers.device_inputs import inputs_device
from workers.loading import ResolvedModel, choose_device, load_resolved, resolve_model_source
from workers.model_calls import run_items
from workers.model_inputs import Item, decode_frames, expand_prompts, prompts_for_row
from workers.provenance import engine_columns, engine_fingerprint
from workers.rows import CLIP_LEVEL_PROMPT, GenResult, Row, passthrough_row, result_row, rows_to_columns, utc_now
from workers.settings import ActorsConfig, GenerationConfig, ModelConfig, PromptConfig, QualityConfig

__all__ = ["VideoModelWorker", "LoadedModel", "load_for_stage", "answer_rows"]

log = logging.getLogger(__name__)

@dataclasses.dataclass
class LoadedModel:
    """A model ready for the stage, and the identity stamped on each of its output rows."""

    model: Any
    processor: Any
    resolved: ResolvedModel
    retention_asked: float  # model.retention; 1.0 = V²Drop off, the stock model
    provenance: dict[str, Any]  # workers.provenance.engine_columns: stamped on every row
    scorer: str = "variation"  # model.scorer: how V²Drop ranks visual tokens (v2drop.SCORERS)
    sizer: CallSizer | None = None  # rows per model call from a memory budget; None: actors.batch_size alone
    inputs_device: torch.device | None = None  # where the video processor works (workers.device_inputs); None: the CPU


class VideoModelWorker:
    """Ray Data actor: loads the model once in __init__, then answers each Arrow batch of clip rows."""

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
        self.loaded = load_for_stage(model, storage, actors.num_gpus, fingerprint)
        loaded_model = self.loaded.model
        budget = memory_budget_bytes(loaded_model.device, actors.memory_fraction, actors.memory_budget_gib)  # after loading
        self.loaded.sizer = call_sizer(loaded_model, v2drop.schedule_of(loaded_model), generation.engine(),
                                       generation.max_new_tokens, budget)

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        """Output columns for an Arrow batch: its rows become Python values once, here."""
        rows = answer_rows(self.loaded, batch.to_pylist(), self.prompt, self.generation, self.quality)
        return rows_to_columns(rows)


def load_for_stage(
    model_cfg: ModelConfig, storage: Any = None, num_gpus: float | None = None, fingerprint: str | None = None,
) -> LoadedModel:
    """Resolve, load, switch V²Drop on when model.retention < 1, and self-check the engine.
    `storage` (pipeline.storage.Storage) is needed only for an s3:// model.source; `fingerprint`
    (workers.provenance.engine_fingerprint) is stamped on every row."""
    resolved = resolve_model_source(
        model_cfg.source, revision=model_cfg.revision, cache_dir=model_cfg.cache_dir, storage=storage
    )
    model, processor = load_resolved(
        resolved,
        dtype=model_cfg.dtype,
        attn_implementation=model_cfg.attn_implementation,
        device=choose_device(num_gpus),
    )
    v2drop.vision.install(model)  # batched window attention on sdpa towers, stock and V²Drop alike
    v2drop.fused_projections.install(model)  # q/k/v and gate/up weights in one tensor each, for the decode step
    retention, scorer = model_cfg.retention, model_cfg.scorer
    enable_v2drop(model, retention, scorer)
    # Also at retention 1.0: the row says which engine produced it, and a broken stack fails here.
    check = v2drop.self_check(model)
    log.info("v2drop self-check %s", check.describe())
    device = inputs_device(model, processor)
    provenance = engine_columns(model, fingerprint, check.describe(), device)
    return LoadedModel(model, processor, resolved, retention, provenance, scorer, inputs_device=device)


def enable_v2drop(model: Any, retention: float, scorer: str = "variation") -> None:
    """Retention 1.0 leaves the stock model alone; below it, the layer-averaged schedule."""
    if retention >= 1.0:
        return
    num_layers = model.config.get_text_config().num_hidden_layers
    schedule = v2drop.Schedule.for_retention(num_layers, retention)
    v2drop.enable(model, schedule, scorer=scorer)
    log.info("V²Drop on (%s): %s over %d layers (retention %.3f)", scorer, schedule, num_layers, retention)


# -- pure functions: rows in, rows out --------------------------------------------------------


def answer_rows(
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
    finished_at = utc_now()  # the quality guard's calls below are no part of the rows' model calls
    shadows = iter(run_shadow(loaded, items, generated, prompt_cfg.system, generation_cfg, quality_cfg, chunk))
    results = iter(generated)
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
        device=loaded.inputs_device,
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


def identity_columns(loaded: LoadedModel) -> Row:
    """Columns that say which model and settings produced a row (IDENTITY_COLUMNS and the
    provenance columns); on every row, errors included."""
    return {
        "model_id": loaded.resolved.model_id,
        "model_revision": loaded.resolved.revision,
        "model_random_weights": loaded.resolved.random_weights,
        "retention_asked": loaded.retention_asked,
        "worker_host": socket.gethostname(),
        **loaded.provenance,
    }


