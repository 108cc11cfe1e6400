"""A client xDS stream for the SDS and ECDS tests: requests in through a queue,
responses out one by one."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any


class XdsCall:
    def __init__(self, rpc: Callable[..., Any], *, timeout: float) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses = rpc(iter(self._requests.get, None), timeout=timeout)

    def send(self, request: Any) -> XdsCall:
        self._requests.put(request)
        return self

    def recv(self) -> Any:
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
