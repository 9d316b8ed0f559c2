"""gRPC services behind one leader (``pip install 'leaderwatch[grpc]'``; grpcio's ``grpc.aio``).

Server: :class:`LeaderInterceptor` runs every call inside
``node.admit()`` on the leader and answers it elsewhere with
``FAILED_PRECONDITION`` and the leader hint in trailers (DESIGN contract 9):

- ``leader-endpoint`` and ``leader-epoch`` (decimal), the header form of HTTP;
- ``leader-hint-bin``: the binary form (:meth:`~leaderwatch.hint.LeaderHint.to_binary`,
  the protobuf message ``tsoracle.v1.LeaderHint``), and with
  ``tsoracle_compatible=True`` the same bytes as ``tsoracle-leader-hint-bin``,
  so clients of the original system follow the redirect;
- no hint at all when no leader is known: "no leader yet, retry".

A served call's initial metadata carries ``leader-epoch``; its handler reads
the admitted epoch (the fencing token) with :func:`current_epoch`.

Client: :class:`LeaderChannelPool` keeps one ``grpc.aio.Channel`` per
endpoint and gives stubs whose unary-unary and unary-stream methods go to the
leader, following hints through a :class:`~leaderwatch.client.LeaderCache`
and retrying with the one attempt loop of :mod:`leaderwatch.retry` (the same
planner as :mod:`leaderwatch.httpx`).

grpc.aio runs on asyncio only, and binds process-wide state to the first
event loop that uses it: this module uses asyncio through grpc.aio where
grpc demands it and anyio everywhere else.
"""

from __future__ import annotations

try:
    import grpc
    import grpc.aio
except ImportError as _missing:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "leaderwatch.grpc needs grpcio, which is not installed: pip install 'leaderwatch[grpc]'"
    ) from _missing
if not hasattr(grpc, "aio"):  # pragma: no cover - a path mistake, not a state
    raise ImportError(
        f"'import grpc' found {getattr(grpc, '__file__', grpc)!r}, not grpcio: "
        "do not run Python from inside the leaderwatch/ directory"
    )

import contextlib
import contextvars
import inspect
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, Protocol, TypeVar, cast

import anyio

from leaderwatch._log import get_logger
from leaderwatch.client import LeaderCache, NoLeaderYet
from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import (
    ENDPOINT_HEADER,
    EPOCH_HEADER,
    HINT_TRAILER,
    IDEMPOTENCY_KEY_HEADER,
    TSORACLE_HINT_TRAILER,
    LeaderHint,
    MalformedHint,
    parse_epoch_decimal,
    parse_hint_binary,
    parse_hint_headers,
)
from leaderwatch.node import LeaderNode, NotLeader
from leaderwatch.redirect import Redirect, Serve
from leaderwatch.retry import (
    DONE,
    Attempt,
    AttemptPlan,
    ConnectFailed,
    GaveUp,
    GaveUpError,
    NoLeader,
    Outcome,
    Redirected,
    RetryPolicy,
    SentButNoResponse,
    Served,
    TimedOut,
    error_text,
)
from leaderwatch.state import parse_endpoint

__all__ = [
    "DEFAULT_EXEMPT",
    "HINT_TRAILER",
    "IDEMPOTENCY_KEY_METADATA",
    "TSORACLE_HINT_TRAILER",
    "AdmissionNode",
    "LeaderChannelPool",
    "LeaderInterceptor",
    "LeaderStreamCall",
    "LeaderStreamStream",
    "LeaderStreamUnary",
    "LeaderUnaryStream",
    "LeaderUnaryUnary",
    "LeaderUnavailable",
    "NotAdmitted",
    "PoolClosed",
    "current_epoch",
    "hand_over",
]

_log = get_logger("leaderwatch.grpc")

IDEMPOTENCY_KEY_METADATA: Final = IDEMPOTENCY_KEY_HEADER.lower()
"""Metadata naming one logical call across its attempts, for the server to deduplicate
(:data:`leaderwatch.hint.IDEMPOTENCY_KEY_HEADER`, lower case as gRPC requires)."""

DEFAULT_EXEMPT: Final = ("grpc.health.v1.Health",)
"""Services answered on every node by default: the standard gRPC health service."""

DEFAULT_MAX_HINT_CHANNELS: Final = 8
"""Channels kept open to endpoints that came only from hints (not configured)."""

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Stub = TypeVar("_Stub")

_EPOCH: Final[contextvars.ContextVar[int]] = contextvars.ContextVar("leaderwatch_grpc_epoch")


class NotAdmitted(LeaderwatchError, LookupError):
    """:func:`current_epoch` was called outside a call admitted by :class:`LeaderInterceptor`."""


def current_epoch() -> int:
    """The epoch the current gRPC call was admitted at: the fencing token to stamp on writes.

    Valid inside a handler that :class:`LeaderInterceptor` admitted (and in
    tasks it starts, which copy the context); raises :class:`NotAdmitted`
    elsewhere, including in exempt methods, which run on every node.
    """
    try:
        return _EPOCH.get()
    except LookupError:
        raise NotAdmitted(
            "current_epoch() is only available inside a gRPC call admitted by "
            "LeaderInterceptor (not in exempt methods, not outside a call); "
            "install the interceptor on the server, or read node.decide() yourself"
        ) from None


# --- server -----------------------------------------------------------------------------------


class AdmissionNode(Protocol):
    """What the interceptor needs of a node (:class:`leaderwatch.node.LeaderNode` is one).

    ``admit()`` enters only while the node serves and gives the epoch, else
    raises :class:`leaderwatch.node.NotLeader` carrying the decision.
    """

    def decide(self) -> Serve | Redirect | NoLeaderYet: ...

    def admit(self) -> AbstractAsyncContextManager[int]: ...


_Metadata = tuple[tuple[str, str | bytes], ...]


class _AdmittedContext:
    """The servicer context a wrapped handler sees: ``leader-epoch`` joins its metadata.

    Everything else is the real context's. The epoch is in the trailing
    metadata from the start (it travels with the status, at no cost; a
    handler's own trailing metadata is merged with it). In the initial
    metadata it goes out when the handler sends its own (merged), or before
    the first response message of a stream (:meth:`write`), or when
    :meth:`flush` is called.
    """

    __slots__ = ("_context", "_epoch_metadata", "_sent")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], epoch: int) -> None:
        self._context = context
        self._epoch_metadata: _Metadata = ((EPOCH_HEADER, str(epoch)),)
        self._sent = False
        context.set_trailing_metadata(self._epoch_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    @property
    def leader_epoch(self) -> int:
        """The epoch this call was admitted at (also :func:`current_epoch`)."""
        return int(cast(str, self._epoch_metadata[0][1]))

    def set_trailing_metadata(self, trailing_metadata: Iterable[tuple[str, Any]]) -> None:
        self._context.set_trailing_metadata((*self._epoch_metadata, *trailing_metadata))

    async def send_initial_metadata(self, initial_metadata: Iterable[tuple[str, Any]]) -> None:
        if self._sent:
            # Let grpc raise its own "already sent" error.
            await self._context.send_initial_metadata(tuple(initial_metadata))
            return
        self._sent = True
        await self._context.send_initial_metadata((*self._epoch_metadata, *initial_metadata))

    async def write(self, message: Any) -> None:
        if not self._sent:
            await self.send_initial_metadata(())
        await self._context.write(message)

    async def flush(self) -> None:
        """Send the initial metadata now unless it went already."""
        if not self._sent:
            await self.send_initial_metadata(())


def _method_matcher(exempt: Iterable[str]) -> Callable[[str], bool]:
    if isinstance(exempt, str):
        raise TypeError(
            "exempt must be a collection of service or method names, not one string "
            f"(got {exempt!r}); write exempt=({exempt!r},)"
        )
    methods: set[str] = set()
    services: set[str] = set()
    for name in exempt:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(
                "exempt entries are service names ('pkg.Service') or full method names "
                f"('/pkg.Service/Method') (got {name!r})"
            )
        if name.startswith("/"):
            methods.add(name)
        else:
            services.add(name)

    def is_exempt(method: str) -> bool:
        if method in methods:
            return True
        service = method[1:].rpartition("/")[0]
        return service in services

    return is_exempt


class LeaderInterceptor(grpc.aio.ServerInterceptor):
    """A ``grpc.aio`` server interceptor: calls run on the leader, others get a hint.

    ``node`` is a :class:`~leaderwatch.node.LeaderNode` (or anything with
    its ``decide()`` and ``admit()``). For each call of a method that is not
    ``exempt`` (unary or streaming, request or response):

    - the call runs inside ``node.admit()``: only while the node serves, and
      counted, so stepping down drains it (and cancels it past the drain
      timeout); the handler reads the admitted epoch with
      :func:`current_epoch`; the reply carries ``leader-epoch`` in its
      initial metadata and in its trailing metadata. With
      ``epoch_in_initial_metadata=False`` a unary reply carries it in the
      trailing metadata only (streaming replies keep both): grpc.aio sends
      the initial metadata of a unary response in a batch of its own, which
      costs about a fifth of a small call's time over loopback, and the
      trailers travel with the status for free; leaderwatch clients read
      either;
    - if the node does not serve, the call is answered
      ``FAILED_PRECONDITION`` with the hint in trailers (``leader-endpoint``,
      ``leader-epoch``, ``leader-hint-bin``, and ``tsoracle-leader-hint-bin``
      with ``tsoracle_compatible=True``), or no hint trailer at all when no
      leader is known (retry later). The handler does not run;
    - if the node cancels the admitted call (it stepped down and the drain
      timeout passed, or it lost leadership mid-call), the call ends
      ``UNAVAILABLE`` (it may have been partly done), never
      ``FAILED_PRECONDITION``, so clients re-send it only if it is safe to.

    ``exempt`` holds service names (``"pkg.Service"``, every method) and full
    method names (``"/pkg.Service/Method"``) served on every node, without
    admission; by default the standard health service. Handlers must be
    ``async`` (coroutines or async generators), as grpc.aio handlers are.
    """

    def __init__(
        self,
        node: AdmissionNode,
        *,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        tsoracle_compatible: bool = False,
        epoch_in_initial_metadata: bool = True,
    ) -> None:
        if not callable(getattr(node, "admit", None)):
            raise TypeError(
                f"node must be a LeaderNode (or have its admit() method); got {type(node).__name__}"
            )
        self._node = node
        self._is_exempt = _method_matcher(exempt)
        self._tsoracle_compatible = bool(tsoracle_compatible)
        self._epoch_in_initial_metadata = bool(epoch_in_initial_metadata)
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}
        self._refusals: tuple[Redirect | NoLeaderYet, _Metadata, str] | None = None

    @property
    def node(self) -> AdmissionNode:
        """The node whose admission this interceptor enforces."""
        return self._node

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
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = handler if self._is_exempt(method) else self._wrap(handler, method)
        if len(self._wrapped) >= 4096:  # bounded, whatever method names clients send
            self._wrapped.clear()
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    # Refusals.

    def _refusal(self, decision: Redirect | NoLeaderYet) -> tuple[_Metadata, str]:
        cached = self._refusals
        if cached is not None and cached[0] == decision:
            return cached[1], cached[2]
        if isinstance(decision, Redirect):
            hint = decision.hint
            binary = hint.to_binary()
            trailers: list[tuple[str, str | bytes]] = list(hint.to_headers().items())
            trailers.append((HINT_TRAILER, binary))
            if self._tsoracle_compatible:
                trailers.append((TSORACLE_HINT_TRAILER, binary))
            epoch = "" if hint.leader_epoch is None else f" at epoch {hint.leader_epoch}"
            details = f"not leader: the leader is {hint.leader_endpoint}{epoch}"
            metadata: _Metadata = tuple(trailers)
        else:
            known = decision.leader_epoch
            details = "not leader: no leader yet" + (
                "" if known is None else f" (newest epoch known: {known})"
            )
            metadata = ()
        self._refusals = (decision, metadata, details)
        return metadata, details

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], refused: NotLeader, *, admitted: bool
    ) -> None:
        if admitted:
            _log.warning("grpc_admitted_call_cancelled", reason=str(refused))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(refused))
        metadata, details = self._refusal(refused.decision)
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, details, metadata)

    # Wrapping.

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> Any:
        node, refuse = self._node, self._refuse
        initial_epoch = self._epoch_in_initial_metadata
        if handler.unary_unary is not None:
            behavior: Any = handler.unary_unary
            factory: Any = grpc.unary_unary_rpc_method_handler
            streaming_response = False
        elif handler.unary_stream is not None:
            behavior = handler.unary_stream
            factory = grpc.unary_stream_rpc_method_handler
            streaming_response = True
        elif handler.stream_unary is not None:
            behavior = handler.stream_unary
            factory = grpc.stream_unary_rpc_method_handler
            streaming_response = False
        else:
            behavior = handler.stream_stream
            factory = grpc.stream_stream_rpc_method_handler
            streaming_response = True
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            _log.error("grpc_handler_not_async", method=method)

            async def not_async(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{method}: LeaderInterceptor serves async handlers only (async def)",
                )

            return factory(
                not_async,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if streaming_response:

            async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                admitted = False
                try:
                    async with node.admit() as epoch:
                        admitted = True
                        token = _EPOCH.set(epoch)
                        try:
                            admitted_context = _AdmittedContext(context, epoch)
                            result = behavior(request, admitted_context)
                            if inspect.isasyncgen(result):
                                async with contextlib.aclosing(result):
                                    async for message in result:
                                        await admitted_context.write(message)
                            else:
                                await result
                            await admitted_context.flush()
                        finally:
                            _EPOCH.reset(token)
                except NotLeader as refused:
                    await refuse(context, refused, admitted=admitted)
                return None

        else:

            async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                admitted = False
                try:
                    async with node.admit() as epoch:
                        admitted = True
                        token = _EPOCH.set(epoch)
                        try:
                            admitted_context = _AdmittedContext(context, epoch)
                            response = await behavior(request, admitted_context)
                            if initial_epoch:
                                await admitted_context.flush()
                            return response
                        finally:
                            _EPOCH.reset(token)
                except NotLeader as refused:
                    await refuse(context, refused, admitted=admitted)
                return None

        return factory(
            serve,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def hand_over(
    node: LeaderNode, server: grpc.aio.Server, *, grace: float = 5.0, linger: float = 1.0
) -> None:
    """Stop serving gracefully: hand leadership over, point clients at the successor, then stop.

    In this order: ``await node.step_down()`` (new calls are refused with
    ``FAILED_PRECONDITION``; admitted calls finish within the node's drain
    timeout; the node resigns and keeps observing); the server keeps
    answering with redirects until the node names its successor, at most
    ``linger`` seconds, so clients learn where to go instead of finding a
    closed port; then ``await server.stop(grace)``. Call it at the first
    SIGTERM, before anything else stops the server. Leaving ``async with
    node`` afterwards stops the driver.
    """
    await node.step_down()
    receiver = node.serving
    with anyio.move_on_after(linger):
        await receiver.wait_for(lambda _: isinstance(node.decide(), Redirect))
    with anyio.CancelScope(shield=True):
        await server.stop(grace)


# --- client -----------------------------------------------------------------------------------


class PoolClosed(LeaderwatchError, RuntimeError):
    """A call was made through a :class:`LeaderChannelPool` that is closed."""


class LeaderUnavailable(GaveUpError, grpc.aio.AioRpcError):
    """A leader-aware call gave up; ``.attempts`` says what each attempt got.

    Both a :class:`~leaderwatch.errors.LeaderwatchError` (a
    :class:`~leaderwatch.retry.GaveUpError`: ``.reason`` is
    ``deadline_exceeded``, ``max_redirects_exceeded`` or ``outcome_unknown``)
    and a ``grpc.aio.AioRpcError``, so code handling gRPC errors handles it
    too: ``.code()``, the metadata and ``.last_error`` are those of the last
    attempt's error; ``.details()`` says why the call was given up.
    """

    def __init__(self, gave_up: GaveUp, last_error: grpc.aio.AioRpcError | None) -> None:
        code = grpc.StatusCode.UNAVAILABLE if last_error is None else last_error.code()
        if gave_up.reason == "deadline_exceeded" and (
            last_error is None or code is grpc.StatusCode.DEADLINE_EXCEEDED
        ):
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        grpc.aio.AioRpcError.__init__(
            self,
            code,
            None if last_error is None else last_error.initial_metadata(),
            None if last_error is None else last_error.trailing_metadata(),
            gave_up.message,
            None if last_error is None else last_error.debug_error_string(),
        )
        self.args = (gave_up.message,)
        self.gave_up = gave_up
        self.last_error = last_error


_CONNECT_FAILURES: Final = (
    "failed to connect to all addresses",
    "dns resolution failed",
    "name resolution failure",
    "empty address list",
)


def _failure_outcome(error: grpc.aio.AioRpcError) -> Outcome | None:
    """The attempt outcome of a transport-level error, ``None`` for an answer to return."""
    code = error.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        details = (error.details() or "").lower()
        if details.startswith(_CONNECT_FAILURES) or any(
            text in details for text in _CONNECT_FAILURES[1:]
        ):
            return ConnectFailed(error=error_text_of(error))
        return SentButNoResponse(error=error_text_of(error))
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimedOut(sent=True, error=error_text_of(error))
    if code is grpc.StatusCode.CANCELLED:
        # Not the caller's own cancellation (that raises CancelledError): the server or the
        # connection cancelled it, e.g. a server shutting down; it may have run.
        return SentButNoResponse(error=error_text_of(error))
    return None


def error_text_of(error: grpc.aio.AioRpcError) -> str:
    """``CODE: details``, short, for an attempt record."""
    return error_text(RuntimeError(f"{error.code().name}: {error.details() or ''}"))


def _pairs(metadata: Any) -> Iterable[tuple[str, Any]]:
    if metadata is None:
        return ()
    return cast(Iterable[tuple[str, Any]], metadata)


def _hint_of(trailers: Any) -> LeaderHint | MalformedHint | None:
    """The hint of a ``FAILED_PRECONDITION``: binary (ours, then tsoracle's), else text."""
    ours = theirs = None
    text: list[tuple[str, Any]] = []
    for key, value in _pairs(trailers):
        if key == HINT_TRAILER:
            ours = value
        elif key == TSORACLE_HINT_TRAILER:
            theirs = value
        elif key in (ENDPOINT_HEADER, EPOCH_HEADER):
            text.append((key, value))
    if ours is not None:
        return parse_hint_binary(ours)
    if theirs is not None:
        return parse_hint_binary(theirs)
    return parse_hint_headers(text) if text else None


def _attempt_outcome(error: grpc.aio.AioRpcError) -> Outcome | None:
    """The attempt outcome of ``error``; ``None``: raise it to the caller untouched.

    A hint naming a node that said "no leader yet" during the same call is
    judged by the plan (:class:`~leaderwatch.retry.AttemptPlan`), as for
    every protocol.
    """
    if error.code() is not grpc.StatusCode.FAILED_PRECONDITION:
        return _failure_outcome(error)
    return _precondition_outcome(error)


def _precondition_outcome(error: grpc.aio.AioRpcError) -> Outcome:
    hint = _hint_of(error.trailing_metadata())
    if hint is None:
        return NoLeader()
    if isinstance(hint, LeaderHint) and hint.leader_endpoint is None:
        return NoLeader(epoch=hint.leader_epoch)
    return Redirected(hint=hint)


def _served_epoch(metadata: Any) -> int | None:
    if isinstance(metadata, grpc.aio.Metadata):
        value = metadata.get(EPOCH_HEADER)
    else:
        value = next((v for k, v in _pairs(metadata) if k == EPOCH_HEADER), None)
    if not isinstance(value, str):
        return None
    epoch = parse_epoch_decimal(value)
    return epoch if isinstance(epoch, int) else None


class _Pooled:
    """One open channel, its multi-callables, and how many calls use it."""

    __slots__ = ("callables", "channel", "endpoint", "evicted", "users")

    def __init__(self, endpoint: str, channel: grpc.aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.callables: dict[int, Any] = {}
        self.users = 0
        self.evicted = False


class _Method:
    """What a leader-aware multi-callable shares: the pool, the method, how to (de)serialize."""

    __slots__ = (
        "_kind",
        "_method",
        "_pool",
        "_request_serializer",
        "_response_deserializer",
        "idempotent",
    )

    def __init__(
        self,
        pool: LeaderChannelPool,
        kind: str,
        method: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
        idempotent: bool,
    ) -> None:
        self._pool = pool
        self._kind = kind
        self._method = method
        self._request_serializer = request_serializer
        self._response_deserializer = response_deserializer
        self.idempotent = idempotent

    def _callable(self, pooled: _Pooled) -> Any:
        found = pooled.callables.get(id(self))
        if found is None:
            found = pooled.callables[id(self)] = getattr(pooled.channel, self._kind)(
                self._method,
                request_serializer=self._request_serializer,
                response_deserializer=self._response_deserializer,
                _registered_method=True,
            )
        return found


class LeaderUnaryUnary(_Method, Generic[_Request, _Response]):
    """A unary-unary method that goes to the leader; ``await it(request, ...)`` → the response.

    Same keyword arguments as grpc.aio's multi-callables. ``timeout`` is the
    deadline of the whole call, across all attempts (default: the policy's
    ``deadline``); each attempt gets at most the policy's ``attempt_timeout``.
    """

    async def __call__(
        self,
        request: _Request,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - grpc's own keyword, the call's deadline
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _Response:
        pool = self._pool
        metadata, plan = pool._plan(self.idempotent, timeout, metadata)
        last: list[grpc.aio.AioRpcError] = []
        step: Attempt | object = plan.start()
        while isinstance(step, Attempt):
            if step.delay > 0:
                await pool._sleep(step.delay)
            pooled = pool._acquire_now(step.endpoint)
            if pool._crowded:
                await pool._make_room(keep=step.endpoint)
            try:
                call = self._callable(pooled)(
                    request,
                    timeout=step.timeout,
                    metadata=metadata,
                    credentials=credentials,
                    wait_for_ready=wait_for_ready,
                    compression=compression,
                )
                try:
                    response = await call
                except grpc.aio.AioRpcError as error:
                    last[:] = [error]
                    outcome = _attempt_outcome(error)
                    if outcome is None:
                        plan.after(pool._served(None))
                        raise
                    step = plan.after(outcome)
                    continue
                epoch = _served_epoch(await call.trailing_metadata())
                if epoch is None:
                    epoch = _served_epoch(await call.initial_metadata())
            finally:
                if pool._release_now(pooled):
                    await pool._close_retired(pooled)
            step = plan.after(pool._served(epoch))
            if step is DONE:
                return cast(_Response, response)
        raise LeaderUnavailable(cast(GaveUp, step), last[0] if last else None)


class LeaderStreamCall(Generic[_Response]):
    """The responses of a leader-aware unary-stream call: ``async for response in call``.

    The call is retried (redirects, no leader yet, unavailable) only until
    its first message (or its clean end) arrived; after that, an error is
    raised as grpc raised it. ``endpoint`` and ``epoch`` say who served it,
    once known. ``cancel()`` cancels it.
    """

    def __init__(
        self,
        method: LeaderUnaryStream[Any, _Response],
        request: Any,
        options: dict[str, Any],
        timeout: float | None,
        metadata: Any,
    ) -> None:
        self._method = method
        self._request = request
        self._options = options
        self._timeout = timeout
        self._metadata = metadata
        self._call: Any = None
        self._pooled: _Pooled | None = None
        self._pending: list[Any] = []
        self._started = False
        self._finished = False
        self.endpoint: str | None = None
        self.epoch: int | None = None

    def __aiter__(self) -> LeaderStreamCall[_Response]:
        return self

    async def __anext__(self) -> _Response:
        if not self._started:
            self._started = True
            await self._connect()
        if self._pending:
            return cast(_Response, self._pending.pop())
        if self._finished:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except BaseException:
            self._finished = True
            await self._close()
            raise
        if message is grpc.aio.EOF:
            self._finished = True
            await self._close()
            raise StopAsyncIteration
        return cast(_Response, message)

    def cancel(self) -> bool:
        """Cancel the call; ``True`` if it was still running."""
        self._finished = True
        call = self._call
        return bool(call is not None and call.cancel())

    async def aclose(self) -> None:
        """Cancel the call if it still runs and release its channel."""
        self.cancel()
        await self._close()

    async def _close(self) -> None:
        pooled = self._pooled
        if pooled is not None:
            self._pooled = None
            await self._method._pool._release(pooled)

    async def _connect(self) -> None:
        method = self._method
        pool = method._pool
        metadata, plan = pool._plan(method.idempotent, self._timeout, self._metadata)
        deadline = None if self._timeout is None else pool._clock() + self._timeout
        last: list[grpc.aio.AioRpcError] = []
        step: Attempt | object = plan.start()
        while isinstance(step, Attempt):
            if step.delay > 0:
                await pool._sleep(step.delay)
            pooled = await pool._acquire(step.endpoint)
            remaining = None if deadline is None else max(deadline - pool._clock(), 0.0)
            call = method._callable(pooled)(
                self._request, timeout=remaining, metadata=metadata, **self._options
            )
            outcome: Outcome | None = None
            first: Any = None
            try:
                with anyio.move_on_after(step.timeout) as scope:
                    first = await call.read()
                if scope.cancelled_caught:
                    call.cancel()
                    outcome = TimedOut(sent=True, error=f"no message within {step.timeout:.3f} s")
            except grpc.aio.AioRpcError as error:
                last[:] = [error]
                outcome = _attempt_outcome(error)
                if outcome is None:
                    await pool._release(pooled)
                    self._finished = True
                    plan.after(pool._served(None))
                    raise
            except BaseException:
                call.cancel()
                await pool._release(pooled)
                raise
            if outcome is not None:
                await pool._release(pooled)
                step = plan.after(outcome)
                continue
            epoch = _served_epoch(await call.initial_metadata())
            self._call, self._pooled = call, pooled
            self.endpoint, self.epoch = step.endpoint, epoch
            plan.after(pool._served(epoch))
            if first is grpc.aio.EOF:
                self._finished = True
                await self._close()
            else:
                self._pending.append(first)
            return
        raise LeaderUnavailable(cast(GaveUp, step), last[0] if last else None)


class LeaderUnaryStream(_Method, Generic[_Request, _Response]):
    """A unary-stream method that goes to the leader: ``async for r in it(request, ...)``.

    Returns a :class:`LeaderStreamCall`. ``timeout`` is the deadline of the
    whole call (retries and the stream); without it, retries stop at the
    policy's ``deadline`` and the stream itself has none.
    """

    def __call__(
        self,
        request: _Request,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> LeaderStreamCall[_Response]:
        options = {
            "credentials": credentials,
            "wait_for_ready": wait_for_ready,
            "compression": compression,
        }
        return LeaderStreamCall(self, request, options, timeout, metadata)


class LeaderStreamUnary(_Method):
    """A stream-unary method: sent once to the cached leader, never retried.

    A request stream cannot be replayed, so there is no retry and no
    redirect following: ``await it(request_iterator, ...)`` gives the
    response or raises grpc's error. A ``FAILED_PRECONDITION`` hint still
    updates the cache (and a served ``leader-epoch`` is recorded), so the
    next call goes to the leader.
    """

    async def __call__(self, request_iterator: Any, **options: Any) -> Any:
        pool = self._pool
        endpoint = pool.cache.worklist()[0]
        pooled = await pool._acquire(endpoint)
        try:
            call = self._callable(pooled)(request_iterator, **options)
            try:
                response = await call
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    hint = _hint_of(error.trailing_metadata())
                    if hint is not None:
                        pool.cache.classify(hint)
                raise
            epoch = _served_epoch(await call.trailing_metadata())
        finally:
            await pool._release(pooled)
        if epoch is not None:
            pool.cache.record_success(endpoint, epoch)
        return response


class LeaderStreamStream(_Method):
    """A stream-stream method: grpc's own call, sent once to the cached leader, never retried."""

    def __call__(self, request_iterator: Any = None, **options: Any) -> Any:
        pool = self._pool
        pooled = pool._acquire_now(pool.cache.worklist()[0])
        try:
            call = self._callable(pooled)(request_iterator, **options)
        except BaseException:
            pool._release_now(pooled)
            raise
        call.add_done_callback(lambda _: pool._release_now(pooled))
        return call


class _StubChannel:
    """What a generated stub's ``__init__`` sees: the pool's multi-callable factories."""

    def __init__(self, pool: LeaderChannelPool, idempotent: bool) -> None:
        self._pool = pool
        self._idempotent = idempotent

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        return self._pool.unary_unary(
            method, request_serializer, response_deserializer, idempotent=self._idempotent
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        return self._pool.unary_stream(
            method, request_serializer, response_deserializer, idempotent=self._idempotent
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        return self._pool.stream_unary(method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        return self._pool.stream_stream(method, request_serializer, response_deserializer)


class LeaderChannelPool:
    """One ``grpc.aio`` channel per endpoint, and calls that go to the leader.

    ``endpoints`` are the operator-configured ``host:port`` of every node.
    ``credentials`` (``grpc.ssl_channel_credentials(...)``) make every
    channel a TLS channel and the cache ``tls_required``, so a plaintext
    (``http://``) hint is refused. ``cache`` shares a
    :class:`~leaderwatch.client.LeaderCache` (same configured endpoints);
    ``policy`` sets the default deadline, per-attempt timeout, redirect limit
    and backoff (:class:`~leaderwatch.retry.RetryPolicy`). ``options`` go to
    every channel. ``idempotency_keys=True`` gives every call without an
    ``idempotency-key`` metadata entry one, the same on all its attempts.

    Guarantees:

    - channels are opened on first use and closed by :meth:`close` (or
      leaving ``async with``); configured endpoints keep theirs; endpoints
      known only from hints keep at most ``max_hint_channels`` open, the
      least recently used closed first (an idle one, never the cached
      leader's), so a stream of decoy hints cannot pin unbounded channels;
    - unary-unary and unary-stream calls (:meth:`stub`, :meth:`unary_unary`,
      :meth:`unary_stream`) go to the cached leader; ``FAILED_PRECONDITION``
      with a hint (``leader-hint-bin``, ``tsoracle-leader-hint-bin`` or the
      text trailers) goes through ``LeaderCache.classify`` and the call
      follows it; without a hint it is "no leader yet" (backoff, next
      endpoint); ``UNAVAILABLE`` moves to the next endpoint — always when the
      channel could not connect, otherwise (the call may have reached the
      server) only for an idempotent call or one with an idempotency key;
      the plan is :class:`~leaderwatch.retry.AttemptPlan`, the same as the
      HTTP client's; a served call's ``leader-epoch`` goes to
      ``record_success``;
    - any other status is raised to the caller untouched; giving up raises
      :class:`LeaderUnavailable`.

    Use it from one event loop (grpc.aio's rule); the cache may be shared.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        cache: LeaderCache | None = None,
        policy: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
        max_hint_channels: int = DEFAULT_MAX_HINT_CHANNELS,
        idempotency_keys: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError(
                f"endpoints must be a collection of 'host:port' strings, not one string "
                f"(got {endpoints!r}); write [{endpoints!r}]"
            )
        endpoints = list(endpoints)
        tls_required = credentials is not None
        if cache is None:
            cache = LeaderCache(endpoints, tls_required=tls_required)
        else:
            configured = LeaderCache(endpoints).endpoints  # validates them the same way
            if set(configured) != set(cache.endpoints):
                raise ValueError(
                    f"endpoints {list(configured)} differ from the cache's configured endpoints "
                    f"{list(cache.endpoints)}; pass the same list (or omit the cache)"
                )
            if tls_required and not cache.tls_required:
                raise ValueError(
                    "TLS credentials need a cache built with tls_required=True, so plaintext "
                    "hints are refused; pass LeaderCache(endpoints, tls_required=True)"
                )
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy (got {type(policy).__name__})")
        if isinstance(max_hint_channels, bool) or not isinstance(max_hint_channels, int):
            raise TypeError("max_hint_channels must be an int")
        if max_hint_channels < 1:
            raise ValueError(f"max_hint_channels must be at least 1 (got {max_hint_channels})")
        self._cache = cache
        self._policy = RetryPolicy() if policy is None else policy
        self._credentials = credentials
        self._options = tuple(options)
        self._max_hint_channels = max_hint_channels
        self._idempotency_keys = idempotency_keys
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._configured = frozenset(cache.endpoints)
        self._channels: dict[str, _Pooled] = {}
        self._hinted: OrderedDict[str, _Pooled] = OrderedDict()
        self._retired: list[_Pooled] = []
        self._idle_retired: list[_Pooled] = []
        self._closed = False
        self._opened = 0
        self._evicted = 0
        self._served_none = Served()
        self._served_last = Served()
        self._policies: dict[float, RetryPolicy] = {}

    # Configuration.

    @property
    def cache(self) -> LeaderCache:
        """The leader cache this pool reads and updates."""
        return self._cache

    @property
    def policy(self) -> RetryPolicy:
        """The default retry policy of every call."""
        return self._policy

    @property
    def open_endpoints(self) -> tuple[str, ...]:
        """Endpoints with an open channel right now (configured ones first)."""
        retired = (*self._retired, *self._idle_retired)
        return tuple(self._channels) + tuple(pooled.endpoint for pooled in retired)

    @property
    def channels_opened(self) -> int:
        """Channels opened so far."""
        return self._opened

    @property
    def channels_evicted(self) -> int:
        """Hint-only channels closed to stay within ``max_hint_channels``."""
        return self._evicted

    # Multi-callables and stubs.

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        *,
        idempotent: bool = False,
    ) -> LeaderUnaryUnary[Any, Any]:
        """A leader-aware unary-unary method (as ``grpc.aio.Channel.unary_unary``).

        ``idempotent=True`` lets a call that may have reached a server (it
        broke or timed out after sending) be re-sent.
        """
        return LeaderUnaryUnary(
            self, "unary_unary", method, request_serializer, response_deserializer, idempotent
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        *,
        idempotent: bool = False,
    ) -> LeaderUnaryStream[Any, Any]:
        """A leader-aware unary-stream method (as ``grpc.aio.Channel.unary_stream``)."""
        return LeaderUnaryStream(
            self, "unary_stream", method, request_serializer, response_deserializer, idempotent
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
    ) -> LeaderStreamUnary:
        """A stream-unary method, sent once to the cached leader (:class:`LeaderStreamUnary`)."""
        return LeaderStreamUnary(
            self, "stream_unary", method, request_serializer, response_deserializer, False
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
    ) -> LeaderStreamStream:
        """A stream-stream method: grpc's call object, sent once to the cached leader."""
        return LeaderStreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer, False
        )

    def stub(self, stub_class: Callable[[Any], _Stub], *, idempotent: bool = False) -> _Stub:
        """``stub_class`` (a generated ``...Stub``) whose methods go through this pool.

        The stub is built on the pool instead of a channel: its unary-unary
        methods return the response when awaited, its unary-stream methods
        a :class:`LeaderStreamCall` to iterate. ``idempotent=True`` marks
        every method safe to re-send (see :meth:`unary_unary`).
        """
        return stub_class(_StubChannel(self, idempotent))

    # Lifecycle.

    async def __aenter__(self) -> LeaderChannelPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel (calls still running on them are cancelled); idempotent."""
        self._closed = True
        pooled = [*self._channels.values(), *self._retired, *self._idle_retired]
        self._channels.clear()
        self._hinted.clear()
        self._retired.clear()
        self._idle_retired.clear()
        with anyio.CancelScope(shield=True):
            for each in pooled:
                await each.channel.close()

    # Per call.

    def _plan(
        self, idempotent: bool, timeout: float | None, metadata: Any
    ) -> tuple[Any, AttemptPlan]:
        if self._closed:
            raise PoolClosed("this LeaderChannelPool is closed; make calls before closing it")
        keyed = False
        if metadata is not None:
            keyed = any(key == IDEMPOTENCY_KEY_METADATA for key, _ in _pairs(metadata))
        if not keyed and self._idempotency_keys and not idempotent:
            metadata = (*_pairs(metadata), (IDEMPOTENCY_KEY_METADATA, str(uuid.uuid4())))
            keyed = True
        policy = self._policy
        if timeout is not None:
            policy = self._policies.get(timeout) or self._policy_for(timeout)
        plan = AttemptPlan(
            self._cache,
            policy,
            safe_to_resend=idempotent or keyed,
            clock=self._clock,
            rng=self._rng,
        )
        return metadata, plan

    def _policy_for(self, timeout: float) -> RetryPolicy:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout != timeout:
            raise TypeError(f"timeout must be a number of seconds (got {timeout!r})")
        policy = self._policy.model_copy(update={"deadline": max(float(timeout), 1e-6)})
        if len(self._policies) >= 64:
            self._policies.clear()
        self._policies[timeout] = policy
        return policy

    def _served(self, epoch: int | None) -> Served:
        if epoch is None:
            return self._served_none
        served = self._served_last
        if served.epoch != epoch:
            served = self._served_last = Served(epoch=epoch)
        return served

    # Channels.

    def _open(self, endpoint: str) -> grpc.aio.Channel:
        self._opened += 1
        hinted = endpoint not in self._configured
        _log.info("grpc_channel_opened", endpoint=endpoint, hinted=hinted)
        if self._credentials is None:
            return grpc.aio.insecure_channel(endpoint, options=self._options)
        return grpc.aio.secure_channel(endpoint, self._credentials, options=self._options)

    def _acquire_now(self, endpoint: str) -> _Pooled:
        if self._closed:
            raise PoolClosed("this LeaderChannelPool is closed; make calls before closing it")
        pooled = self._channels.get(endpoint)
        if pooled is None:
            parse_endpoint(endpoint)
            pooled = self._channels[endpoint] = _Pooled(endpoint, self._open(endpoint))
            if endpoint not in self._configured:
                self._hinted[endpoint] = pooled
        elif endpoint not in self._configured:
            self._hinted.move_to_end(endpoint)
        pooled.users += 1
        return pooled

    @property
    def _crowded(self) -> bool:
        """Whether hint-only channels are over the cap or retired ones wait to be closed."""
        return len(self._hinted) > self._max_hint_channels or bool(self._idle_retired)

    async def _acquire(self, endpoint: str) -> _Pooled:
        pooled = self._acquire_now(endpoint)
        if self._crowded:
            await self._make_room(keep=endpoint)
        return pooled

    async def _make_room(self, *, keep: str) -> None:
        """Retire least recently used hint-only channels until within the cap.

        Idle channels go first; a busy one is closed when its last call ends.
        Never the cached leader's, never ``keep`` (the one being called).
        """
        cached = self._cache.cached_leader
        spared = {keep} if cached is None else {keep, cached.endpoint}
        excess = len(self._hinted) - self._max_hint_channels
        candidates = [pooled for e, pooled in self._hinted.items() if e not in spared]
        candidates.sort(key=lambda pooled: pooled.users > 0)  # stable: LRU order within each
        to_close, self._idle_retired = self._idle_retired, []
        for pooled in candidates[: max(excess, 0)]:
            endpoint = pooled.endpoint
            del self._hinted[endpoint]
            del self._channels[endpoint]
            self._evicted += 1
            _log.info("grpc_channel_evicted", endpoint=endpoint, in_use=pooled.users)
            if pooled.users > 0:
                pooled.evicted = True
                self._retired.append(pooled)
            else:
                to_close.append(pooled)
        with anyio.CancelScope(shield=True):
            for pooled in to_close:
                await pooled.channel.close()

    async def _release(self, pooled: _Pooled) -> None:
        if self._release_now(pooled):
            await self._close_retired(pooled)

    async def _close_retired(self, pooled: _Pooled) -> None:
        """Close a retired channel whose last call just ended."""
        with contextlib.suppress(ValueError):
            self._idle_retired.remove(pooled)
        with anyio.CancelScope(shield=True):
            await pooled.channel.close()

    def _release_now(self, pooled: _Pooled) -> bool:
        """Count one call off ``pooled``; ``True`` if it was retired and is now idle.

        An idle retired channel waits in ``_idle_retired`` to be closed by
        the caller (or by the next acquire, for callers that cannot await).
        """
        pooled.users -= 1
        if pooled.evicted and pooled.users == 0:
            with contextlib.suppress(ValueError):
                self._retired.remove(pooled)
            self._idle_retired.append(pooled)
            return True
        return False
