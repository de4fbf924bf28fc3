"""CLI: ``python -m pipeline JOB.yaml [key=value ...]`` (also what a job file's shebang runs).

Exit codes: 0 the run finished (bad videos are rows with status 'error', not failures);
2 invalid configuration or unusable input/output; 3 no actor could load the model;
4 the shadow quality guard failed (agreement below quality.min_agreement with quality.enforce),
after everything was written.

    python -m pipeline jobs/caption.yaml preset=offline input.uri=/data/videos
    ./jobs/caption.yaml preset=offline                                   # the shebang form
    ray job submit --working-dir . -- python -m pipeline jobs/caption.yaml output.uri=s3://b/out
    ray job submit --working-dir . jobs/caption.yaml output.uri=s3://b/out  # short form

Under ``ray job submit --working-dir`` the driver runs in Ray's temporary copy of the repo, so
relative local paths would point inside it: give input.uri/output.uri as absolute paths or
s3:// URIs (or set V2DROP_LAUNCH_DIR in the job's env_vars to resolve them against).
"""

from __future__ import annotations

import os
import sys

from pipeline.config import ConfigError, JobConfig, check_local_input, load_job, to_yaml, with_absolute_paths

USAGE = "usage: python -m pipeline JOB.yaml [key=value ...]   e.g. preset=offline model.retention=0.5"
EXIT_CONFIG, EXIT_MODEL, EXIT_QUALITY = 2, 3, 4
LOCAL_ONLY_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": every Ray address is 127.0.0.1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if args else EXIT_CONFIG
    try:
        cfg = with_absolute_paths(load_job(args[0], args[1:]))
        check_local_input(cfg)  # before any cluster work
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    _warn_if_in_ray_working_dir(cfg)
    print(f"resolved config ({args[0]}):\n{to_yaml(cfg)}", flush=True)
    return _run(cfg)


def _run(cfg: JobConfig) -> int:
    from pipeline.run import ModelLoadError, run

    connect_ray(cfg.run.ray_address)
    try:
        summary = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as e:
        print(f"model error: {e}", file=sys.stderr)
        return EXIT_MODEL
    if summary["quality"]["verdict"] == "fail":  # pipeline._quality; the rows are already written
        print("quality error: shadow agreement below quality.min_agreement (quality.enforce=true)", file=sys.stderr)
        return EXIT_QUALITY
    return 0


def connect_ray(address: str | None) -> None:
    """run.ray_address (e.g. 'auto' for a `ray start` cluster on this node), else the cluster of
    `ray job submit` (RAY_ADDRESS), else a new local one. A bare ray.init() would also join
    whatever cluster /tmp/ray last recorded, even a dead one, hence address='local'."""
    address = address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
    if address == "local":
        # A cluster of our own stays on loopback. On Linux Ray turns 127.0.0.1 into the machine's
        # reachable address unless told it is a one-machine cluster; it reads this on first import.
        os.environ.setdefault(LOCAL_ONLY_RAY_ENV, "0")
    import ray

    if not ray.is_initialized():
        ray.init(address=address)


def _warn_if_in_ray_working_dir(cfg: JobConfig) -> None:
    """Outputs written inside Ray's temporary copy of the repo vanish with it."""
    if "runtime_resources" in os.getcwd() and cfg.output.uri.startswith(os.getcwd()):
        print(f"warning: output.uri {cfg.output.uri} is inside Ray's temporary working_dir and will be "
              "deleted with it; pass an absolute output.uri or s3:// URI", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
