"""The transport half of an xDS stream: requests and updates, raced until the client leaves.

Shared by the SDS and ECDS servicers, which differ only in what an update is (a caller's
SVIDs and bundles, or the extension configs of the policy set) and in how a failure
becomes a gRPC status. The protocol decisions stay in :mod:`identity.xds`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from identity.errors import IdentityError

__all__ = ["Updates", "Versioned", "serve_stream"]


class Versioned(Protocol):
    @property
    def version(self) -> int: ...


V = TypeVar("V", bound=Versioned)
V_co = TypeVar("V_co", bound=Versioned, covariant=True)
_Request = TypeVar("_Request")


class Updates(Protocol[V_co]):
    """The latest state a stream renders from, and a way to wait for the next one."""

    @property
    def latest(self) -> V_co: ...

    async def changed(self, since: int) -> V_co:
        """Wait until there is a state with a version greater than ``since``."""
        ...


async def serve_stream(
    requests: AsyncIterator[_Request],
    context: grpc.aio.ServicerContext[Any, Any],
    updates: Updates[V],
    *,
    on_request: Callable[[_Request, V], Any],
    on_update: Callable[[V], Any],
    fail: Callable[[IdentityError], Awaitable[NoReturn]],
    sent: Callable[[], None],
) -> None:
    """Wait for whichever comes first, a request or an update, until the client leaves.

    ``on_request``/``on_update`` return the response to write, or None; an IdentityError
    they raise goes to ``fail``, which ends the call with a status. ``sent`` counts.
    """
    incoming = aiter(requests)
    seen = updates.latest.version
    next_request: asyncio.Future[Any] = asyncio.ensure_future(anext(incoming, None))
    next_update: asyncio.Future[V] = asyncio.ensure_future(updates.changed(seen))
    try:
        while True:
            await asyncio.wait((next_request, next_update), return_when=asyncio.FIRST_COMPLETED)
            response = None
            try:
                if next_request.done():
                    request = next_request.result()
                    if request is None:
                        return  # the client closed its side
                    next_request = asyncio.ensure_future(anext(incoming, None))
                    response = on_request(request, updates.latest)
                else:
                    update = next_update.result()
                    seen = update.version
                    next_update = asyncio.ensure_future(updates.changed(seen))
                    response = on_update(update)
            except IdentityError as exc:
                await fail(exc)
            if response is not None:
                await context.write(response)
                sent()
    finally:
        for future in (next_request, next_update):
            future.cancel()
