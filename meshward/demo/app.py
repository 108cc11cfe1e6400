"""A workload of the sample mesh: answers behind its sidecar, calls others through it.

``python -m meshward.demo.app NAME APP_PORT CONTROL_PORT OUTBOUND_PORT [CALLS]`` serves

- on APP_PORT (reached only through its sidecar's inbound listener): every request is
  answered with JSON naming this workload, the caller the sidecar verified and the
  decision that let the request in; a workload with downstream ``CALLS``
  (``reviews:ratings``) calls them first, as Bookinfo's reviews calls ratings;
- on CONTROL_PORT (loopback, for the traffic generator only): ``POST /call`` with
  ``{"to", "method", "path", "headers"}`` makes this workload send that request to
  another workload through its sidecar's outbound listener, and reports what came back.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

DECISION_ID = "x-meshward-decision-id"
_KEPT_HEADERS = (DECISION_ID, "content-type", "www-authenticate")


class Workload:
    def __init__(self, name: str, outbound_port: int, downstream: list[str]) -> None:
        self.name = name
        self.downstream = downstream
        # One pooled client: connections to the sidecar's outbound listener are reused.
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{outbound_port}", timeout=10)

    def call(self, to: str, method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
        try:
            response = self.client.request(method, path, headers={"host": to, **headers})
        except httpx.HTTPError as exc:
            return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "status": response.status_code,
            "headers": {k: response.headers[k] for k in _KEPT_HEADERS if k in response.headers},
            "body": response.text,
        }


def _handler(workload: Workload, *, control: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the sidecars' access logs say it all

        def _reply(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _serve(self) -> None:
            if control:
                if (self.command, self.path) != ("POST", "/call"):
                    self._reply(404, {"error": "POST /call only"})
                    return
                ask = json.loads(self._body())
                self._reply(
                    200,
                    workload.call(ask["to"], ask["method"], ask["path"], ask.get("headers", {})),
                )
                return
            self._body()
            item = self.path.rstrip("/").rsplit("/", 1)[-1]
            calls = {
                to: workload.call(to, "GET", f"/{to}/{item}", {})
                for to in workload.downstream
                if self.command == "GET"
            }
            self._reply(
                200,
                {
                    "workload": workload.name,
                    "method": self.command,
                    "path": self.path,
                    "caller": _peer(self.headers.get("x-forwarded-client-cert", "")),
                    "decision_id": self.headers.get(DECISION_ID),
                    "user": self.headers.get("x-user"),
                    "calls": calls,
                },
            )

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    return Handler


def _peer(xfcc: str) -> str | None:
    for part in xfcc.split(";"):
        key, _, value = part.partition("=")
        if key == "URI":
            return value
    return None


def main(argv: list[str]) -> None:
    name, app_port, control_port, outbound_port = argv[:4]
    downstream = argv[4].split(",") if len(argv) > 4 and argv[4] else []
    workload = Workload(name, int(outbound_port), downstream)
    servers = [
        ThreadingHTTPServer(("127.0.0.1", int(port)), _handler(workload, control=control))
        for port, control in ((app_port, False), (control_port, True))
    ]
    for server in servers:
        server.daemon_threads = True
    threading.Thread(target=servers[1].serve_forever, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        servers[0].serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
