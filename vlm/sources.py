"""How `model.source` is written: `tiny:<family>`, a local path, an `s3://` prefix or a hub id.

Torch-free, so pipeline.preflight classifies a source before any cluster or model work with the
same rules the actors use when they resolve it (workers.loading).
"""

from __future__ import annotations

import os

TINY_PREFIX = "tiny:"
S3_PREFIX = "s3://"


def tiny_family(source: str) -> str | None:
    """'tiny:qwen3_vl' -> 'qwen3_vl'; None for any other source."""
    return source[len(TINY_PREFIX):] if source.startswith(TINY_PREFIX) else None


def looks_like_path(source: str) -> bool:
    """A path if it exists or is written like one; `org/name` that does not exist is a hub id."""
    if os.path.exists(os.path.expanduser(source)):
        return True
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1
