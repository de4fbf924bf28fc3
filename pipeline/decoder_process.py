"""The helper process that runs every probe and decode, killed when a request outlives its timeout.

Why a child process: decord's native decode loop holds the GIL and can spin forever on a container
that over-reports its frame count, so a thread cannot stop it. Every probe and decode therefore runs
in a helper process (`DecoderProcess`): a fresh interpreter started once and reused; a request that
outlives its timeout gets the process killed (SIGKILL) and the next request starts a new one.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

from pipeline.video_types import DecodeTimeout, VideoError, short_reason

T = TypeVar("T")


def timed_out_reason(timeout_s: float) -> str:
    return f"decoding timed out after {timeout_s:g} s; the decoder process was killed"


class DecoderProcess:
    """One warm helper process that runs decode requests and is killed when one overruns.

    Thread-safe (one request at a time). It is replaced every `max_requests` requests because
    decord leaks memory on repeated reads.
    """

    def __init__(self, *, max_requests: int = 500, startup_timeout_s: float = 60) -> None:
        self.max_requests = max_requests
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._served = 0

    def call(self, fn: Callable[..., T], args: tuple, *, uri: str, timeout_s: float) -> T:
        """Run module-level `fn(*args)` in the helper; kill it after `timeout_s` (startup excluded)."""
        with self._lock:
            conn = self._ensure_started(uri)
            conn.send((fn, args, uri))
            if not conn.poll(timeout_s):
                self._kill()
                raise DecodeTimeout(uri, timed_out_reason(timeout_s))
            try:
                ok, value = conn.recv()
            except (EOFError, OSError):
                code = self._exit_code()
                self._kill()
                raise VideoError(uri, f"the decoder process died (exit code {code})") from None
            self._served += 1
            if self._served >= self.max_requests:
                self._kill()
        if ok:
            return value
        raise value

    def close(self) -> None:
        with self._lock:
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _ensure_started(self, uri: str) -> Connection:
        if self._proc is not None and self._proc.poll() is None:
            return self._conn
        self._kill()
        # A fresh interpreter that imports only this module: unlike multiprocessing's 'spawn' it
        # never re-imports the caller's __main__ (a Ray worker, a notebook, stdin, or a driver
        # that imports torch), and works wherever the caller runs. It starts in ~2 s on 2 cores,
        # most of it importing torch (the frames' resize), once per `max_requests` requests.
        parent_sock, child_sock = socket.socketpair()
        for sock in (parent_sock, child_sock):  # a clip is megabytes: move it in few large writes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
        with parent_sock, child_sock:
            python_path = os.pathsep.join([_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                env={**os.environ, "PYTHONPATH": python_path},
            )
            self._conn, self._served = Connection(os.dup(parent_sock.fileno())), 0
        if not self._conn.poll(self.startup_timeout_s):
            self._kill()
            raise VideoError(uri, f"the decoder process did not start within {self.startup_timeout_s:g} s")
        try:
            self._conn.recv()  # the 'ready' message
        except (EOFError, OSError):
            code = self._exit_code()
            self._kill()
            raise VideoError(uri, f"the decoder process failed to start (exit code {code})") from None
        return self._conn

    def _exit_code(self) -> int | None:
        """The code of a helper that closed its pipe: it is exiting, give it a moment to finish."""
        try:
            return self._proc.wait(timeout=5) if self._proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # SIGKILL: a native loop holding the GIL ignores everything else
            self._proc.wait(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None


_SOCKET_BUFFER_BYTES = 4 << 20  # the kernel caps this at net.core.wmem_max / rmem_max
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_CHILD_MAIN = "import sys; from pipeline.decoder_process import _serve_fd; _serve_fd(int(sys.argv[1]))"


def _serve_fd(fd: int) -> None:
    """Child main loop: run (fn, args) requests until the parent closes its end."""
    conn = Connection(fd)
    for module in ("av", "decord"):  # import now so the first request is not slower
        try:
            __import__(module)
        except ImportError:
            pass
    import torch  # frame_sampling.shrink: a decode task holds one CPU, so one thread

    torch.set_num_threads(1)
    conn.send("ready")
    while True:
        try:
            fn, args, uri = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, fn(*args)))
        except VideoError as err:
            conn.send((False, err))
        except Exception as err:  # anything else becomes a VideoError so it pickles and names the file
            conn.send((False, VideoError(uri, f"{type(err).__name__}: {short_reason(err)}")))


@functools.cache
def _process_for(pid: int) -> DecoderProcess:
    return DecoderProcess()


def shared_decoder_process() -> DecoderProcess:
    """The helper of this process, started on first use. Keyed by pid so a forked child never
    talks to its parent's helper."""
    return _process_for(os.getpid())
