"""Stage 5, model (GPU actor pool, 1:N): caption or answer questions about each clip.

Columns in: DECODED_SCHEMA. Columns out: `pipeline.schema.FILE_SCHEMA`, one row per
(clip, prompt): caption -> 1 row per clip, qa -> one per question. A row that is already
'error' or 'skipped' passes through as one row with prompt ''.

`workers.model_stage.VideoModelWorker` does the work on Arrow batches; `ModelStage` only shapes
what it returns into the output schema inside the actor, so the frame bytes and the intermediate
columns never travel to the driver, and every block has the same types. The worker (torch,
transformers: ~8 s of imports on 2 cores) is imported in the actor only; the driver never loads it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline._output import to_output_table
from pipeline.config import JobConfig
from pipeline.storage import Storage
from workers.provenance import engine_fingerprint


def model_stage_kwargs(cfg: JobConfig) -> dict[str, Any]:
    """Constructor arguments of the actor: the typed sections of workers.settings (picklable
    dataclasses, defined below the pipeline so the worker needs no pipeline types)."""
    return {
        "model": cfg.model,
        "generation": cfg.generation,
        "prompt": cfg.prompt,
        "quality": cfg.quality,
        "actors": cfg.actors,
        "storage": Storage(cfg.storage),  # picklable; its S3 clients are built in the actor
    }


def run_fingerprint(cfg: JobConfig) -> str:
    """The engine fingerprint this run's actors stamp on their rows (what resume compares)."""
    return engine_fingerprint(cfg.model, cfg.generation, cfg.prompt.system)


class ModelStage:
    """The VideoModelWorker actor, returning `FILE_SCHEMA` tables stamped with this run's id.

    `fingerprint` is the driver's (`run_fingerprint`), what its resume compared. The actor stamps
    the one it computes itself and refuses to start when the two differ: a worker running other
    code than the driver (another v2drop.ENGINE_VERSION on a mixed cluster) would write rows that
    the next resume counts as done for the wrong engine."""

    def __init__(self, run_id: str, fingerprint: str, **model_stage_kwargs: Any) -> None:
        kw = model_stage_kwargs
        if (actor := engine_fingerprint(kw["model"], kw["generation"], kw["prompt"].system)) != fingerprint:
            raise RuntimeError(f"engine fingerprint: this actor computes {actor}, the driver {fingerprint}; "
                               "the driver and the workers run different code or settings")
        from workers.model_stage import VideoModelWorker

        self.worker = VideoModelWorker(**model_stage_kwargs)  # loads the model: only once the engines agree
        self.run_id = run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        model = self.worker.loaded.model
        on_gpu = getattr(model, "device", None) is not None and model.device.type == "cuda"
        return to_output_table(self.worker(batch), self.run_id, on_gpu=on_gpu)
