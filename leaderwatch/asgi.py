"""ASGI adapters for a :class:`~leaderwatch.node.LeaderNode` (DESIGN contract 9).

Pure ASGI, no dependency: works under any ASGI server and with Starlette or
FastAPI (``app.add_middleware(LeaderRedirectMiddleware, node=node)``).

- :class:`LeaderRedirectMiddleware` serves leader-only requests inside
  :meth:`LeaderNode.admit() <leaderwatch.node.LeaderNode.admit>` and answers
  the others with ``307`` (a redirect to the leader) or ``503`` (no leader
  yet), with the hint in headers and a JSON body.
- :func:`leader_status_app` answers probes and load balancers.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final
from urllib.parse import quote

from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import ENDPOINT_HEADER, EPOCH_HEADER, LeaderHint, NoLeaderYet
from leaderwatch.node import LeaderNode
from leaderwatch.redirect import Redirect

__all__ = [
    "RETRY_AFTER_MS_HEADER",
    "WEBSOCKET_TRY_AGAIN_LATER",
    "ASGIApp",
    "InvalidMiddlewareConfig",
    "LeaderRedirectMiddleware",
    "Receive",
    "Scope",
    "Send",
    "leader_status_app",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_MS_HEADER: Final = "leader-retry-after-ms"
"""Header of a 503 carrying the retry delay in milliseconds (``Retry-After`` has whole seconds)."""

WEBSOCKET_TRY_AGAIN_LATER: Final = 1013
"""The close code a websocket gets on a node that does not serve (RFC 6455 "Try Again Later")."""

_EPOCH_HEADER: Final = EPOCH_HEADER.encode("ascii")
_ENDPOINT_HEADER: Final = ENDPOINT_HEADER.encode("ascii")
_JSON: Final = (b"content-type", b"application/json")
_NO_STORE: Final = (b"cache-control", b"no-store")
# Bytes that may not appear raw in a Location header: percent-encode them.
_UNSAFE_TARGET: Final = re.compile(rb"[^\x21-\x7e]")
_MAX_CLOSE_REASON: Final = 123
_CANCELLED_BODY: Final = (
    b'{"error":"leader_work_cancelled","detail":"this node stopped leading while the request '
    b'ran; it may have been partly done"}'
)


class InvalidMiddlewareConfig(LeaderwatchError, ValueError):
    """A :class:`LeaderRedirectMiddleware` argument breaks a rule; the message names it."""


def _percent_encode(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match.group()[0]


def _safe_target(raw: bytes) -> bytes:
    if _UNSAFE_TARGET.search(raw) is None:
        return raw
    return _UNSAFE_TARGET.sub(_percent_encode, raw)


class _Reply:
    """A refusal, rendered once per decision: status, fixed headers, body, redirect host."""

    __slots__ = ("body", "headers", "host", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        host: bytes | None,
        reason: str,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.host = host
        self.reason = reason


class LeaderRedirectMiddleware:
    """Serve on the leader; redirect or refuse elsewhere. Pure ASGI.

    Per ``http`` request, from :meth:`LeaderNode.decide() <leaderwatch.node.LeaderNode.decide>`:

    - **Serve**: the request runs inside an admission (see
      :meth:`LeaderNode.admit() <leaderwatch.node.LeaderNode.admit>`); the
      epoch is put in ``scope["state"]["leader_epoch"]`` (Starlette's
      ``request.state.leader_epoch``: the fencing token) and the response
      carries ``leader-epoch``. If the node cancels the request before its
      response started, it gets ``500`` with ``{"error": "leader_work_cancelled"}``
      (never a 503: the work may have been partly done).
    - **Redirect**: ``307`` (method and body kept) with ``Location`` = the
      request's scheme (or ``scheme``), the leader's validated endpoint and
      the original raw path and query; headers ``leader-endpoint``,
      ``leader-epoch`` (when known); the hint as JSON body.
    - **No leader yet**: ``503`` with ``Retry-After`` (whole seconds,
      rounded up from ``retry_after``), ``leader-retry-after-ms``,
      ``leader-epoch`` when known, and the hint as JSON body.

    Paths in ``exempt`` (and below them: ``/metrics`` also covers
    ``/metrics/x``) are served on every node, outside any admission.
    ``websocket`` scopes are served like requests; on a node that does not
    serve they are accepted and closed at once with code 1013 (Try Again
    Later), the hint as reason when it fits. ``lifespan`` and other scopes
    pass through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        node: LeaderNode,
        exempt: Iterable[str] = (),
        retry_after: float = 0.1,
        scheme: str | None = None,
    ) -> None:
        if not isinstance(node, LeaderNode):
            raise TypeError(f"node must be a LeaderNode (got {type(node).__name__})")
        if isinstance(exempt, str):
            raise InvalidMiddlewareConfig(
                f"exempt must be a collection of paths, not one string (got {exempt!r}); "
                f"write exempt=({exempt!r},)"
            )
        paths = []
        for path in exempt:
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidMiddlewareConfig(
                    f"every exempt path must be a string starting with '/' (got {path!r})"
                )
            paths.append(path.rstrip("/") or "/")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
            raise InvalidMiddlewareConfig(
                f"retry_after must be a number of seconds (got {type(retry_after).__name__})"
            )
        if not (math.isfinite(retry_after) and retry_after >= 0):
            raise InvalidMiddlewareConfig(
                f"retry_after must be finite and >= 0 seconds (got {retry_after!r})"
            )
        if scheme not in (None, "http", "https"):
            raise InvalidMiddlewareConfig(
                f"scheme must be None (use the request's), 'http' or 'https' (got {scheme!r})"
            )
        self.app = app
        self.node = node
        self._exempt_exact = frozenset(paths)
        self._exempt_below = tuple("/" if path == "/" else path + "/" for path in paths)
        self._scheme = scheme
        self._retry_headers = [
            (b"retry-after", str(math.ceil(retry_after)).encode("ascii")),
            (RETRY_AFTER_MS_HEADER.encode("ascii"), str(math.ceil(retry_after * 1000)).encode()),
        ]
        self._reply: tuple[object, _Reply] = (None, _Reply(503, [], b"", None, ""))
        self._epoch_header: tuple[int, tuple[bytes, bytes]] = (-1, (_EPOCH_HEADER, b""))

    def _is_exempt(self, path: str) -> bool:
        return path in self._exempt_exact or path.startswith(self._exempt_below)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self._exempt_exact and self._is_exempt(scope["path"]):
                await self.app(scope, receive, send)
                return
            node = self.node
            ticket = node._admission()
            if ticket is None:
                await self._refuse_http(scope, send)
                return
            started = False
            cancelled = False
            try:
                epoch = ticket.epoch
                cached = self._epoch_header
                header = cached[1] if cached[0] == epoch else self._header_for(epoch)

                async def send_with_epoch(message: Message) -> None:
                    nonlocal started
                    if message["type"] == "http.response.start":
                        started = True
                        message["headers"] = [*message.get("headers", ()), header]
                    await send(message)

                state = scope.get("state")
                scope["state"] = (
                    {**state, "leader_epoch": epoch} if state else {"leader_epoch": epoch}
                )
                await self.app(scope, receive, send_with_epoch)
            except BaseException as error:
                if not await ticket.finish(error):
                    raise
                cancelled = True
            else:
                if ticket.cancel_requested or ticket.scope is not None:
                    await ticket.finish(None)
            finally:
                node._release(ticket)
            if cancelled and not started:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [_JSON, _NO_STORE, header],
                    }
                )
                await send({"type": "http.response.body", "body": _CANCELLED_BODY})
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _header_for(self, epoch: int) -> tuple[bytes, bytes]:
        cached = self._epoch_header
        if cached[0] != epoch:
            cached = self._epoch_header = (epoch, (_EPOCH_HEADER, str(epoch).encode("ascii")))
        return cached[1]

    def _reply_for(self, decision: Redirect | NoLeaderYet) -> _Reply:
        cached = self._reply
        if cached[0] is decision:
            return cached[1]
        if isinstance(decision, Redirect):
            hint = decision.hint
            endpoint = hint.leader_endpoint
            if endpoint is None:  # pragma: no cover - a Redirect always names the leader
                raise TypeError("a Redirect without a leader endpoint")
            status, host, epoch = 307, endpoint.encode("ascii"), hint.leader_epoch
            headers = [_JSON, _NO_STORE, (_ENDPOINT_HEADER, host)]
        else:
            hint = LeaderHint(leader_epoch=decision.leader_epoch)
            status, host, epoch = 503, None, decision.leader_epoch
            headers = [_JSON, _NO_STORE, *self._retry_headers]
        if epoch is not None:
            headers.append((_EPOCH_HEADER, str(epoch).encode("ascii")))
        body = hint.to_json()
        reason = body if len(body.encode()) <= _MAX_CLOSE_REASON else "not the leader"
        reply = _Reply(status, headers, body.encode(), host, reason)
        self._reply = (decision, reply)
        return reply

    def _location(self, scope: Scope, host: bytes) -> bytes:
        scheme = self._scheme or scope.get("scheme", "http")
        if scheme not in ("http", "https"):
            scheme = "http"
        raw_path = scope.get("raw_path")
        if not isinstance(raw_path, bytes) or not raw_path.startswith(b"/"):
            path = scope.get("path", "/")
            raw_path = quote(path).encode("ascii") if path.startswith("/") else b"/"
        location = scheme.encode("ascii") + b"://" + host + _safe_target(raw_path)
        query = scope.get("query_string")
        if query:
            location += b"?" + _safe_target(query)
        return location

    async def _refuse_http(self, scope: Scope, send: Send) -> None:
        reply = self._reply_for(self.node._refusal())
        headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode("ascii"))]
        if reply.host is not None:
            headers.append((b"location", self._location(scope, reply.host)))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._exempt_exact and self._is_exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        node = self.node
        ticket = node._admission()
        if ticket is None:
            reply = self._reply_for(node._refusal())
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                await send(
                    {
                        "type": "websocket.close",
                        "code": WEBSOCKET_TRY_AGAIN_LATER,
                        "reason": reply.reason,
                    }
                )
            return
        cancelled = False
        try:
            epoch = ticket.epoch
            header = self._header_for(epoch)

            async def send_with_epoch(message: Message) -> None:
                if message["type"] == "websocket.accept":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

            state = scope.get("state")
            scope["state"] = {**state, "leader_epoch": epoch} if state else {"leader_epoch": epoch}
            await self.app(scope, receive, send_with_epoch)
        except BaseException as error:
            if not await ticket.finish(error):
                raise
            cancelled = True
        else:
            if ticket.cancel_requested or ticket.scope is not None:
                await ticket.finish(None)
        finally:
            node._release(ticket)
        if cancelled:
            # The connection may be gone already; closing is best effort.
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": WEBSOCKET_TRY_AGAIN_LATER})


def leader_status_app(node: LeaderNode) -> ASGIApp:
    """A tiny ASGI app for probes and load balancers, served on every node.

    - ``GET .../status`` → ``200`` with :meth:`LeaderNode.status()
      <leaderwatch.node.LeaderNode.status>` as JSON (``state``, ``gate``,
      ``epoch``, ``leader_endpoint``, ``node_endpoint``);
    - ``GET .../leader`` → the same JSON with ``200`` only while this node
      serves (fenced, lease proven), ``503`` elsewhere (Vault's convention,
      for load balancers that route to the leader);
    - anything else ``404``; methods other than ``GET``/``HEAD`` ``405``.

    Paths match by their last segment, so the app works mounted anywhere
    (``Mount("/leaderwatch", app=leader_status_app(node))``). Exempt its
    mount point from :class:`LeaderRedirectMiddleware`.
    """
    if not isinstance(node, LeaderNode):
        raise TypeError(f"node must be a LeaderNode (got {type(node).__name__})")

    async def status_app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "").rstrip("/")
        leader_only = path.endswith("/leader")
        if not (leader_only or path.endswith("/status")):
            await _plain(send, 404, b"not found: use .../status or .../leader\n")
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _plain(send, 405, b"method not allowed: use GET\n", [(b"allow", b"GET, HEAD")])
            return
        status = node.status()
        code = 503 if leader_only and status.gate != "serving" else 200
        body = status.model_dump_json().encode()
        headers = [_JSON, _NO_STORE, (b"content-length", str(len(body)).encode("ascii"))]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return status_app


async def _plain(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
