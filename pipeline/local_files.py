"""Local-filesystem primitives of the storage layer: paths, atomic writes, node-wide locks.

Atomic means readers see the old file or the whole new one: a hidden temp file in the same folder,
then one rename, then the folder synced (else a crash may undo the rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Iterator

from pipeline.storage_errors import StorageError

GLOB_CHARS = re.compile(r"[*?\[]")


def local_path(uri: str) -> str:
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def is_hidden(path: str) -> bool:
    """Dotfiles are skipped by listings: our own temp files and macOS '._x.mp4' resource forks."""
    return posixpath.basename(path.replace(os.sep, "/")).startswith(".")


def fsync_folder(folder: str) -> None:
    """A rename is durable only once its folder is synced (else a crash may undo it)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def make_folders(folder: str) -> None:
    """os.makedirs, then each new folder's entry synced in its parent: a file synced into a folder
    that a crash then loses is lost with it (ext4 and XFS sync a folder's entries only when asked)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for created in reversed(missing):
        os.makedirs(created, exist_ok=True)
        fsync_folder(os.path.dirname(created))


def not_regular(path: str) -> str | None:
    """'a FIFO', 'a device', ... for a path that exists but is no regular file; None otherwise.
    Opening a FIFO blocks until a writer appears, so such a path must never reach a decoder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


@contextlib.contextmanager
def file_lock(lock_path: str) -> Iterator[None]:
    """An exclusive lock between processes on one node (actors sharing a cache folder)."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a hidden temp path beside `path`; rename it onto `path` only if the body succeeds.

    Same folder so os.replace is one atomic rename on one filesystem: readers see the old file
    or the whole new one, never half. A crash leaves a '.name.<uuid>.tmp' that listings skip.
    """
    folder, name = os.path.split(path)
    make_folders(folder)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_folder(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def list_local(uri: str, missing_ok: bool, expand_globs: bool = True) -> list[str]:
    """Every file under a local folder (recursive, hidden folders skipped), a glob's matches (with
    `expand_globs`: input listings), or the one path `uri` names; a path that does not exist lists nothing
    with `missing_ok`, else raises. expand_globs=False reads '[', '*' and '?' as the folder's own name."""
    path = local_path(uri)
    if expand_globs and GLOB_CHARS.search(path):
        import glob

        # every non-folder match: a FIFO named *.mp4 becomes an error row, never silently dropped
        return [p for p in glob.glob(path, recursive=True) if not os.path.isdir(p)]
    if os.path.isfile(path) or not_regular(path):
        return [path]
    if not os.path.isdir(path):
        if missing_ok:
            return []
        raise StorageError(uri, "no such file or folder", "missing")
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files]
    return found
