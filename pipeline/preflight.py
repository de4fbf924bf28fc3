"""Stage 0, preflight (driver, before Ray starts): every check that needs no cluster, then the plan.

Everything here imports neither Ray nor torch, so a bad job fails in about a second with exit 2
and the dotted key (`ConfigError`), instead of after a cluster start, probing and decoding:

    input.uri     missing folder/file, unsupported scheme (config), nothing to run (empty listing)
    model.source  unknown tiny:<family>, a local path that does not exist, an empty s3:// prefix
    output.uri    not writable, bucket missing or denied (config.yaml is written first to prove it)

Then the job's lease is taken (one writer per output: `pipeline.lease`) and the output's state
read back under it (`pipeline._write.read_state`): the finished keys this run skips.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import _write
from pipeline._discover import list_videos, videos_table
from pipeline._model import run_fingerprint
from pipeline.config import ConfigError, JobConfig, check_local_input, to_yaml
from pipeline.lease import Lease, lease_uri
from pipeline.schema import SCHEMA_VERSION
from pipeline.storage import Storage, StorageError
from vlm.families import TINY_FAMILIES  # torch-free, as is vlm.sources
from vlm.sources import TINY_PREFIX, looks_like_path, tiny_family


@dataclass
class Plan:
    run_id: str
    run_date: str  # UTC, YYYY-MM-DD: the Hive partition of this run's files
    started_at: dt.datetime
    done: set[tuple[str, str]]  # (clip_id, prompt) keys finished by earlier runs
    state: _write.OutputState  # the job's files when this run started: what `consolidate` replaces
    videos: pa.Table  # stage 1's output: one row per input video
    lease: Lease  # held until the run ends; `run` releases it

    def release(self) -> None:
        self.lease.release()


def default_rule(cfg: JobConfig) -> _write.DoneRule:
    """Rows count as finished only when this run's model and engine configuration made them."""
    return _write.SameEngineRule(fingerprint=run_fingerprint(cfg))


def prepare(cfg: JobConfig, storage: Storage, log: Callable[[str], None] = print,
            rule_for: Callable[[JobConfig], _write.DoneRule] = default_rule) -> Plan:
    """All checks, the lease, the resume state and the list of videos; raises ConfigError (exit 2)
    naming the key, or lease.LeaseHeld (exit 6) naming the run that holds the output.

    `rule_for(cfg)` says which rows are finished (`_write.DoneRule`)."""
    check_local_input(cfg)
    check_model_source(cfg, storage)
    videos = discover_inputs(cfg, storage)  # 1
    started_at = dt.datetime.now(dt.UTC)
    run_id = f"{started_at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    lease = Lease(storage, lease_uri(cfg.output.uri, cfg.job), run_id, cfg.run.lease_ttl_s, log)
    with _output_errors(cfg):  # the first write: it also proves the output exists and is writable
        lease.acquire(cfg.run.lease_wait_s)
    try:
        with _output_errors(cfg):
            storage.write_bytes_atomic(f"{_write.run_dir_uri(cfg.output.uri, cfg.job, run_id)}/config.yaml",
                                       to_yaml(cfg).encode())
            state = _write.read_state(storage, cfg.output.uri, cfg.job, log, rule_for(cfg))
        refuse_newer_schemas(cfg, state)
    except BaseException:
        lease.release()
        raise
    done = _write.finished_keys(state) if cfg.run.resume else set()
    return Plan(run_id, f"{started_at:%Y-%m-%d}", started_at, done, state, videos_table(videos), lease)


def refuse_newer_schemas(cfg: JobConfig, state: _write.OutputState) -> None:
    """A run rewrites older files with its own schema (pipeline._consolidate); one of an older
    v2drop-batch must not do so to files a newer one wrote, which would drop their newer columns."""
    newer = sorted(f.uri for f in state.files if f.schema_version > SCHEMA_VERSION)
    if newer:
        newest = max(f.schema_version for f in state.files)
        raise ConfigError(f"output.uri: {len(newer)} files of job {cfg.job} have schema version {newest}, newer than "
                          f"this v2drop-batch's {SCHEMA_VERSION} (e.g. {newer[0]}); run the version that wrote them")


class _output_errors:
    """StorageError on the output -> ConfigError naming output.uri, with the kind and the URI."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> bool:
        if isinstance(error, StorageError):
            hint = {"missing": "create the bucket/folder", "denied": "let the credentials write there",
                    "transient": "the store is unreachable or failing; try again later",
                    "invalid": "see the reason"}[error.kind]
            raise ConfigError(f"output.uri: cannot use {self.cfg.output.uri} ({error.kind}: {error}); {hint}") from None
        return False


def discover_inputs(cfg: JobConfig, storage: Storage) -> list[dict[str, Any]]:
    try:
        videos = list_videos(cfg.input, storage)
    except StorageError as e:
        raise ConfigError(f"input.uri: cannot list {cfg.input.uri} ({e.kind}: {e})") from None
    if not videos:
        raise ConfigError(f"input.uri: no videos with extensions {cfg.input.extensions} under {cfg.input.uri}")
    return videos


def check_model_source(cfg: JobConfig, storage: Storage) -> None:
    """What can be known without loading: the tiny family, a local folder, an s3:// prefix.
    A hub id is left to the actors (the hub may be reachable only from the cluster)."""
    source = cfg.model.source
    if (family := tiny_family(source)) is not None:
        if family not in TINY_FAMILIES:
            raise ConfigError(f"model.source: unknown tiny family {family!r}; known: "
                              f"{', '.join(TINY_PREFIX + f for f in TINY_FAMILIES)}")
    elif Storage.is_s3(source):
        try:
            found = storage.list_files(source)
        except StorageError as e:
            raise ConfigError(f"model.source: cannot list {source} ({e.kind}: {e})") from None
        if not found:
            raise ConfigError(f"model.source: no objects under {source}")
    elif looks_like_path(source) and not os.path.isdir(os.path.expanduser(source)):
        raise ConfigError(f"model.source: {source} is not a folder; give a folder written by save_pretrained, "
                          "a hub id, an s3:// prefix or tiny:<family>")
