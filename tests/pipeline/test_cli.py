"""The job files launched as users launch them: as a script (their shebang) and through
`ray job submit` to a cluster of the test's own, the real tiny model in stage 5; the CLI's exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.runs import JOBS, REPO, by_file, cli_env, make_video, read_rows


@pytest.fixture(scope="module")
def short_videos(tmp_path_factory: pytest.TempPathFactory, shared_videos: Path) -> Path:
    """Videos shorter than clips.min_clip_len_s (each one clip of its whole length, through the
    real tiny model) and an empty file (a probe error)."""
    folder = tmp_path_factory.mktemp("short")
    for name in ("h265_video.mp4", "video_90.mov"):
        (folder / name).symlink_to(shared_videos / name)
    (folder / "zero.mp4").write_bytes(b"")
    return folder


@pytest.mark.slow
def test_job_file_runs_as_a_script(short_videos: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(JOBS / "caption.yaml"), "preset=offline", f"input.uri={short_videos}", "output.uri=out"],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resolved config" in result.stdout and "run summary" in result.stdout
    rows = read_rows(tmp_path / "out")
    assert by_file(rows) == {"h265_video.mp4": {"ok": 1}, "video_90.mov": {"ok": 1}, "zero.mp4": {"error": 1}}
    assert all(r["output_text"] for r in rows.to_pylist() if r["status"] == "ok")


@pytest.mark.slow
def test_cli_exit_codes(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "pipeline", str(JOBS / "caption.yaml"), "model.retention=1.5"],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model.retention: must be in (0, 1]" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "pipeline", str(JOBS / "caption.yaml"), f"input.uri={tmp_path}/nope"],
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "input.uri:" in missing.stderr and "does not exist" in missing.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit(shared_videos: Path, tmp_path: Path) -> None:
    """Both job files through `ray job submit` to a cluster of the test's own, the real tiny model
    captioning or answering one clip: caption.yaml in the long form, qa.yaml in the short form,
    submitted together so that they share the cluster, as scheduled runs do."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "one_clip.mp4", "libx264", 5, 4, 64, 48)  # one 5 s clip under preset=offline
    (videos / "h265_video.mp4").symlink_to(shared_videos / "h265_video.mp4")  # 1 s: one clip of all of it
    # A throwaway local cluster: no token auth, so the CLI needs no token file; and no drain on
    # SIGTERM (Ray waits up to 30 s for a draining node: for Serve replicas, of which it has none).
    env = {**cli_env(), "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    ray_bin = shutil.which("ray", path=env["PATH"])
    dashboard = free_port()
    # Every port of its own: the session cluster already holds Ray's defaults, and a job agent that
    # cannot bind its port (52365) stays up without HTTP, so every submission is refused.
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port",
                                                    "ray-client-server-port")]
    # A temp dir of its own: a job's supervisor finds its cluster's address in the temp dir's
    # ray_current_cluster, which every Ray started on the default one rewrites; read while another
    # test's Ray started, it was empty ("Invalid address format: ") and the job failed (CI, once).
    # Short: Ray's socket paths under it must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # `ray start --block` stays in the foreground and stops what it started when signalled, so the
    # test ends exactly its own cluster (`ray stop` would end every Ray on the machine).
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", *ports, f"--dashboard-port={dashboard}",
                             f"--temp-dir={temp_dir}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=4",  # two jobs' actors and tasks at once
                             "--disable-usage-stats", "--include-dashboard=true"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    gcs = f"127.0.0.1:{ports[0].split('=')[1]}"
    address = f"http://127.0.0.1:{dashboard}"
    submission_ids: dict[str, str] = {}
    try:
        wait_for_dashboard(address)
        jobs = (("caption", ["--", "python", "-m", "pipeline", "jobs/caption.yaml"], 1), ("qa", ["jobs/qa.yaml"], 3))
        for job, form, _ in jobs:
            result = submit_when_agent_is_up([ray_bin, "job", "submit", "--no-wait", "--address", address,
                                              "--working-dir", ".", *form, "preset=offline", f"input.uri={videos}",
                                              f"output.uri={tmp_path / job}"], env)
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
            submission_ids[job] = re.search(r"Job '(raysubmit_\w+)' submitted successfully", result.stdout).group(1)
        # Waiting and reading logs through Ray's job SDK, in this process: a `ray job` CLI call
        # spends seconds starting Python and importing Ray.
        client = JobSubmissionClient(address)
        statuses = {job: wait_for_job(client, submission_id) for job, submission_id in submission_ids.items()}
        assert all(status == JobStatus.SUCCEEDED for status in statuses.values()), "\n".join(
            f"{job}: {status} ({client.get_job_info(submission_ids[job]).message})\n"
            f"{client.get_job_logs(submission_ids[job])[-3000:]}" for job, status in statuses.items())
        metadata = ray_job_metadata(gcs, env)
        for job, _, rows_per_clip in jobs:
            submission_id, out = submission_ids[job], tmp_path / job
            rows = read_rows(out)
            assert by_file(rows) == {"one_clip.mp4": {"ok": rows_per_clip}, "h265_video.mp4": {"ok": rows_per_clip}}
            ok = [r for r in rows.to_pylist() if r["status"] == "ok"]
            assert all(r["model_random_weights"] and r["output_text"] and r["retention_achieved"] < 1 for r in ok)
            assert len({r["prompt"] for r in ok}) == rows_per_clip
            [summary] = (out / "runs" / f"job={job}").glob("*/summary.json")
            summary = json.loads(summary.read_text())
            assert summary["rows_ok"] == 2 * rows_per_clip
            # the submission id in the summary, the run id in the Ray job's metadata
            assert summary["ray_job_submission_id"] == submission_id
            assert {"job_submission_id": submission_id, "v2drop_run_id": summary["run_id"], "v2drop_job": job}.items() \
                <= next(m for m in metadata if m.get("job_submission_id") == submission_id).items()
    finally:
        try:
            stop_unfinished_jobs(address, submission_ids)
        finally:  # the cluster is stopped even if it no longer answers
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=120)
            shutil.rmtree(temp_dir, ignore_errors=True)


def stop_unfinished_jobs(address: str, submission_ids: dict[str, str], timeout_s: float = 60) -> None:
    """Stops the jobs still running (a test failing early leaves them), through Ray, and waits for
    them to end: a job's driver runs in a process group of its own, so the cluster's SIGTERM does
    not reach it, and a driver whose cluster went away has been seen spinning a core for minutes."""
    from ray.job_submission import JobSubmissionClient

    if not submission_ids:
        return
    client = JobSubmissionClient(address)
    for submission_id in submission_ids.values():
        client.stop_job(submission_id)  # False (and nothing done) for a job that has ended
    for submission_id in submission_ids.values():
        wait_for_job(client, submission_id, timeout_s)


def ray_job_metadata(gcs_address: str, env: dict) -> list[dict[str, str]]:
    """Every Ray job's config metadata, read from the cluster's GCS in a process of its own (this
    one is connected to the session cluster)."""
    code = (f"import json, ray._raylet as r; c = r.GcsClient(address={gcs_address!r}); "
            "print(json.dumps([dict(i.config.metadata) for i in c.get_all_job_info().values()]))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_for_job(client: Any, submission_id: str, timeout_s: float = 400) -> Any:
    """The job's final status (or the one it has after `timeout_s`)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                    JobStatus.STOPPED):
        if time.monotonic() > deadline:
            return status
        time.sleep(1)
    return status


def submit_when_agent_is_up(command: list[str], env: dict, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head answers "No available agent".

    The dashboard answers before the head's job agent has registered, and the head waits only
    10 s for it (Ray 2.60). Such a refusal creates no job, so submitting again cannot run the job
    twice. (An agent that could not bind its port is refused for ever: the deadline ends that.)
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


def wait_for_dashboard(address: str, timeout_s: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # up, and asking for Ray's auth token (which the ray CLI sends)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
