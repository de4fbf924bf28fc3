"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test S3 server (tests/s3_server.py).

Clients talk to the proxy as their `endpoint_url`; every request is forwarded to moto unchanged
(S3 signatures cover the Host header, which moto does not check), except requests whose path
ends with a key given a fault:

- ``"cut"``: GETs answer 200 with the full Content-Length, send half of the body, then close the
  connection, every time (a transfer that always breaks mid-way);
- ``"silent"``: every request is read and never answered, until the proxy stops (an object whose
  server hangs);
- ``"lost-answer"``: the first PUT is forwarded, and so applied, but answered 500 (a write whose
  answer was lost: the client retries it); later requests pass unchanged.

    with FaultProxy(s3_server, {"raw/cut.mp4": "cut", "raw/hang.mp4": "silent"}) as proxy:
        Storage(StorageConfig(endpoint_url=proxy.url)).local_copy("s3://b/raw/cut.mp4", cache)
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream_url: str, faults: dict[str, str]):
        assert set(faults.values()) <= {"cut", "silent", "lost-answer"}, faults
        self.upstream = urlsplit(upstream_url).netloc
        self.faults = faults
        self.hits: Counter = Counter()  # key -> requests that met its fault
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault_for(self, path: str) -> tuple[str, str] | None:
        bare = path.split("?", 1)[0]
        for key, fault in self.faults.items():
            if bare.endswith("/" + key):
                return key, fault
        return None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if not size:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            body = self._body()
            fault = proxy.fault_for(self.path)
            if fault and fault[1] == "silent":
                proxy.hits[fault[0]] += 1
                proxy.stopping.wait()  # never answer
                self.close_connection = True
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            upstream.close()
            if fault and fault[1] == "lost-answer" and self.command == "PUT" and not proxy.hits[fault[0]]:
                proxy.hits[fault[0]] += 1
                return self._answer_500()
            cut = fault is not None and fault[1] == "cut" and self.command == "GET" and answer.status in (200, 206) and len(data) > 1
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP | {"content-length"}:
                    self.send_header(name, value)
            # a HEAD has no body but announces the object's size: pass that through
            size = answer.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", size or str(len(data)))
            if cut:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut:
                proxy.hits[fault[0]] += 1
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

        def _answer_500(self) -> None:
            body = b"<Error><Code>InternalError</Code><Message>lost answer</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler
