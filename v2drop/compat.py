"""The transformers versions v2drop was tested with, and the one place that knows how they differ.

v2drop replaces the text-model forward of another library, so every minor release of
transformers can change what that forward receives and what its layers expect. Two rules:

* `enable()` refuses a version outside `TESTED_TRANSFORMERS` unless the caller opts in
  (`allow_untested=True` or `V2DROP_ALLOW_UNTESTED_TRANSFORMERS=1`); the opt-in then relies on
  the run-time self-check (`v2drop.self_check`).
* Whatever differs between the tested versions is decided here, once, from the installed code.
  5.24 renamed `past_key_values` to `cache` in every model, layer and mask-builder signature
  and in the model outputs (the old name is deprecated until 5.40). A loop that passed the old
  name beside the new one decoded from the wrong cache while every output looked plausible.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import transformers
from transformers.masking_utils import create_causal_mask

# major.minor series the engine was written against and passes the suite on (oldest first).
# pyproject.toml declares the same range; tests/v2drop/test_compat.py keeps the two in step.
TESTED_TRANSFORMERS = ("5.23", "5.24")
ALLOW_UNTESTED_ENV = "V2DROP_ALLOW_UNTESTED_TRANSFORMERS"

# The keyword (and output attribute) that carries the KV cache in the installed transformers:
# "cache" from 5.24 on, "past_key_values" before. Read from the installed signature, not the version.
CACHE_ARG: str = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


def installed_version() -> str:
    """The transformers version this process imported (the one place that reads it)."""
    return transformers.__version__


def installed_series(version: str | None = None) -> str:
    """'5.24' for '5.24.0' or '5.24.0.dev0'."""
    return ".".join((version or installed_version()).split(".")[:2])


def is_tested(version: str | None = None) -> bool:
    return installed_series(version) in TESTED_TRANSFORMERS


def untested_allowed(allow_untested: bool = False) -> bool:
    return allow_untested or os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0", "false", "False")


def check_transformers(allow_untested: bool = False, version: str | None = None) -> bool:
    """True when the installed transformers is a tested one; False when it is not but the caller
    opted in (a self-check must then run); a ValueError otherwise."""
    version = version or installed_version()
    if is_tested(version):
        return True
    if untested_allowed(allow_untested):
        return False
    raise ValueError(
        f"v2drop was tested with transformers {', '.join(TESTED_TRANSFORMERS)}; installed {version}. "
        "It patches the text model's forward, which changes between releases: install a tested "
        f"version (the project's lock file), or opt in with enable(..., allow_untested=True) or "
        f"{ALLOW_UNTESTED_ENV}=1, which runs v2drop.self_check against the stock model first."
    )


def pop_cache(kwargs: dict) -> Any:
    """The cache a caller passed under either name; both names are removed from `kwargs`."""
    found = [kwargs.pop(name) for name in _CACHE_NAMES if name in kwargs]
    caches = [cache for cache in found if cache is not None]
    if len(caches) > 1 and caches[0] is not caches[1]:
        raise ValueError("v2drop: two different caches were passed (`cache` and `past_key_values`)")
    return caches[0] if caches else None


def cache_kwarg(cache: Any) -> dict[str, Any]:
    """{installed cache keyword: cache}, for layers, text models, mask builders and generate()."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output carries (`output.cache` from 5.24, `past_key_values` before)."""
    return getattr(output, CACHE_ARG)
