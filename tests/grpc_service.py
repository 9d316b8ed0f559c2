"""A small gRPC service for the tests, defined with generic handlers (no generated code).

``Ticket`` has one method of each kind; replies are JSON naming the serving
endpoint and the admitted epoch (``leaderwatch.grpc.current_epoch()``).
Requests and replies are bytes on the wire; :class:`TicketStub` is what a
generated stub looks like (it takes a channel, or a ``LeaderChannelPool``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import grpc
import grpc.aio

from leaderwatch.grpc import NotAdmitted, current_epoch

SERVICE = "leaderwatch.test.Ticket"
WHO = f"/{SERVICE}/Who"
"""unary-unary: ``b""`` → ``{"endpoint", "epoch", "pid"}``."""
COUNT = f"/{SERVICE}/Count"
"""unary-stream: ``b"N"`` → N replies, each with ``"index"``."""
SLOW = f"/{SERVICE}/Slow"
"""unary-unary: ``b"<ms>"`` → the reply after sleeping that long (admission spans the sleep)."""
FAIL = f"/{SERVICE}/Fail"
"""unary-unary: ``b"<STATUS_CODE_NAME>"`` → aborts with that code (and a trailer ``x-test: 1``)."""
SUM = f"/{SERVICE}/Sum"
"""stream-unary: numbers → their sum."""
ECHO = f"/{SERVICE}/Echo"
"""stream-stream: each request back."""
METADATA = f"/{SERVICE}/Metadata"
"""unary-unary: sends its own initial metadata ``x-handler: yes`` then replies."""


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def decode(data: bytes) -> Any:
    return json.loads(data)


def identity(data: bytes) -> bytes:
    return data


class TicketStub:
    """What generated code for the ``Ticket`` service would look like."""

    def __init__(self, channel: Any) -> None:
        self.Who = channel.unary_unary(
            WHO, request_serializer=identity, response_deserializer=decode, _registered_method=True
        )
        self.Count = channel.unary_stream(
            COUNT,
            request_serializer=identity,
            response_deserializer=decode,
            _registered_method=True,
        )
        self.Slow = channel.unary_unary(
            SLOW, request_serializer=identity, response_deserializer=decode, _registered_method=True
        )
        self.Fail = channel.unary_unary(
            FAIL, request_serializer=identity, response_deserializer=decode, _registered_method=True
        )
        self.Sum = channel.stream_unary(
            SUM, request_serializer=encode, response_deserializer=decode, _registered_method=True
        )
        self.Echo = channel.stream_stream(
            ECHO, request_serializer=encode, response_deserializer=decode, _registered_method=True
        )
        self.Metadata = channel.unary_unary(
            METADATA,
            request_serializer=identity,
            response_deserializer=decode,
            _registered_method=True,
        )


def _epoch() -> int | None:
    try:
        return current_epoch()
    except NotAdmitted:
        return None


def ticket_handler(
    endpoint: str, record: Callable[..., None] = lambda kind, **fields: None
) -> grpc.GenericRpcHandler:
    """The ``Ticket`` service of the node at ``endpoint``; ``record(kind, **fields)`` logs calls."""

    def reply(**fields: Any) -> bytes:
        return encode({"endpoint": endpoint, "epoch": _epoch(), "pid": os.getpid(), **fields})

    async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        record("call", method="Who", epoch=_epoch(), t=time.monotonic())
        return reply()

    async def count(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        record("call", method="Count", epoch=_epoch(), t=time.monotonic())
        for index in range(int(request or b"3")):
            yield reply(index=index)

    async def slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        started = time.monotonic()
        record("admitted", method="Slow", epoch=_epoch(), t0=started)
        await anyio.sleep(int(request or b"500") / 1000)
        record("call", method="Slow", epoch=_epoch(), t0=started, t=time.monotonic())
        return reply()

    async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        code = grpc.StatusCode[request.decode()]
        await context.abort(code, f"asked to fail with {code.name}", (("x-test", "1"),))
        raise AssertionError("unreachable")

    async def total(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        values = [decode(item) async for item in requests]
        return reply(sum=sum(values))

    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for item in requests:
            yield reply(value=decode(item))

    async def metadata(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.send_initial_metadata((("x-handler", "yes"),))
        return reply()

    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Who": unary(who),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Slow": unary(slow),
            "Fail": unary(fail),
            "Sum": grpc.stream_unary_rpc_method_handler(total),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
            "Metadata": unary(metadata),
        },
    )
