"""CLI: ``python -m pipeline JOB.yaml [--dry-run] [key=value ...]`` (also what a job file's shebang runs).

``python -m pipeline --help`` lists every section and key with its default (from pipeline/config.py and
workers/settings.py, the model actor's sections it composes).
``--dry-run`` validates, discovers and probes, then prints the plan without Ray or a model (pipeline.plan).

Exit codes (docs/architecture.md, "Exit codes"); every non-zero one prints one line to stderr:

    0  finished; error rows at most run.max_error_fraction of the job's keys
    1  an unexpected failure (a bug): the traceback is printed
    2  invalid configuration or unusable input/output/model source, found before Ray starts
    3  no actor could load the model
    4  finished and wrote every row, but the shadow quality guard failed (agreement below
       quality.min_agreement with quality.enforce=true)
    5  finished and wrote every row, but more than run.max_error_fraction of them are errors
    6  another run of this job holds the output's lease (named); nothing was done
    7  the output stopped accepting writes mid-run, or this run lost its lease; what was
       written stays and a re-run resumes from it

    python -m pipeline jobs/caption.yaml preset=offline input.uri=/data/videos
    ./jobs/caption.yaml preset=offline                                   # the shebang form
    ray job submit --working-dir . -- python -m pipeline jobs/caption.yaml output.uri=s3://b/out
    ray job submit --working-dir . jobs/caption.yaml output.uri=s3://b/out  # short form

Under ``ray job submit --working-dir`` the driver runs in Ray's temporary copy of the repo, so
relative local paths would point inside it: give input.uri/output.uri as absolute paths or
s3:// URIs (or set V2DROP_LAUNCH_DIR in the job's env_vars to resolve them against).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys

from pipeline import config as config_module
from pipeline.config import ConfigError, JobConfig, load_job, to_yaml, with_absolute_paths
from pipeline.redact import redact
from workers import settings as settings_module

USAGE = ("usage: python -m pipeline JOB.yaml [--dry-run] [key=value ...]   e.g. preset=offline model.retention=0.5\n"
         "       python -m pipeline --help                                 every key with its default")
DRY_RUN = "--dry-run"
RUN_ID_METADATA_KEY = "v2drop_run_id"  # in the Ray job's metadata: `ray list jobs --detail` shows it
EXIT_OK, EXIT_CONFIG, EXIT_MODEL, EXIT_QUALITY, EXIT_TOO_MANY_ERRORS, EXIT_BUSY, EXIT_OUTPUT = 0, 2, 3, 4, 5, 6, 7
LOCAL_ONLY_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": every Ray address is 127.0.0.1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + ("\n\n" + config_help() if args else ""), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_CONFIG
    dry_run = DRY_RUN in args
    args = [a for a in args if a != DRY_RUN]
    try:
        cfg = with_absolute_paths(load_job(args[0], args[1:]))
    except ConfigError as e:
        return _fail(EXIT_CONFIG, "config error", e)
    from pipeline.logs import setup_logging

    log = setup_logging(cfg.run.log_level)
    if dry_run:
        return _dry_run(cfg)
    _warn_if_in_ray_working_dir(cfg)
    log.info(start_line(args[0], cfg))
    log.debug("resolved config:\n%s", redact(to_yaml(cfg)))
    return _run(cfg)


def start_line(job_file: str, cfg: JobConfig) -> str:
    """The one line a run starts with; the whole resolved config is in the run folder (config.yaml)."""
    m, a = cfg.model, cfg.actors
    return redact(f"job {cfg.job} ({job_file}{', preset ' + cfg.preset if cfg.preset else ''}): {cfg.input.uri} -> "
                  f"{cfg.output.uri} | {cfg.prompt.task}, {m.source} {m.dtype}, retention {m.retention:g} | "
                  f"{a.min_size}-{a.max_size} actors x {a.num_gpus:g} GPU, batch {a.batch_size} | "
                  f"{'S3 endpoint ' + cfg.storage.endpoint_url + ' | ' if cfg.storage.endpoint_url else ''}"
                  f"resolved config: {cfg.output.uri.rstrip('/')}/runs/job={cfg.job}/<run_id>/config.yaml")


def config_help() -> str:
    """Every section and key with its type, default and the comment beside it in pipeline/config.py
    (or workers/settings.py, for the sections the model actor consumes)."""
    comments = _field_comments()
    lines = ["Keys (override as section.key=value; defaults from pipeline/config.py and workers/settings.py):"]
    for section in dataclasses.fields(JobConfig):
        cls = getattr(config_module, _section_class(section), None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            lines.append(f"  {section.name} = {section.default!r}{_comment(comments, 'JobConfig', section.name)}")
            continue
        lines.append(f"\n{section.name}:")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {section.name}.{f.name} = {default!r}{_comment(comments, cls.__name__, f.name)}")
    return "\n".join(lines)


def _section_class(section: dataclasses.Field) -> str:
    return section.type if isinstance(section.type, str) else section.type.__name__


def _comment(comments: dict[tuple[str, str], str], cls: str, name: str) -> str:
    text = comments.get((cls, name))
    return f"    # {text}" if text else ""


def _field_comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment on the field's line, or on the line(s) just above it, from
    pipeline/config.py and the actor's sections it composes (workers/settings.py)."""
    found: dict[tuple[str, str], str] = {}
    for module in (config_module, settings_module):
        found.update(_comments_in(inspect.getsource(module)))
    return found


def _comments_in(source: str) -> dict[tuple[str, str], str]:
    lines = source.splitlines()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    line = lines[item.lineno - 1]
                    above = lines[item.lineno - 2].strip() if item.lineno > 1 else ""
                    text = line.split("  # ", 1)[1] if "  # " in line else (above[2:] if above.startswith("# ") else "")
                    found[(node.name, item.target.id)] = text.strip()
    return found


def _dry_run(cfg: JobConfig) -> int:
    from pipeline.plan import dry_run
    from pipeline.storage import Storage

    try:
        print(dry_run(cfg, Storage(cfg.storage)), flush=True)
    except ConfigError as e:
        return _fail(EXIT_CONFIG, "config error", e)
    return EXIT_OK


def _run(cfg: JobConfig) -> int:
    from pipeline.lease import LeaseHeld, LeaseLost
    from pipeline.logs import info
    from pipeline.preflight import prepare
    from pipeline.storage import Storage

    try:  # stage 0-1 before Ray: a bad job fails in about a second, without a cluster
        plan = prepare(cfg, Storage(cfg.storage), log=lambda text: info(redact(text)))
    except ConfigError as e:
        return _fail(EXIT_CONFIG, "config error", e)
    except LeaseHeld as e:
        return _fail(EXIT_BUSY, "output busy", e)
    try:
        connect_ray(cfg.run.ray_address, {RUN_ID_METADATA_KEY: plan.run_id, "v2drop_job": cfg.job})
        from pipeline._write import OutputError
        from pipeline.run import ModelLoadError, error_fraction, run

        summary = run(cfg, plan=plan)
    except ConfigError as e:
        return _fail(EXIT_CONFIG, "config error", e)
    except ModelLoadError as e:
        return _fail(EXIT_MODEL, "model error", e)
    except (OutputError, LeaseLost) as e:
        return _fail(EXIT_OUTPUT, "output error", e)
    finally:
        plan.release()  # run() releases it too; a second release is a no-op
    if summary["quality"]["verdict"] == "fail":  # pipeline._quality; the rows are already written
        return _fail(EXIT_QUALITY, "quality error", "shadow agreement below quality.min_agreement "
                     "(quality.enforce=true); every row was written")
    fraction = error_fraction(summary)
    if fraction > cfg.run.max_error_fraction:
        return _fail(EXIT_TOO_MANY_ERRORS, "too many errors",
                     f"{summary['rows_error']} error rows, {fraction:.0%} of the job's keys, above "
                     f"run.max_error_fraction={cfg.run.max_error_fraction:g}; every row was written")
    return EXIT_OK


def _fail(code: int, what: str, error: object) -> int:
    """One line on stderr, credentials removed, and the exit code."""
    text = " ".join(str(error).split())
    print(redact(f"{what}: {text}"), file=sys.stderr, flush=True)
    return code


def connect_ray(address: str | None, metadata: dict[str, str] | None = None) -> None:
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
        # `metadata` (the run id) lands in the Ray job's metadata, beside `ray job submit`'s own
        # job_submission_id, which the run summary records in turn (pipeline.run).
        job_config = ray.job_config.JobConfig(metadata=metadata or {})
        ray.init(address=address, job_config=job_config, logging_level="WARNING", log_to_driver=True)


def _warn_if_in_ray_working_dir(cfg: JobConfig) -> None:
    """Outputs written inside Ray's temporary copy of the repo vanish with it."""
    if "runtime_resources" in os.getcwd() and cfg.output.uri.startswith(os.getcwd()):
        print(f"warning: output.uri {cfg.output.uri} is inside Ray's temporary working_dir and will be "
              "deleted with it; pass an absolute output.uri or s3:// URI", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
