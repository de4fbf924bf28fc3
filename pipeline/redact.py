"""One function that removes credentials from any text leaving the process.

`redact(text)` is applied to every message that reaches output rows (`error`, `partial_reason`),
the driver's log, the run summary, stderr and `StorageError` itself, so a password typed into
`storage.endpoint_url=http://user:pass@host`, a presigned URL's signature or the session token
in an SDK's error text never lands in a file or a terminal. `scrub_secrets` does the same for a
config tree, where whole values of secret-looking keys are hidden.

    >>> redact("could not reach http://ana:hunter2@minio:9000/b/k?X-Amz-Signature=abc&part=1")
    'could not reach http://***@minio:9000/b/k?X-Amz-Signature=***&part=1'
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Keys whose values are secrets: config keys, query parameters, "key=value" / "key: value" text.
SECRET_KEY = re.compile(r"(secret|password|passwd|credential|key_id|access_key|(^|_)token($|_)|api_key|signature)", re.I)
# Env variables whose values (long enough to be unmistakable) are replaced wherever they appear.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN")
_MIN_SECRET_LEN = 8  # shorter env values ("testing") would mask ordinary words
# up to the last '@' before the path, as URL parsers read it: a password may hold '@' itself
_URI_USERINFO = re.compile(r"(?<=://)[^/\s'\"]*@")
_SECRET_ASSIGNMENT = re.compile(
    r"(?P<name>[\w.-]*(?:secret|password|passwd|credential|access_key|token(?!s)|api_key|signature)[\w.-]*)"
    r"(?P<sep>\s*=\s*['\"]?|['\"]\s*:\s*['\"])(?P<value>[^\s&'\",;}]+)",
    re.I,
)


def redact(text: str) -> str:
    """`text` with URI user:password@, secret key=value pairs and known secret env values masked."""
    if not text:
        return text
    text = _URI_USERINFO.sub(MASK + "@", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN:
            text = text.replace(value, MASK)
    return text


def scrub_secrets(value: Any) -> Any:
    """Copy of a plain config tree: values of secret-looking keys hidden, strings redacted."""
    if isinstance(value, dict):
        return {k: (MASK if SECRET_KEY.search(str(k)) and v is not None else scrub_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value
