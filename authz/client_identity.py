"""Only listed SPIFFE IDs may call the authz server (gRPC with mTLS).

TLS has already checked that the client's certificate chains to the trust bundle; this
interceptor checks *who* it is. gRPC puts the certificate's SPIFFE ID in the auth
context as ``peer_spiffe_id`` when the certificate has exactly one URI SAN and it is a
SPIFFE ID, which is what an X509-SVID must have. A call without one fails
UNAUTHENTICATED; a SPIFFE ID not listed fails PERMISSION_DENIED. Every RPC on the
server is covered (Check, health, reflection), so a refused client learns nothing.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

__all__ = ["AllowedClients", "peer_spiffe_id"]

log = logging.getLogger(__name__)


def peer_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    values = list(context.auth_context().get("peer_spiffe_id") or ())
    return values[0].decode() if len(values) == 1 else None


class AllowedClients(grpc.aio.ServerInterceptor):
    def __init__(self, allowed: Iterable[str], *, registry: CollectorRegistry) -> None:
        self._allowed = frozenset(allowed)
        self._logged: set[str | None] = set()
        self.refused = Counter(
            "meshward_authz_clients_refused",
            "gRPC calls refused because of the client's SPIFFE ID, by reason",
            ["reason"],
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _guarded(handler, self._admit)

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        spiffe_id = peer_spiffe_id(context)
        if spiffe_id in self._allowed:
            return
        reason = "no_spiffe_id" if spiffe_id is None else "not_allowed"
        self.refused.labels(reason).inc()
        if spiffe_id not in self._logged and len(self._logged) < 1000:
            # Once per client: a misconfigured sidecar retries forever.
            self._logged.add(spiffe_id)
            log.warning(
                "authz: refused a client %s",
                "without a SPIFFE ID in its certificate"
                if spiffe_id is None
                else f"{spiffe_id} (not in authz.tls.allowed_clients)",
            )
        if spiffe_id is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate carries no SPIFFE ID (one URI SAN spiffe://...)",
            )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{spiffe_id} may not call this authz server"
        )


Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], admit: Admit
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, calling ``admit`` before the method runs."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def guarded_unary_unary(request: Any, context: Any) -> Any:
            await admit(context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, **codec)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def guarded_stream_unary(requests: Any, context: Any) -> Any:
            await admit(context)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, **codec)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def guarded_unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await admit(context)
            async for response in _responses(unary_stream(request, context)):
                yield response

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, **codec)
    stream_stream = handler.stream_stream
    assert stream_stream is not None, "a handler has one of the four method kinds"

    async def guarded_stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await admit(context)
        async for response in _responses(stream_stream(requests, context)):
            yield response

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, **codec)


async def _responses(result: Any) -> AsyncIterator[Any]:
    # A streaming method is an async generator, or a coroutine that writes with
    # context.write() and returns nothing.
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    elif inspect.isawaitable(result):
        await result
    else:
        for response in result:
            yield response
