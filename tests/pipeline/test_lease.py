"""pipeline.lease: one writer per (output, job), on a local folder and on HTTP S3 (moto)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline import lease as lease_module
from pipeline.config import StorageConfig
from pipeline.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord, lease_uri, read_lease, replace_if_match
from pipeline.storage import Storage, StorageError
from tests.s3_faults import FaultProxy
from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> tuple[Storage, str]:
    """(storage, lease URI) on a local folder or in a fresh bucket."""
    if request.param == "local":
        return Storage(), lease_uri(str(tmp_path / "out"), "caption")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(StorageConfig(endpoint_url=endpoint)), lease_uri(f"s3://{bucket}/out", "caption")


def test_a_second_run_is_refused_with_the_holder_named_until_the_first_releases(place):
    storage, uri = place
    first = Lease(storage, uri, "run-1", ttl_s=60)
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"held by run run-1 \(pid \d+ on .*ttl 60 s\)"):
        Lease(storage, uri, "run-2", ttl_s=60).acquire()
    first.release()
    assert read_lease(storage, uri) is None
    second = Lease(storage, uri, "run-2", ttl_s=60)
    second.acquire()
    assert LeaseRecord.from_bytes(read_lease(storage, uri)[0]).holder == "run-2"
    second.release()


def test_a_waiting_run_takes_the_lease_once_it_is_released(place):
    storage, uri = place
    first = Lease(storage, uri, "run-1", ttl_s=60)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    started = time.monotonic()
    second = Lease(storage, uri, "run-2", ttl_s=60)
    second.acquire(wait_s=30)
    assert 0.9 < time.monotonic() - started < 10
    second.release()


def test_an_expired_lease_of_a_dead_driver_is_taken_over_and_logged(place):
    storage, uri = place
    dead = LeaseRecord("run-dead", "node-9", 4242, renewed_at=time.time() - 100, ttl_s=30)
    storage.write_bytes_atomic(uri, dead.to_bytes())
    logged: list[str] = []
    lease = Lease(storage, uri, "run-2", ttl_s=30, log=logged.append)
    lease.acquire()
    assert LeaseRecord.from_bytes(read_lease(storage, uri)[0]).holder == "run-2"
    assert len(logged) == 1 and "took over" in logged[0] and "run run-dead (pid 4242 on node-9" in logged[0]
    lease.release()


def test_renewal_keeps_a_live_holder_past_its_ttl(place):
    storage, uri = place
    holder = Lease(storage, uri, "run-1", ttl_s=1.5)
    holder.acquire()
    time.sleep(2.5)  # past the ttl: only the renewals (every 0.5 s) keep it
    with pytest.raises(LeaseHeld):
        Lease(storage, uri, "run-2", ttl_s=1.5).acquire()
    holder.check()
    holder.release()


def test_a_holder_whose_lease_was_taken_stops(place):
    storage, uri = place
    holder = Lease(storage, uri, "run-1", ttl_s=60)
    holder.acquire()
    record = json.loads(read_lease(storage, uri)[0])
    storage.write_bytes_atomic(uri, json.dumps({**record, "holder": "run-other"}).encode())  # as a takeover would
    holder.renew()
    with pytest.raises(LeaseLost, match="taken over or removed"):
        holder.check()
    holder.release()  # never deletes someone else's lease
    assert LeaseRecord.from_bytes(read_lease(storage, uri)[0]).holder == "run-other"


def test_a_holder_whose_renewals_fail_stops_before_another_run_could_take_its_lease(place, monkeypatch):
    """Renewals that raise (an outage, a stalled connection) leave the lease to expire, and
    another run takes over an expired lease without the holder hearing of it."""
    storage, uri = place
    holder = Lease(storage, uri, "run-1", ttl_s=1.2)
    holder.acquire()
    outage = [True]

    def replace_unless_down(*args):
        if outage[0]:
            raise StorageError(uri, "network error: read timed out", "transient")
        return replace_if_match(*args)

    monkeypatch.setattr(lease_module, "replace_if_match", replace_unless_down)
    time.sleep(1.0)  # the renew thread failed twice: less than a quarter of the ttl is left
    outage[0] = False
    holder.check()  # the store is back: renewed (by check if not by the thread), the run goes on
    assert time.time() - LeaseRecord.from_bytes(read_lease(storage, uri)[0]).renewed_at < 0.9
    outage[0] = True
    time.sleep(1.0)
    with pytest.raises(LeaseLost, match="could not be renewed"):
        holder.check()
    holder.release()


def test_racing_runs_get_exactly_one_lease(tmp_path):
    """Local only: the flock guard makes check-and-create atomic here; on S3 the store's
    If-None-Match does (moto checks and puts without a lock, so it cannot prove that part)."""
    storage, uri = Storage(), lease_uri(str(tmp_path / "out"), "caption")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def contend(n: int) -> None:
        barrier.wait()
        try:
            Lease(storage, uri, f"run-{n}", ttl_s=60).acquire()
            outcomes.append("held")
        except LeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]


def test_a_lease_write_applied_but_answered_500_is_ours(s3_server, s3_bucket):  # noqa: F811
    """botocore retries a PUT whose answer was lost; the retry fails its precondition against
    the first attempt's write, which is this run's own: neither taking nor renewing the lease
    may then read it as another run's."""
    uri = lease_uri(f"s3://{s3_bucket}/out", "caption")
    lease_key = "lease.json"  # the path's other parts are URL-encoded
    with FaultProxy(s3_server, {lease_key: "lost-answer"}) as proxy:
        holder = Lease(Storage(StorageConfig(endpoint_url=proxy.url)), uri, "run-1", ttl_s=60)
        holder.acquire()  # the creating PUT is the one answered 500
        assert proxy.hits[lease_key] == 1
        proxy.hits.clear()  # the next PUT, the renewal, is answered 500 too
        holder.renew()
        assert proxy.hits[lease_key] == 1
        holder.check()  # not lost
        holder.release()
    assert read_lease(Storage(StorageConfig(endpoint_url=s3_server)), uri) is None
