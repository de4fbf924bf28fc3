"""Find a model's weights and load them once per actor.

`model.source` in the job YAML may be any of four things; `resolve_model_source` turns each into
a directory or hub id that `from_pretrained` can read, plus the identity recorded on every
output row (`model_id`, `model_revision`, `model_random_weights`):

| source                         | resolved to                                   | random weights |
|--------------------------------|-----------------------------------------------|----------------|
| `tiny:<family>` (`vlm.families.TINY_FAMILIES`) | `<cache_dir>/tiny/...` built offline | yes |
| `s3://bucket/models/qwen7b`    | `<cache_dir>/s3/<hash>/`, downloaded once     | if tiny-built  |
| `/models/qwen7b`, `./m`, `~/m` | that folder (must exist)                      | if tiny-built  |
| `Qwen/Qwen2.5-VL-7B-Instruct`  | the hub cache snapshot (revision = its commit)| no             |

Downloads and tiny builds are shared by every actor on a node: `Storage.download_prefix` takes
a file lock and writes a completion marker; `vlm.tiny.build_cached` builds into a temporary folder
and renames it into place. How a source is written is `vlm.sources` (preflight reads the same
rules); the model and processor come from `vlm.loading`.

`workers.model_stage.load_for_stage` runs these once per actor, then switches V²Drop on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm import loading, tiny
from vlm.sources import S3_PREFIX, TINY_PREFIX, looks_like_path, tiny_family
from workers.settings import default_cache_dir

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelSourceError(ValueError):
    """`model.source` cannot be turned into weights; the message says what to do instead."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are, and the identity written on every output row."""

    path_or_id: str  # what from_pretrained reads: a local folder (or a hub id when online)
    model_id: str  # the source as the user wrote it (hub id, path, s3 URI, tiny:<family>)
    revision: str | None  # hub commit (or the revision asked for); None for local/s3/tiny
    random_weights: bool  # True for tiny:<family>: outputs are noise, only the plumbing is real


def resolve_model_source(
    source: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None, storage: Any = None
) -> ResolvedModel:
    """Turn `model.source` into a loadable location; see the module table for the four forms.

    `storage` is a `pipeline.storage.Storage` (only needed for s3:// sources).
    """
    cache = default_cache_dir(cache_dir)
    if source.startswith(TINY_PREFIX):
        return _resolve_tiny(source, cache)
    if source.startswith(S3_PREFIX):
        return _resolve_s3(source, cache, storage)
    if looks_like_path(source):
        return _resolve_local(source, revision)
    return _resolve_hub(source, revision)


def _resolve_local(source: str, revision: str | None) -> ResolvedModel:
    path = Path(os.path.expanduser(source)).resolve()
    if not path.is_dir():
        raise ModelSourceError(
            f"model path {source} does not exist (model.source); point model.source at a folder "
            f"written by save_pretrained, a hub id, an s3:// prefix, or tiny:<family>"
        )
    return ResolvedModel(str(path), model_id=source, revision=revision, random_weights=tiny.is_random_weights(path))


def _resolve_hub(model_id: str, revision: str | None) -> ResolvedModel:
    """Prefer the local hub cache (so the row records the exact commit); download only if online."""
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(model_id, revision=revision, local_files_only=True)
        return ResolvedModel(path, model_id=model_id, revision=Path(path).name, random_weights=False)
    except Exception as cached_error:  # noqa: BLE001 - any miss means "not cached"
        if constants.HF_HUB_OFFLINE:
            raise _hub_unreachable(model_id, cached_error) from cached_error
    try:
        path = snapshot_download(model_id, revision=revision)
    except Exception as error:  # noqa: BLE001 - connection, auth, missing repo
        raise _hub_unreachable(model_id, error) from error
    return ResolvedModel(path, model_id=model_id, revision=Path(path).name, random_weights=False)


def _hub_unreachable(model_id: str, cause: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"model {model_id} not found locally and the hub is unreachable; use preset=offline or a "
        f"local path (model.source). Cause: {type(cause).__name__}: {cause}"
    )


def _resolve_s3(uri: str, cache: Path, storage: Any) -> ResolvedModel:
    """Mirror the prefix into the node cache; Storage.download_prefix holds a file lock and a
    completion marker, so the first actor on a node downloads and the others wait, then reuse."""
    if storage is None:
        raise ModelSourceError(f"model.source {uri} is on S3 but no storage was configured to download it")
    target = cache / "s3" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    log.info("model %s -> %s", uri, target)
    path = storage.download_prefix(uri, str(target))
    return ResolvedModel(str(path), model_id=uri, revision=None, random_weights=tiny.is_random_weights(path))


def _resolve_tiny(source: str, cache: Path) -> ResolvedModel:
    """Build (once per node: build_cached renames a finished temp dir into place) and mark random."""
    path = tiny.build_cached(tiny_family(source), cache / "tiny")
    return ResolvedModel(str(path), model_id=source, revision=None, random_weights=tiny.is_random_weights(path))


def choose_device(num_gpus: float | None = None) -> str:
    """'cuda' when a GPU is visible and the actor asked for one, else 'cpu'.

    Ray hides GPUs from an actor with num_gpus=0 (CUDA_VISIBLE_DEVICES=""), so
    `torch.cuda.is_available()` alone already follows the actor's resources.
    """
    wants_gpu = num_gpus is None or num_gpus > 0
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def effective_attn_implementation(requested: str, device: str) -> str:
    """flash_attention_2 needs CUDA and the flash_attn package; otherwise sdpa, with a warning,
    so a GPU job YAML can still be tried on a CPU machine."""
    if requested != "flash_attention_2":
        return requested
    if device != "cuda":
        log.warning("attn_implementation=flash_attention_2 needs a GPU; using sdpa on %s", device)
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        log.warning("attn_implementation=flash_attention_2 but flash_attn is not installed; using sdpa")
        return "sdpa"
    return requested


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype for `model.dtype`; half precision on CPU works but is slow, so warn."""
    if name not in _DTYPES:
        raise ModelSourceError(f"model.dtype {name!r} is not one of {sorted(_DTYPES)}")
    if device == "cpu" and name != "float32":
        log.warning("model.dtype=%s on CPU is slow and less accurate; float32 is the CPU default", name)
    return _DTYPES[name]


def load_resolved(
    resolved: ResolvedModel, *, dtype: str = "float32", attn_implementation: str = "sdpa", device: str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """Model + processor (vlm.loading.load) in eval mode on `device`, with the job's dtype and
    attention names resolved for this device; the processor pads on the LEFT for generate."""
    kwargs = {"revision": resolved.revision} if _is_hub_id(resolved) else {}
    return loading.load(
        resolved.path_or_id,
        dtype=torch_dtype(dtype, device),
        attn_implementation=effective_attn_implementation(attn_implementation, device),
        device=device,
        **kwargs,
    )


def _is_hub_id(resolved: ResolvedModel) -> bool:
    return not os.path.isdir(resolved.path_or_id)
