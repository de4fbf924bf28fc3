"""One writer per output: a lease on (output.uri, job), taken before planning, renewed, released.

Why: two runs of one job into one output both read the same finished keys, both run every
missing key and both write it: every key twice. The lease makes the second run wait
(`run.lease_wait_s`) and then refuse (exit 6) with a message naming the holder.

The lease is a small JSON object at ``<output>/runs/job=<job>/lease.json``::

    {"holder": "<run_id>", "host": "node-1", "pid": 4242, "renewed_at": 1764370000.0, "ttl_s": 120.0}

- S3: created with a conditional PUT (``If-None-Match: *``: exactly one of two racing runs gets
  200, the other 412), renewed and taken over with ``If-Match: <etag>`` (only the writer that
  read the current version wins), released with a conditional DELETE.
- Local: the same three verbs on a file, each under an exclusive `flock` of a guard file beside
  it, with the content hash as the ETag.

A holder renews every ``ttl_s / 3`` from a daemon thread. A lease whose ``renewed_at + ttl_s``
has passed belongs to a dead driver: the next run takes it over and logs whose it was. A holder
that finds its lease gone or taken (it stalled longer than ``ttl_s``) stops writing (`LeaseLost`),
and so does one whose renewals failed (a storage outage, a stalled connection) until less than a
quarter of ``ttl_s`` is left, unless the renewal `check()` then makes itself succeeds: another
run may take an expired lease over without the holder hearing of it.
Expiry compares wall clocks of different machines: keep them NTP-synchronised, and keep
``ttl_s`` well above any skew.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.local_files import local_path
from pipeline.s3 import split_s3_uri
from pipeline.storage import Storage
from pipeline.storage_errors import StorageError, translated

LEASE_NAME = "lease.json"
_POLL_S = 1.0  # how often a waiting run looks at the lease again


class LeaseHeld(Exception):
    """Another live run holds the lease (CLI exit code 6)."""


class LeaseLost(Exception):
    """This run's lease expired and was taken, or vanished: it must stop writing (exit code 7)."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # run_id of the holding run
    host: str
    pid: int
    renewed_at: float  # epoch seconds of the last renewal (or of the take)
    ttl_s: float  # renewed_at + ttl_s is when others may take it over

    def expired(self, now: float) -> bool:
        return now > self.renewed_at + self.ttl_s

    def describe(self) -> str:
        age_s = time.time() - self.renewed_at
        return f"run {self.holder} (pid {self.pid} on {self.host}, renewed {age_s:.0f} s ago, ttl {self.ttl_s:g} s)"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_bytes(data: bytes) -> LeaseRecord | None:
        """None for an unreadable lease (a torn local write cannot happen, but be safe): expired."""
        try:
            return LeaseRecord(**json.loads(data))
        except (ValueError, TypeError):
            return None


def lease_uri(output_uri: str, job: str) -> str:
    return f"{output_uri.rstrip('/')}/runs/job={job}/{LEASE_NAME}"


class Lease:
    """acquire() -> renew thread -> release(); `check()` raises LeaseLost once the lease is gone."""

    def __init__(self, storage: Storage, uri: str, holder: str, ttl_s: float, log: Callable[[str], None] = print):
        self.storage, self.uri, self.holder, self.ttl_s, self.log = storage, uri, holder, ttl_s, log
        self._etag: str | None = None
        self._lost: str | None = None
        self._valid_until = 0.0  # time.monotonic() when the last successful write of the lease expires
        self._renewing = threading.Lock()  # the renew thread and check() renew the same version
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> LeaseRecord:
        return LeaseRecord(self.holder, socket.gethostname(), os.getpid(), time.time(), self.ttl_s)

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lease, waiting up to `wait_s` for a live holder; LeaseHeld names it after that."""
        deadline = time.monotonic() + wait_s
        while True:
            started = time.monotonic()  # the record's renewed_at is taken after this
            current = read_lease(self.storage, self.uri)
            if current is None:
                self._etag = create_if_absent(self.storage, self.uri, self._record().to_bytes())
            else:
                data, etag = current
                record = LeaseRecord.from_bytes(data)
                if record is None or record.expired(time.time()):
                    self._etag = replace_if_match(self.storage, self.uri, self._record().to_bytes(), etag)
                    if self._etag:
                        who = record.describe() if record else "an unreadable lease"
                        self.log(f"[lease] took over {self.uri} from {who}: its holder stopped renewing")
                elif time.monotonic() >= deadline:
                    expires_s = record.renewed_at + record.ttl_s - time.time()
                    raise LeaseHeld(f"{self.uri} is held by {record.describe()}: another run of this job is "
                                    f"writing to this output. If that run is dead, its lease expires in "
                                    f"{max(expires_s, 0):.0f} s; wait for it with run.lease_wait_s")
            if self._etag:
                self._valid_until = started + self.ttl_s
                self._start_renewing()
                return
            time.sleep(_POLL_S)

    def renew(self) -> None:
        """Extend the lease; a lease taken or removed by someone else marks this run lost."""
        with self._renewing:
            started = time.monotonic()
            etag = replace_if_match(self.storage, self.uri, self._record().to_bytes(), self._etag or "")
            if etag is None:
                self._lost = f"the lease {self.uri} was taken over or removed (this run stalled past run.lease_ttl_s)"
            else:
                self._etag, self._valid_until = etag, started + self.ttl_s

    def check(self) -> None:
        """LeaseLost unless this run still holds the lease, with at least a quarter of ttl_s left
        (a write started now ends before another run could take it); renews first when less is left."""
        left_s = self._valid_until - time.monotonic()
        if not self._lost and left_s < self.ttl_s / 4:
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - cannot prove it still holds the lease: stop writing
                self._lost = (f"the lease {self.uri} could not be renewed for {self.ttl_s - left_s:.0f} s "
                              f"(run.lease_ttl_s {self.ttl_s:g}; last: {e}): another run may take it over")
        if self._lost:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (never someone else's)."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            if self._etag and not self._lost:
                delete_if_match(self.storage, self.uri, self._etag)
        except StorageError as e:  # the run's work is done; the lease simply expires after ttl_s
            self.log(f"[lease] could not release {self.uri} ({e}); it expires after {self.ttl_s:g} s")
        self._etag = None

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and not self._lost:
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - the next tick tries again while the ttl lasts
                self.log(f"[lease] could not renew {self.uri}: {e}")


# --- conditional writes: S3 preconditions, or a flock'd local file ----------------------------


def read_lease(storage: Storage, uri: str) -> tuple[bytes, str] | None:
    """(content, etag) of the lease, or None when there is none."""
    if Storage.is_s3(uri):
        bucket, key = split_s3_uri(uri)
        try:
            with translated(uri):
                answer = storage.s3_client.get_object(Bucket=bucket, Key=key)
                return answer["Body"].read(), answer["ETag"]
        except StorageError as e:
            if e.kind == "missing":
                return None
            raise
    with _local_guard(uri):
        return _read_local(uri)


def create_if_absent(storage: Storage, uri: str, data: bytes) -> str | None:
    """Write `data` only if nothing is there; its etag, or None when another writer was first."""
    if Storage.is_s3(uri):
        bucket, key = split_s3_uri(uri)
        return _conditional_put(storage, uri, data, lambda: storage.s3_client.put_object(
            Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"))
    with _local_guard(uri):
        if _read_local(uri) is not None:
            return None
        storage.write_bytes_atomic(uri, data)
        return _local_etag(data)


def replace_if_match(storage: Storage, uri: str, data: bytes, etag: str) -> str | None:
    """Overwrite only the version `etag` names; the new etag, or None when it changed or vanished."""
    if Storage.is_s3(uri):
        bucket, key = split_s3_uri(uri)
        return _conditional_put(storage, uri, data, lambda: storage.s3_client.put_object(
            Bucket=bucket, Key=key, Body=data, IfMatch=etag))
    with _local_guard(uri):
        current = _read_local(uri)
        if current is None or current[1] != etag:
            return None
        storage.write_bytes_atomic(uri, data)
        return _local_etag(data)


def delete_if_match(storage: Storage, uri: str, etag: str) -> None:
    if Storage.is_s3(uri):
        bucket, key = split_s3_uri(uri)
        current = read_lease(storage, uri)
        if current is not None and current[1] == etag:  # S3 has no conditional DELETE on every store
            with translated(uri):
                storage.s3_client.delete_object(Bucket=bucket, Key=key)
        return
    with _local_guard(uri):
        current = _read_local(uri)
        if current is not None and current[1] == etag:
            storage.delete(uri)


def _conditional_put(storage: Storage, uri: str, data: bytes, put: Callable[[], Any]) -> str | None:
    """`put`'s etag, or None when its precondition failed because of another writer. botocore
    retries a PUT whose answer was lost (a 500, a read timeout) though the store may have applied
    it: the retry then fails its precondition against our own write, so a failed precondition
    counts as ours when the lease now holds exactly `data` (each record has its own renewed_at)."""
    import botocore.exceptions as bex

    with translated(uri):
        try:
            return put()["ETag"]
        except bex.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code")
            # 412: another writer won the race; 409: a concurrent conditional write; NoSuchKey: an
            # If-Match on a lease that is gone. NoSuchBucket and the rest are real errors.
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                current = read_lease(storage, uri)
                return current[1] if current is not None and current[0] == data else None
            raise


def _local_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_local(uri: str) -> tuple[bytes, str] | None:
    try:
        with open(local_path(uri), "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    return data, _local_etag(data)


@contextlib.contextmanager
def _local_guard(uri: str) -> Iterator[None]:
    """Each local verb reads and writes under one exclusive flock of '.lease.json.guard'."""
    path = local_path(uri)
    folder, name = os.path.split(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, f".{name}.guard"), "a")
    except OSError as e:
        raise StorageError(uri, f"cannot create the lease: {e.strerror}", "denied") from e
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
