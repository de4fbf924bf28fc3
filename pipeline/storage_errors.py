"""Storage failures as one exception type that names the URI and says what kind of failure it is.

boto3, botocore, s3transfer, pyarrow and the OS each raise their own errors; `translated(uri)`
turns the ones we understand into `StorageError(uri, reason, kind)` and lets anything else (a
bug) raise as it is. Messages pass through `redact`: SDK messages quote endpoints with
user:password@.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pipeline.redact import redact

ERROR_KINDS = ("missing", "denied", "transient", "invalid")

_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "AllAccessDisabled", "ExpiredToken", "InvalidToken", "AccountProblem"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "500", "503"}


class StorageError(Exception):
    """A storage operation failed; ``kind`` tells the caller whether a retry or a fix can help.

    kind: "missing" (404), "denied" (403 or no credentials), "transient" (throttling/5xx/network
    after all retries), "invalid" (malformed URI, manifest or file).
    """

    def __init__(self, uri: str, reason: str, kind: str = "invalid"):
        assert kind in ERROR_KINDS, kind
        uri, reason = redact(uri), redact(reason)  # SDK messages quote endpoints with user:password@
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason, self.kind = uri, reason, kind

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their `args` (the message) by default, which would not rebuild this
        # class; Ray ships exceptions between processes, so pickle the real fields.
        return (StorageError, (self.uri, self.reason, self.kind))


def classify(exc: BaseException) -> tuple[str, str] | None:
    """(kind, reason) for errors we understand, None for anything else (a bug: let it raise)."""
    import boto3.exceptions as b3ex
    import botocore.exceptions as bex
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _MISSING_CODES or status == 404:
            return "missing", f"does not exist ({code or status})"
        if code in _DENIED_CODES or status == 403:
            return "denied", f"access denied ({code or status}); check the credentials' permissions"
        if code in _TRANSIENT_CODES or status >= 500:
            return "transient", f"still failing after retries: {exc}"
        return "invalid", str(exc)
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return "denied", ("no AWS credentials found by the standard chain "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance or pod role)")
    # boto3's download_file re-raises s3transfer's RetriesExceededError as its own class.
    if isinstance(exc, bex.ConnectionError | bex.HTTPClientError | bex.ResponseStreamingError
                  | bex.IncompleteReadError | RetriesExceededError | b3ex.RetriesExceededError
                  | b3ex.S3UploadFailedError | TimeoutError):
        return "transient", f"network error: {exc}"
    if isinstance(exc, bex.BotoCoreError | bex.ParamValidationError):  # e.g. an invalid bucket name
        return "invalid", str(exc).replace("\n", " ")
    if isinstance(exc, FileNotFoundError):
        return "missing", "does not exist"
    if isinstance(exc, PermissionError):
        return "denied", "permission denied"
    if isinstance(exc, OSError):  # pyarrow's S3 errors are OSErrors carrying the AWS error text
        return _classify_arrow_message(str(exc))
    if type(exc).__name__ == "ArrowInvalid":
        return "invalid", f"not readable: {exc}"
    if any(c.__name__ == "ArrowException" for c in type(exc).__mro__):  # any other pyarrow failure
        return "invalid", f"{type(exc).__name__}: {exc}"
    return None


def _classify_arrow_message(message: str) -> tuple[str, str]:
    if "ACCESS_DENIED" in message or "HTTP status 403" in message:
        return "denied", message
    if "NO_SUCH" in message or "HTTP status 404" in message:
        return "missing", message
    if any(s in message for s in ("NETWORK_CONNECTION", "SLOW_DOWN", "HTTP status 5", "curlCode")):
        return "transient", message
    return "invalid", message


def unreadable_content(error: StorageError) -> bool:
    """Whether `error` says a file's bytes are not Parquet, as pyarrow's reader found them (0 bytes,
    no magic, a torn footer or page), rather than that they could not be fetched (an S3 answer, an
    I/O error, memory): only such a file may be set aside as unreadable and its keys run again."""
    cause = error.__cause__
    if type(cause).__name__ == "ArrowInvalid":
        return True
    # pyarrow's reader reports corrupt thrift or pages as errno-less OSErrors; its S3 client's carry "AWS Error"
    return isinstance(cause, OSError) and cause.errno is None and "AWS Error" not in str(cause)


@contextlib.contextmanager
def translated(uri: str) -> Iterator[None]:
    """Turn boto3/pyarrow/OS errors into StorageError naming `uri` (the caller's URI, not the key)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        classified = classify(exc)
        if classified is None:
            raise
        raise StorageError(uri, classified[1], classified[0]) from exc


def is_broken_stream(exc: BaseException) -> bool:
    """A body that broke mid-transfer: botocore retried the request, but not the body read."""
    import boto3.exceptions as b3ex
    import botocore.exceptions as bex
    from s3transfer.exceptions import RetriesExceededError

    return isinstance(exc, bex.ResponseStreamingError | bex.IncompleteReadError | bex.ReadTimeoutError
                      | bex.ConnectionClosedError | RetriesExceededError | b3ex.RetriesExceededError)
