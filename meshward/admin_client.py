"""HTTP client for the admin API over its Unix socket, used by the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

__all__ = ["AdminClient", "AdminError"]


class AdminError(Exception):
    """The server refused a request, or could not be reached; the message says what to do."""

    def __init__(
        self, message: str, *, field: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.status = status


class AdminClient:
    def __init__(self, socket: Path, *, timeout: float = 30.0) -> None:
        self.socket = socket
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)),
            base_url="http://meshward",
            timeout=timeout,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if not self.socket.exists():
            raise AdminError(
                f"no meshward server socket at {self.socket}; start one with "
                f"`meshward up --data-dir {self.socket.parent.parent}` or pass the --data-dir "
                "it runs with"
            )
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AdminError(
                f"cannot reach the meshward server at {self.socket} ({exc}); is it running?"
            ) from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise AdminError(
                    error["message"], field=error.get("field"), status=response.status_code
                )
            except (ValueError, KeyError, TypeError):
                raise AdminError(
                    f"server answered {response.status_code}: {response.text[:200]}",
                    status=response.status_code,
                ) from None
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()
