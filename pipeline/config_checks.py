"""How what a user typed becomes either OmegaConf layers or a ``ConfigError`` naming the dotted key.

The checks the config sections share (URI schemes, finite numbers), reading a job file or preset,
parsing ``k=v`` overrides, and turning an OmegaConf error into '<dotted key>: <what is allowed>'
without echoing a value that may be a secret. The sections themselves are in `pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.redact import SECRET_KEY, redact
from workers.settings import ConfigError, require

# URI schemes the storage layer reads and writes; anything else (gs://, abfs://, hdfs://) is
# refused by name instead of being taken for a local folder called "gs:".
SUPPORTED_SCHEMES = ("s3", "file")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(uri: str) -> str:
    """'s3://b/k' -> 's3', 'GS://b' -> 'gs', '/data' and 'tiny:qwen2_5_vl' -> ''."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def require_supported_scheme(uri: str, key: str, allowed: tuple[str, ...] = SUPPORTED_SCHEMES) -> None:
    scheme = uri_scheme(uri)
    require(not scheme or scheme in allowed, key,
            f"{scheme}:// is not supported; give a local path or {' | '.join(s + '://' for s in allowed)}, got {redact(uri)}")


def require_finite_numbers(cfg: Any) -> None:
    """inf and nan pass every range check written as `x > 0`; refuse them once, for every key of
    `cfg` (a dataclass of section dataclasses: the JobConfig)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            require(not isinstance(value, float) or math.isfinite(value), f"{section.name}.{item.name}",
                    f"must be a finite number, got {value}")


def load_yaml(path: Path, what: str) -> Any:
    """A job file or preset as one OmegaConf layer; a missing preset's error lists the available ones."""
    if not path.is_file():
        hint = ""
        if what.startswith("preset"):
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            hint = f"; available presets in {path.parent}: {', '.join(names) or 'none'}"
        raise ConfigError(f"{'preset' if what.startswith('preset') else 'job'}: {what} {path} not found{hint}")
    loaded = OmegaConf.load(path)
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"job: {what} {path} must hold a YAML mapping of sections")
    return loaded


def parse_overrides(overrides: list[str] | tuple[str, ...], root: type) -> Any:
    """CLI ``k=v`` words as one OmegaConf layer; errors name the key within `root` (the job's dataclass)."""
    for position, item in enumerate(overrides, 1):
        if "=" not in item:
            # A bare word may be a pasted secret: echo it only when it looks like a key.
            shown = item if re.fullmatch(r"[A-Za-z_][\w.]*", item) and not SECRET_KEY.search(item) else f"argument {position}"
            raise ConfigError(f"{shown}: command-line overrides are dotted key=value, e.g. model.retention=0.5")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(explain(e, root)) from None


def explain(e: OmegaConfBaseException, root: type) -> str:
    """Turn an OmegaConf error into '<dotted key>: <what is allowed>'."""
    key = getattr(e, "full_key", None) or "config"
    if isinstance(e, ConfigKeyError):
        return f"{key}: unknown key; valid keys here are: {', '.join(_valid_keys(root, key))}"
    reason = redact(str(e).splitlines()[0])
    if _may_hold_secret(key):  # the wrong-type value may be a secret typed into the wrong key
        reason = "value of the wrong type (not shown: this key's section may hold secrets)"
    expected = _expected_type(root, key)
    return f"{key}: {reason}" + (f" (expected {expected})" if expected else "")


def _may_hold_secret(dotted_key: str) -> bool:
    """Keys of the storage section (endpoints, credentials by mistake) and secret-looking names."""
    return dotted_key.split(".")[0] in ("storage", "config") or bool(SECRET_KEY.search(dotted_key))


def _section_of(root: type, dotted_key: str) -> Any:
    node: Any = root
    for part in dotted_key.split(".")[:-1]:
        node = {f.name: f for f in node.__dataclass_fields__.values()}[part].default_factory
    return node


def _valid_keys(root: type, dotted_key: str) -> list[str]:
    try:
        return list(_section_of(root, dotted_key).__dataclass_fields__)
    except (KeyError, AttributeError, TypeError):
        return list(root.__dataclass_fields__)


def _expected_type(root: type, dotted_key: str) -> str | None:
    try:
        return str(_section_of(root, dotted_key).__dataclass_fields__[dotted_key.split(".")[-1]].type)
    except (KeyError, AttributeError, TypeError):
        return None
