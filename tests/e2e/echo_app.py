"""A small HTTP application for end-to-end tests: it answers every request with itself.

The answer is JSON: the method, the request target as received (path and query), every
header in order (names lowercased, repeated names kept) and the body as text. Behind a
sidecar it shows what the sidecar changed on the way: headers added or removed by an
ext_authz decision, query parameters set or removed.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Echo", "EchoApp"]


@dataclass(frozen=True)
class Echo:
    """What the application received, as it answered it."""

    method: str
    target: str  # path and query, as on the request line
    headers: tuple[tuple[str, str], ...]
    body: str

    @classmethod
    def of(cls, answer: dict[str, Any]) -> Echo:
        return cls(
            answer["method"],
            answer["target"],
            tuple((k, v) for k, v in answer["headers"]),
            answer["body"],
        )

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def header(self, name: str) -> list[str]:
        """Every value of ``name``, in order; empty when absent."""
        return [v for k, v in self.headers if k == name.lower()]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar's upstream connections are

    def _echo(self) -> None:
        answer = {
            "method": self.command,
            "target": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": self._body().decode("utf-8", errors="replace"),
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reads the answers, not a log


class EchoApp:
    """The application on a loopback port picked at start, served from a thread."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def __enter__(self) -> EchoApp:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
