"""The driver's one connection to etcd, and the one place that knows gRPC.

Connections (TLS or plaintext), authentication, requests with deadlines,
watches, switching to another endpoint when the one in use is unreachable or
goes silent, how recently etcd answered, and the store's history as its
replies tell it (:class:`StoreHistory`). Every gRPC error becomes :class:`CallFailed`
here, or a public error at start-up: no other part of the driver imports
``grpc`` or handles its errors.

The gRPC client is ``grpc.aio``, which runs on asyncio only: this module is
what ties the etcd driver to anyio's asyncio backend. Its calls are awaited
through :func:`_grpc`, so anyio cancel scopes still work around them.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TypeVar

import anyio
import anyio.lowlevel
import grpc
from aetcd import rpc

from leaderwatch._log import get_logger
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._errors import EtcdAuthError, EtcdElectionError, EtcdUnavailable
from leaderwatch.drivers.etcd._history import StoreHistory
from leaderwatch.state import InvalidEndpoint, parse_endpoint

__all__ = ["CallFailed", "EtcdClient", "parse_endpoints"]

_log = get_logger("leaderwatch.drivers.etcd")

_T = TypeVar("_T")

_CHANNEL_OPTIONS: Final = (
    # Reconnect quickly after an etcd restart (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_AUTH_CODES: Final = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_AUTH_WORDS: Final = ("auth", "user name", "password", "permission", "token")
_UNREACHABLE: Final = "UNAVAILABLE"
"""The status of a request the endpoint refused, reset or could not serve (no raft leader)."""
_WATCH_FILTERS: Final = {
    "all": [],
    "puts": [rpc.WatchCreateRequest.NODELETE],
    "deletes": [rpc.WatchCreateRequest.NOPUT],
}


class CallFailed(EtcdElectionError):
    """One etcd request failed; loops retry it, start-up turns it into a public error."""

    def __init__(self, endpoint: str, code: str, details: str, *, is_auth: bool) -> None:
        self.endpoint = endpoint
        self.code = code
        """The gRPC status name (``"NOT_FOUND"``, ...), or the failure's type name."""
        self.details = details
        self.is_auth = is_auth
        """etcd refused the credentials or the user's permissions."""
        super().__init__(f"{endpoint}: {code}: {details}")

    @property
    def not_found(self) -> bool:
        """etcd does not know the thing asked about (a lease already gone, ...)."""
        return self.code == "NOT_FOUND"

    @property
    def unreachable(self) -> bool:
        """The endpoint refused or reset the connection, or cannot serve (``UNAVAILABLE``)."""
        return self.code == _UNREACHABLE


class _ChannelClosed(Exception):
    """A call ended because this client closed its channel (after an endpoint switch)."""


_GRPC_ERRORS: Final = (rpc.RpcError, rpc.BaseError, _ChannelClosed)


def _failure(endpoint: str, error: BaseException) -> CallFailed:
    """The one mapping from a gRPC (or transport) error to :class:`CallFailed`."""
    if isinstance(error, rpc.AioRpcError):
        status = error.code()
        details = error.details() or ""
        is_auth = status in _AUTH_CODES or (
            status == grpc.StatusCode.INVALID_ARGUMENT
            and any(word in details.lower() for word in _AUTH_WORDS)
        )
        return CallFailed(endpoint, status.name, details, is_auth=is_auth)
    return CallFailed(endpoint, type(error).__name__, str(error), is_auth=False)


async def _grpc(awaitable: Awaitable[_T], conn: _Connection | None = None) -> _T:
    """Await a ``grpc.aio`` call so that anyio cancel scopes recognise their cancellation.

    grpc.aio swallows the task's cancellation and raises a fresh
    ``CancelledError``; a checkpoint lets anyio raise its own one instead.
    grpc.aio raises the same ``CancelledError`` in calls whose channel is
    closed: when that is ``conn``'s channel, which this client closed, it
    becomes :class:`_ChannelClosed`, a failure callers retry.
    """
    try:
        return await awaitable
    except anyio.get_cancelled_exc_class() as error:
        await anyio.lowlevel.checkpoint()
        if conn is not None and conn.closed:
            raise _ChannelClosed(f"channel to {conn.endpoint} closed") from error
        raise


class _Connection:
    """One gRPC channel to one etcd endpoint, with its stubs and auth token."""

    def __init__(self, endpoint: str, channel: Any) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.metadata: tuple[tuple[str, str], ...] | None = None
        self.token_stale = False
        self.closed = False
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.auth = rpc.AuthStub(channel)

    async def close(self) -> None:
        self.closed = True
        with anyio.CancelScope(shield=True):
            await _grpc(self.channel.close(None))


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """etcd endpoints as ``host:port`` strings; one string may hold several, comma-separated."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    if not items or any(not isinstance(item, str) for item in items):
        raise ValueError(f"endpoints must be host:port strings (got {endpoints!r})")
    parsed = []
    for item in items:
        try:
            parsed.append(parse_endpoint(item.strip()))
        except InvalidEndpoint as error:
            raise InvalidEndpoint(f"etcd endpoint {item!r}: {error}") from None
    return tuple(parsed)


_PEM_BLOCKS: Final = {
    "ca_cert": (b"-----BEGIN CERTIFICATE-----", "a PEM certificate (BEGIN CERTIFICATE)"),
    "client_cert": (b"-----BEGIN CERTIFICATE-----", "a PEM certificate (BEGIN CERTIFICATE)"),
    "client_key": (b"PRIVATE KEY-----", "a PEM private key (BEGIN ... PRIVATE KEY)"),
}


_WRITE_OPS: Final = frozenset({"request_put", "request_delete_range"})


def _writes(request: Any) -> bool:
    """Whether a transaction request puts or deletes in either branch."""
    return any(
        op.WhichOneof("request") in _WRITE_OPS for op in (*request.success, *request.failure)
    )


def _read_pem(name: str, path: str | Path | None) -> bytes | None:
    """The file's bytes, once it is known to hold what ``name`` needs (else a clear error)."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise EtcdElectionError(
            f"cannot read {name} {str(path)!r}: {error.strerror or error}"
        ) from error
    marker, wanted = _PEM_BLOCKS[name]
    if marker not in data:
        raise EtcdElectionError(f"{name} {str(path)!r} does not hold {wanted}")
    return data


def _tls_credentials(
    tls: bool | None,
    ca_cert: str | Path | None,
    client_cert: str | Path | None,
    client_key: str | Path | None,
) -> Any:
    """gRPC channel credentials (PEM files read now), ``None`` for plaintext."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together")
    any_pem = any(path is not None for path in (ca_cert, client_cert, client_key))
    if not (tls if tls is not None else any_pem):
        if any_pem:
            raise ValueError("ca_cert, client_cert and client_key need tls=True")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem("ca_cert", ca_cert),
        private_key=_read_pem("client_key", client_key),
        certificate_chain=_read_pem("client_cert", client_cert),
    )


class EtcdClient:
    """Requests to one etcd endpoint at a time, with deadlines from ``timing``.

    Guarantees:

    - Every request gets :attr:`LeaseTiming.call_timeout` unless the caller
      gives a deadline; an auth token etcd rejected is renewed before the
      next request, within the same deadline. A failed request raises
      :class:`CallFailed`; a request cut short because this client switched
      endpoints fails the same way, so callers simply retry.
    - :attr:`contact_until`: every request etcd answered proves the node's
      view of etcd current until :attr:`LeaseTiming.proof_window` after it
      was *sent*.
    - With several endpoints, :meth:`keep_contact` leaves the one in use
      for the next that answers (each gets ``call_timeout``, in turn) as
      soon as a request finds it unreachable (refused, reset, ``UNAVAILABLE``)
      or :meth:`leave_endpoint` asks, and also when it stayed silent for a
      proof window plus ``call_timeout``; it keeps the current one when none
      answers. An
      endpoint switched to counts as having answered.
    - ``etcd_unreachable`` is logged once per silence, naming the endpoint
      that went silent; ``etcd_reconnected`` once when that endpoint answers
      again. :attr:`reconnects` counts those, and every endpoint switched to.
    - :attr:`history` sees the header of every range and transaction reply
      (linearizable reads and writes), so it notices a store that went back.
    - :meth:`connect` raises :class:`EtcdUnavailable` or :class:`EtcdAuthError`
      naming the endpoint; nothing else raises a public error.
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        *,
        election: str,
        probe: Any,
        timing: LeaseTiming,
        node_id: str,
        connect_timeout: float,
        tls: bool | None,
        ca_cert: str | Path | None,
        client_cert: str | Path | None,
        client_key: str | Path | None,
        username: str | None,
        password: str | None,
    ) -> None:
        """``probe`` is the range request that proves an endpoint answers (read at connect)."""
        if not (
            isinstance(connect_timeout, int | float)
            and math.isfinite(connect_timeout)
            and connect_timeout > 0
        ):
            raise ValueError(f"connect_timeout must be > 0 seconds (got {connect_timeout!r})")
        if (username is None) != (password is None):
            raise ValueError("username and password must be given together")
        self._credentials = _tls_credentials(tls, ca_cert, client_cert, client_key)
        self._endpoints = endpoints
        self._election = election
        self._probe = probe
        self._timing = timing
        self._node_id = node_id
        self._connect_timeout = float(connect_timeout)
        self._username = username
        self._password = password
        self._conn: _Connection | None = None
        self._contact_until = -math.inf
        self._last_answered_send = -math.inf
        self._heard: anyio.Event | None = None
        self._answered: anyio.Event | None = None
        self._unreachable: anyio.Event | None = None
        self._switch_settled: anyio.Event | None = None
        self._leave_reason = "unreachable"
        self._silence_logged = False
        self.reconnects = 0
        """Times contact was re-established: an endpoint switched to, or etcd answering after
        ``etcd_unreachable`` was logged (``etcd_reconnected``)."""
        self.history = StoreHistory(node_id=node_id, settle=timing.ttl)
        """What etcd's replies tell of the store's history (has it gone back?)."""

    @property
    def endpoint(self) -> str | None:
        """The endpoint in use, ``None`` before :meth:`connect`."""
        return None if self._conn is None else self._conn.endpoint

    @property
    def _tls(self) -> bool:
        return self._credentials is not None

    @property
    def contact_until(self) -> float:
        """Until when what etcd last answered counts as current (``anyio.current_time()``)."""
        return self._contact_until

    # -- connecting ----------------------------------------------------------------

    async def connect(self) -> Any:
        """Use the first endpoint that answers; return its reply to the probe.

        Each endpoint gets ``connect_timeout`` seconds, in turn.
        """
        failures: list[CallFailed] = []
        for endpoint in self._endpoints:
            sent = anyio.current_time()
            mark = self.history.mark()
            try:
                self._conn, reply = await self._open(endpoint, self._connect_timeout)
            except TimeoutError:
                failures.append(CallFailed(endpoint, "TimeoutError", "no answer", is_auth=False))
                continue
            except CallFailed as failure:
                if failure.is_auth:
                    user = self._username
                    raise EtcdAuthError(
                        f"etcd at {endpoint} refused "
                        + (f"user {user!r}" if user is not None else "an unauthenticated client")
                        + f" for election {self._election!r}: {failure.details}; check username, "
                        "password and the user's role on the election prefix"
                    ) from failure
                failures.append(failure)
                continue
            self._note_answer(sent)
            self._note_header(reply.header, endpoint, mark)
            _log.info("etcd_connected", node_id=self._node_id, endpoint=endpoint, tls=self._tls)
            return reply
        tried = "; ".join(str(failure) for failure in failures)
        hint = (
            "check that etcd runs there and that ca_cert/client_cert/client_key match its TLS setup"
            if self._tls
            else "check that etcd runs there (if it requires TLS, pass ca_cert or tls=True)"
        )
        raise EtcdUnavailable(
            f"cannot reach etcd at {', '.join(self._endpoints)} within "
            f"{self._connect_timeout:g}s per endpoint ({tried}); {hint}"
        )

    async def close(self) -> None:
        """Close the connection in use (idempotent)."""
        if self._conn is not None:
            await self._conn.close()

    async def _open(self, endpoint: str, wait: float) -> tuple[_Connection, Any]:
        """Connect, authenticate and send the probe within ``wait`` seconds.

        Raises :class:`CallFailed` when etcd refuses and ``TimeoutError`` when it is silent.
        """
        if self._credentials is not None:
            channel = rpc.secure_channel(endpoint, self._credentials, options=_CHANNEL_OPTIONS)
        else:
            channel = rpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        conn = _Connection(endpoint, channel)
        deadline = anyio.current_time() + wait
        try:
            with anyio.fail_after(wait):
                await self._authenticate(conn, wait)
                left = max(deadline - anyio.current_time(), 0.001)
                reply = await _grpc(
                    conn.kv.Range(self._probe, timeout=left, metadata=conn.metadata)
                )
        except _GRPC_ERRORS as error:
            await conn.close()
            raise _failure(endpoint, error) from error
        except BaseException:
            await conn.close()
            raise
        return conn, reply

    async def _authenticate(self, conn: _Connection, wait: float) -> None:
        if self._username is None:
            return
        request = rpc.AuthenticateRequest(name=self._username, password=self._password)
        reply = await _grpc(conn.auth.Authenticate(request, timeout=wait), conn)
        conn.metadata = (("token", reply.token),)
        conn.token_stale = False

    # -- contact and endpoint switching ----------------------------------------------

    def _note_answer(self, sent: float) -> None:
        until = sent + self._timing.proof_window
        if until > self._contact_until:
            self._contact_until = until
        if sent > self._last_answered_send:
            self._last_answered_send = sent
        if self._silence_logged:
            self._silence_logged = False
            self.reconnects += 1
            _log.info("etcd_reconnected", node_id=self._node_id, endpoint=self.endpoint)
        for name in ("_heard", "_answered"):
            event = getattr(self, name)
            if event is not None:
                setattr(self, name, None)
                event.set()

    def _note_header(self, header: Any, endpoint: str, mark: tuple[int, int]) -> None:
        self.history.note_reply(
            int(header.revision),
            int(header.cluster_id),
            sent=mark,
            endpoint=endpoint,
            now=anyio.current_time(),
        )

    def leave_endpoint(self, reason: str) -> None:
        """Have :meth:`keep_contact` try the other endpoints now.

        A no-op with only one endpoint, and while an earlier request to leave
        is still being served (so one frozen endpoint costs one switch).
        """
        if (
            self._unreachable is not None
            and len(self._endpoints) > 1
            and self._switch_settled is None
        ):
            self._leave_reason = reason
            self._switch_settled = anyio.Event()
            self._unreachable.set()

    async def moved_from(self, endpoint: str) -> bool:
        """Whether the endpoint in use is no longer ``endpoint``.

        Answers once a switch that :meth:`leave_endpoint` asked for is over,
        whether or not another endpoint answered.
        """
        if self._switch_settled is not None:
            await self._switch_settled.wait()
        return self.endpoint != endpoint

    async def wait_answer(self, sent_after: float) -> None:
        """Wait until etcd answered a request sent after ``sent_after``."""
        while self._last_answered_send <= sent_after:
            if self._answered is None:
                self._answered = anyio.Event()
            await self._answered.wait()

    async def keep_contact(self, on_silent: Callable[[], None]) -> NoReturn:
        """Forever: switch endpoints when the one in use is unreachable or silent; report silence.

        ``on_silent`` is called whenever :attr:`contact_until` passes.
        """
        backoff = self._timing.backoff()
        reported: float | None = None  # the contact_until whose lapse was logged
        self._unreachable = anyio.Event()
        while True:
            until = self._contact_until
            if anyio.current_time() < until and not self._unreachable.is_set():
                with anyio.move_on_at(until):
                    await self._unreachable.wait()
                continue
            if self._unreachable.is_set():
                self._unreachable = anyio.Event()
                switched = await self._switch_endpoint(self._leave_reason)
                settled, self._switch_settled = self._switch_settled, None
                if settled is not None:
                    settled.set()
                if switched:
                    backoff.reset()
                else:
                    await backoff.wait()
                continue
            if until > -math.inf and reported != until:
                reported = until
                self._silence_logged = True
                _log.warning(
                    "etcd_unreachable",
                    node_id=self._node_id,
                    endpoint=self.endpoint,
                    silent_for=round(anyio.current_time() - until + self._timing.proof_window, 3),
                )
            on_silent()
            heard = self._heard = anyio.Event()
            if len(self._endpoints) == 1:
                await heard.wait()
                continue
            with anyio.move_on_after(self._timing.call_timeout):
                await heard.wait()
            if not heard.is_set():
                await self._switch_endpoint("silent")

    async def _switch_endpoint(self, reason: str) -> bool:
        """Try the other endpoints in turn; keep the current one if none answers."""
        current = self._conn
        assert current is not None
        start = self._endpoints.index(current.endpoint)
        for step in range(1, len(self._endpoints)):
            endpoint = self._endpoints[(start + step) % len(self._endpoints)]
            sent = anyio.current_time()
            mark = self.history.mark()
            try:
                conn, reply = await self._open(endpoint, self._timing.call_timeout)
            except (CallFailed, TimeoutError):
                continue
            self._conn = conn
            self.reconnects += 1
            self._silence_logged = False
            _log.warning(
                "etcd_endpoint_switched",
                node_id=self._node_id,
                reason=reason,
                **{"from": current.endpoint, "to": endpoint},
            )
            self._note_answer(sent)
            self._note_header(reply.header, endpoint, mark)
            # Calls in flight on the old channel fail with CallFailed; their loops retry.
            await current.close()
            return True
        return False

    # -- requests --------------------------------------------------------------------

    async def _call(
        self, make: Callable[[_Connection], Awaitable[_T]], within: float | None = None
    ) -> _T:
        """Run one request on the connection in use; note the answer, or raise :class:`CallFailed`.

        Renewing a stale auth token first waits at most ``within`` seconds
        (default ``call_timeout``); ``make`` sets the request's own deadline.
        """
        conn = self._conn
        assert conn is not None
        wait = self._timing.call_timeout if within is None else within
        sent = anyio.current_time()
        try:
            if conn.token_stale:
                await self._authenticate(conn, wait)
            reply = await _grpc(make(conn), conn)
        except _GRPC_ERRORS as error:
            if isinstance(error, rpc.AioRpcError) and error.code() in _AUTH_CODES:
                conn.token_stale = self._username is not None
            failure = _failure(conn.endpoint, error)
            if failure.unreachable and conn is self._conn:
                self.leave_endpoint("unreachable")
            raise failure from error
        self._note_answer(sent)
        return reply

    async def range(self, request: Any) -> Any:
        """A range request; its reply."""
        wait = self._timing.call_timeout
        endpoint, mark = self.endpoint, self.history.mark()
        reply = await self._call(
            lambda c: c.kv.Range(request, timeout=wait, metadata=c.metadata), wait
        )
        self._note_header(reply.header, endpoint or "", mark)
        return reply

    async def txn(self, request: Any, *, within: float | None = None) -> Any:
        """A transaction that writes, with a deadline ``within`` s (default ``call_timeout``).

        A transaction without a put or delete is refused (``ValueError``): etcd
        before 3.5.5 (and 3.4 without its backport) panics and exits when a read-only transaction's
        call is cancelled or times out while it runs (etcd issue 14110), so
        reads use :meth:`range`, pinned to one revision where they must agree.
        """
        if not _writes(request):
            raise ValueError(
                "read-only etcd transactions are not sent: a cancelled one crashes etcd "
                "before 3.5.5 (etcd issue 14110); read with range() instead"
            )
        wait = self._timing.call_timeout if within is None else within
        endpoint, mark = self.endpoint, self.history.mark()
        reply = await self._call(
            lambda c: c.kv.Txn(request, timeout=wait, metadata=c.metadata), wait
        )
        self._note_header(reply.header, endpoint or "", mark)
        return reply

    async def grant(self, ttl: int) -> Any:
        """Ask for a lease of ``ttl`` seconds; the reply (``ID``, ``TTL``, ``error``)."""
        request = rpc.LeaseGrantRequest(TTL=ttl)
        wait = self._timing.call_timeout
        return await self._call(
            lambda c: c.lease.LeaseGrant(request, timeout=wait, metadata=c.metadata), wait
        )

    async def keep_alive_once(self, lease_id: int) -> int:
        """Renew a lease once; the TTL etcd answered (``<= 0``: the lease is gone)."""
        request = rpc.LeaseKeepAliveRequest(ID=lease_id)
        wait = self._timing.call_timeout

        async def renew(conn: _Connection) -> int:
            call = conn.lease.LeaseKeepAlive(timeout=wait, metadata=conn.metadata)
            try:
                await call.write(request)
                async for reply in call:
                    return int(reply.TTL)
            finally:
                call.cancel()
            # A stream that ends unanswered is a transport failure, not a verdict on the lease.
            raise rpc.InternalError("etcd closed the keep-alive stream")

        return await self._call(renew, wait)

    async def revoke(self, lease_id: int, *, within: float) -> bool:
        """Revoke a lease and so its keys (deadline ``within`` s); ``False`` if etcd lacked it."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                lambda c: c.lease.LeaseRevoke(request, timeout=within, metadata=c.metadata),
                within,
            )
        except CallFailed as failure:
            if failure.not_found:
                return False
            raise
        return True

    async def first_events(
        self,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int,
        only: Literal["all", "puts", "deletes"] = "all",
        on_created: Callable[[], None] | None = None,
    ) -> list[Any] | None:
        """Watch from ``start_revision``: the first events etcd reports, ``None`` after a while.

        ``None`` after ``call_timeout`` without events, or when etcd cancels
        the watch (compaction). etcd reports a watch's events in revision
        order and never splits one revision's events, so the list holds every
        change in the range up to the revisions it covers. ``on_created``
        runs once etcd confirmed the watch.
        """
        create = rpc.WatchCreateRequest(
            key=key,
            range_end=range_end,
            start_revision=start_revision,
            filters=_WATCH_FILTERS[only],
        )
        request = rpc.WatchRequest(create_request=create)

        async def events(conn: _Connection) -> list[Any] | None:
            call = conn.watch.Watch(metadata=conn.metadata)
            try:
                await call.write(request)
                async for reply in call:
                    if reply.canceled or reply.compact_revision:
                        return None
                    if reply.created and on_created is not None:
                        on_created()
                    if reply.events:
                        return list(reply.events)
            finally:
                call.cancel()
            raise rpc.InternalError("etcd closed the watch stream")

        with anyio.move_on_after(self._timing.call_timeout):
            return await self._call(events)
        return None
