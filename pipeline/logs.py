"""The driver's log: `logging` with UTC timestamps and levels (`run.log_level`), third-party noise
filtered, so `ray job logs` and a terminal show one readable stream. It goes to stdout: stderr
keeps the CLI's contract of one line naming the failure (pipeline.__main__).

    2026-11-30 02:14:07Z INFO  pipeline: [plan] 12 videos -> 44 rows to write, 39 clips to caption

Libraries that log at INFO on every call (Ray Data's plan and operator lines, botocore, urllib3,
filelock, transformers) are raised to WARNING, and the deprecation warnings they emit on import
are hidden; a run's own warnings (our `log.warning`) stay.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

LOGGER = "pipeline"
FORMAT = "%(asctime)sZ %(levelname)-5s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
QUIET_LOGGERS = ("ray", "botocore", "boto3", "urllib3", "s3transfer", "filelock", "transformers",
                 "torch", "matplotlib", "PIL", "fsspec")
QUIET_WARNING_MODULES = r"(ray|transformers|torch|botocore|pyarrow|google|pkg_resources|torchvision|decord)(\..*)?"


def setup_logging(level: str = "INFO", stream=None) -> logging.Logger:
    """Configure the `pipeline` logger (idempotent: a second call replaces our handler)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_v2drop", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    formatter.converter = time.gmtime  # UTC, as every timestamp the pipeline writes
    handler.setFormatter(formatter)
    handler._v2drop = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
    quiet_third_parties()
    return logger


def quiet_third_parties() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_WARNING_MODULES)


def quiet_ray_data_console() -> None:
    """Ray Data configures its `ray.data` logger when first imported: INFO to the console (an
    execution plan and a finish line per dataset) and DEBUG to ray-data.log in the session folder.
    Keep the file complete and let only warnings through to the console."""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_our_choice)


def _not_our_choice(record: logging.LogRecord) -> bool:
    """Ray Data warns that its progress bars are off: we turned them off (run.ray_progress_bars)."""
    return "Progress bars disabled" not in record.getMessage()


def get_logger(name: str = LOGGER) -> logging.Logger:
    return logging.getLogger(name if name.startswith(LOGGER) else f"{LOGGER}.{name}")


def info(text: str) -> None:
    """The `log` callable the stages take: one INFO line of the `pipeline` logger."""
    logging.getLogger(LOGGER).info(text)
