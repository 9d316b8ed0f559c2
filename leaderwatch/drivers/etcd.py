"""Leader election across machines on an etcd v3 cluster (``pip install 'leaderwatch[etcd]'``).

Candidates follow etcd's own election recipe, the one behind ``etcdctl elect``
and Go's ``concurrency.Election``: each writes ``<election>/<lease id in hex>``
holding its endpoint, attached to its lease; the key with the lowest create
revision leads and its create revision is the epoch. ``etcdctl elect`` peers
and leaderwatch nodes therefore elect and observe each other.

The gRPC client is ``grpc.aio``, so this driver runs on anyio's asyncio
backend only.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.lowlevel
import grpc
import sniffio
from aetcd import rpc
from anyio.abc import TaskGroup

from leaderwatch._log import get_logger
from leaderwatch.drivers._base import DriverBase
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import (
    Follower,
    InvalidEndpoint,
    Leader,
    LeaderState,
    Unknown,
    parse_endpoint,
)

__all__ = [
    "EtcdAuthError",
    "EtcdElectionDriver",
    "EtcdElectionError",
    "EtcdUnavailable",
]

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
_MAX_RESIGN_WAIT: Final = 1.0
_MAX_BACKOFF: Final = 1.0


class EtcdElectionError(LeaderwatchError, RuntimeError):
    """The etcd election cannot start or run; the message says why and what to do."""


class EtcdUnavailable(EtcdElectionError):
    """No etcd endpoint answered at start-up (refused, timed out or TLS failure).

    The message names every endpoint tried and what each answered.
    """


class EtcdAuthError(EtcdElectionError):
    """etcd refused the credentials, or the user may not use the election's keys."""


class _ChannelClosed(Exception):
    """A call ended because this driver closed its channel (after an endpoint switch)."""


async def _grpc(awaitable: Awaitable[_T], conn: _Connection | None = None) -> _T:
    """Await a ``grpc.aio`` call so that anyio cancel scopes recognise their cancellation.

    grpc.aio swallows the task's cancellation and raises a fresh
    ``CancelledError``; a checkpoint lets anyio raise its own one instead.
    grpc.aio raises the same ``CancelledError`` in calls whose channel is
    closed: when that is ``conn``'s channel, which this driver closed, it
    becomes :class:`_ChannelClosed`, a failure callers retry.
    """
    try:
        return await awaitable
    except anyio.get_cancelled_exc_class() as error:
        await anyio.lowlevel.checkpoint()
        if conn is not None and conn.closed:
            raise _ChannelClosed(f"channel to {conn.endpoint} closed") from error
        raise


class _CallFailed(Exception):
    """An etcd request failed; loops retry it, start-up turns it into a public error."""

    def __init__(self, endpoint: str, error: BaseException) -> None:
        self.endpoint = endpoint
        code = error.code() if isinstance(error, rpc.AioRpcError) else None
        self.code: Any = code
        self.details = (error.details() or "") if isinstance(error, rpc.AioRpcError) else str(error)
        super().__init__(
            f"{endpoint}: {getattr(code, 'name', type(error).__name__)}: {self.details}"
        )

    @property
    def is_auth(self) -> bool:
        if self.code in _AUTH_CODES:
            return True
        return self.code == grpc.StatusCode.INVALID_ARGUMENT and any(
            word in self.details.lower() for word in _AUTH_WORDS
        )


_GRPC_ERRORS: Final = (rpc.RpcError, rpc.BaseError, _ChannelClosed)


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


class _Lease:
    """A granted lease and how long this node can prove it alive."""

    __slots__ = ("acked_send", "id", "proven_until", "revoked")

    def __init__(self, lease_id: int, acked_send: float, proven_until: float) -> None:
        self.id = lease_id
        self.acked_send = acked_send
        self.proven_until = proven_until
        self.revoked = False


class _Campaign:
    """This node's key in the election; ``won_at`` is the revision that proved it leads."""

    __slots__ = ("key", "lease", "revision", "step_done", "waiting_on", "won_at")

    def __init__(self, key: bytes, revision: int, lease: _Lease) -> None:
        self.key = key
        self.revision = revision
        self.lease = lease
        self.won_at: int | None = None
        self.waiting_on: bytes | None = None
        """The predecessor key the campaign is watching (or just saw change), if any."""
        self.step_done = anyio.Event()
        """Set when the campaign finished reacting to that key's change."""

    def finish_step(self) -> None:
        """The campaign has reacted to ``waiting_on``'s change: wake whoever waits for that."""
        if self.waiting_on is not None:
            self.waiting_on = None
            self.step_done.set()
            self.step_done = anyio.Event()


class _View:
    """The leader key as last read: lowest create revision under the election prefix."""

    __slots__ = ("create_revision", "endpoint", "key", "mod_revision", "revision", "sent")

    def __init__(
        self,
        key: bytes,
        create_revision: int,
        mod_revision: int,
        endpoint: str | None,
        revision: int,
        sent: float,
    ) -> None:
        self.key = key
        self.create_revision = create_revision
        self.mod_revision = mod_revision
        self.endpoint = endpoint
        self.revision = revision
        self.sent = sent
        """When the read that returned this key was sent (monotonic clock)."""


class _Backoff:
    __slots__ = ("_cap", "_delay", "_first")

    def __init__(self, first: float, cap: float) -> None:
        self._first = first
        self._cap = cap
        self._delay = first

    def reset(self) -> None:
        self._delay = self._first

    async def wait(self) -> None:
        await anyio.sleep(self._delay)
        self._delay = min(self._delay * 2, self._cap)


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _read_pem(name: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise EtcdElectionError(
            f"cannot read {name} {str(path)!r}: {error.strerror or error}"
        ) from error


def _running_on_asyncio() -> bool:
    return sniffio.current_async_library() == "asyncio"


class EtcdElectionDriver(DriverBase):
    """Elects one leader among the nodes that campaign in ``election`` on an etcd v3 cluster.

    With ``node_endpoint`` this node campaigns; without, it only observes.

    Guarantees:

    - Key layout of etcd's election recipe: a candidate writes
      ``<election>/<lease id, lowercase hex>`` holding ``node_endpoint``,
      attached to its lease of ``ttl`` seconds; the key with the lowest
      create revision leads, and ``Leader.epoch`` / ``Follower.leader_epoch``
      is that key's create revision, so epochs strictly increase across
      leaders. A waiting candidate watches only its predecessor key (the
      one next in line also its own key, in the same watch); a candidate
      whose key is gone never leads on it.
      ``etcdctl elect`` candidates and observers interoperate.
    - Lease safety: ``Leader`` is published only while the lease is proven
      alive, i.e. until ``ttl - margin`` seconds after sending the last
      keep-alive etcd acknowledged (monotonic clock, measured from the
      send). At that instant, if no newer keep-alive was acknowledged, the
      node publishes ``Unknown()``, abandons the lease and its key (a
      best-effort revoke), and campaigns again with a fresh lease once etcd
      answers. A lease etcd reports expired, or a deleted campaign key,
      ends the campaign the same way.
    - Non-leaders publish ``Follower(endpoint, epoch)`` for the current
      leader key, ``Follower(None, epoch)`` plus an error log
      (``etcd_leader_endpoint_invalid``) when its value is not a scheme-less
      ``host:port``, and ``Unknown()`` when no candidate exists. A node
      that cannot reach etcd publishes ``Unknown()`` at most ``ttl - margin``
      seconds after the last request etcd answered was sent. A leader key
      created below an epoch this node already published (etcd restored
      from an older snapshot) gives ``Unknown()`` and one error log
      (``etcd_epoch_behind``) per key.
    - Leaving ``async with`` publishes ``Unknown()`` and then revokes the
      lease (resign), so a successor takes over at once.
    - Start-up raises :class:`EtcdUnavailable` when no endpoint answers
      (connection refused, TLS failure, or no answer within
      ``connect_timeout`` seconds; each endpoint gets that long, in turn)
      and :class:`EtcdAuthError` when credentials or permissions are
      refused; both name the endpoint. Once started, the first value
      subscribers see reflects the leader key etcd held at start-up.

    ``endpoints`` are scheme-less ``host:port`` strings (one string may hold
    several, comma-separated): they are tried in order at start-up and again,
    in turn, whenever the one in use stops answering. TLS is used when
    ``tls=True`` or any of ``ca_cert``, ``client_cert``, ``client_key`` is
    given; ``username`` and ``password`` use etcd's authentication.
    ``margin`` defaults to ``max(0.5, ttl / 5)`` seconds and must be in
    ``(0, ttl)``. Runs on the asyncio backend only (``grpc.aio``); entering
    it under trio raises :class:`EtcdElectionError`.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        election: str,
        node_endpoint: str | None = None,
        ttl: int = 10,
        margin: float | None = None,
        node_id: str | None = None,
        connect_timeout: float = 5.0,
        tls: bool | None = None,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        strict: bool = False,
    ) -> None:
        self._endpoints = self._parse_endpoints(endpoints)
        if not isinstance(election, str) or not election:
            raise ValueError(f"election must be a non-empty string (got {election!r})")
        own = None if node_endpoint is None else parse_endpoint(node_endpoint)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be an integer number of seconds >= 1 (got {ttl!r})")
        chosen = max(0.5, ttl / 5) if margin is None else margin
        if not (isinstance(chosen, int | float) and math.isfinite(chosen) and 0 < chosen < ttl):
            raise ValueError(
                f"margin must be a number of seconds in (0, ttl={ttl}) (got {chosen!r})"
            )
        if not (
            isinstance(connect_timeout, int | float)
            and math.isfinite(connect_timeout)
            and connect_timeout > 0
        ):
            raise ValueError(f"connect_timeout must be > 0 seconds (got {connect_timeout!r})")
        if (username is None) != (password is None):
            raise ValueError("username and password must be given together")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key must be given together")
        use_tls = (
            tls
            if tls is not None
            else any(path is not None for path in (ca_cert, client_cert, client_key))
        )
        if not use_tls and any(path is not None for path in (ca_cert, client_cert, client_key)):
            raise ValueError("ca_cert, client_cert and client_key need tls=True")
        super().__init__(
            node_id if node_id is not None else (own or f"etcd-observer:{election}"),
            strict=strict,
        )
        self._credentials: Any = None
        if use_tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem("ca_cert", ca_cert),
                private_key=_read_pem("client_key", client_key),
                certificate_chain=_read_pem("client_cert", client_cert),
            )
        self._tls = use_tls
        self._username = username
        self._password = password
        self._election = election
        self._prefix = election.encode() + b"/"
        self._leader_query = self._first_key(rpc.RangeRequest.ASCEND)
        self._node_endpoint = own
        self._ttl = ttl
        self._margin = float(chosen)
        self._proof = ttl - self._margin
        # Three keep-alives fit in every proof window, so one lost reply costs nothing.
        self._interval = self._proof / 3
        self._connect_timeout = float(connect_timeout)
        self._conn: _Connection | None = None
        self._contact_until = -math.inf
        self._touched: anyio.Event | None = None
        self._view: _View | None = None
        self._reported_invalid: tuple[bytes, int] | None = None
        self._reported_behind: tuple[bytes, int] | None = None
        self._high_water_at = -math.inf
        self._campaign: _Campaign | None = None
        self._session: anyio.CancelScope | None = None

    @staticmethod
    def _parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
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

    def _first_key(self, order: int, **options: Any) -> Any:
        """A request for the first key under the election prefix in create order ``order``."""
        return rpc.RangeRequest(
            key=self._prefix,
            range_end=_prefix_end(self._prefix),
            limit=1,
            sort_order=order,
            sort_target=rpc.RangeRequest.CREATE,
            **options,
        )

    @property
    def election(self) -> str:
        """The election name; candidate keys live under ``election + "/"``."""
        return self._election

    @property
    def node_endpoint(self) -> str | None:
        """The endpoint this node campaigns with, ``None`` for an observer."""
        return self._node_endpoint

    @property
    def ttl(self) -> int:
        """Lease time-to-live requested from etcd, in seconds."""
        return self._ttl

    @property
    def margin(self) -> float:
        """Seconds before ``ttl`` at which an unconfirmed leader steps down."""
        return self._margin

    @property
    def etcd_endpoint(self) -> str | None:
        """The etcd endpoint in use, ``None`` before start-up."""
        return None if self._conn is None else self._conn.endpoint

    @property
    def lease_id(self) -> int | None:
        """The lease of the current campaign, ``None`` when not campaigning."""
        campaign = self._campaign
        return None if campaign is None else campaign.lease.id

    @property
    def campaign_revision(self) -> int | None:
        """The create revision of this node's key (its epoch if it leads), if campaigning."""
        campaign = self._campaign
        return None if campaign is None else campaign.revision

    @property
    def proven_until(self) -> float:
        """Until when (``anyio.current_time()``) this node's leadership is proven; see the class."""
        campaign = self._campaign
        if campaign is None or campaign.won_at is None:
            return -math.inf
        return campaign.lease.proven_until

    # -- lifecycle -----------------------------------------------------------------

    async def _start(self, task_group: TaskGroup) -> None:
        if not _running_on_asyncio():
            raise EtcdElectionError(
                "EtcdElectionDriver runs on anyio's asyncio backend only (its gRPC client is "
                "grpc.aio); run the application with backend='asyncio'"
            )
        sent = anyio.current_time()
        self._conn, leader = await self._connect_first()
        self._touch(sent)
        # The first value subscribers see is what etcd holds, not a placeholder.
        self._set_view(leader.kvs[0] if leader.kvs else None, leader.header.revision, sent)
        task_group.start_soon(self._run)

    async def _run(self) -> None:
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._view_loop)
                task_group.start_soon(self._contact_guard)
                if self._node_endpoint is not None:
                    task_group.start_soon(self._campaign_loop)
        finally:
            if self._conn is not None:
                await self._conn.close()

    async def _resign(self) -> None:
        # Resign before the background tasks are torn down, so a successor is
        # not kept waiting for their cancellation.
        campaign = self._campaign
        if campaign is not None:
            self._campaign = None
            self._update()
            await self._delete_key(campaign)
            await self._revoke(campaign.lease)
        if self._session is not None:
            self._session.cancel()

    # -- connections ---------------------------------------------------------------

    async def _open(self, endpoint: str, wait: float) -> tuple[_Connection, Any]:
        """Connect, authenticate and read the leader key within ``wait`` seconds.

        Returns the connection and the leader key's range reply; raises
        ``_CallFailed`` when etcd refuses and ``TimeoutError`` when it is silent.
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
                    conn.kv.Range(self._leader_query, timeout=left, metadata=conn.metadata)
                )
        except _GRPC_ERRORS as error:
            await conn.close()
            raise _CallFailed(endpoint, error) from error
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

    async def _connect_first(self) -> tuple[_Connection, Any]:
        failures: list[_CallFailed] = []
        for endpoint in self._endpoints:
            try:
                opened = await self._open(endpoint, self._connect_timeout)
            except TimeoutError:
                failures.append(_CallFailed(endpoint, TimeoutError("no answer")))
                continue
            except _CallFailed as failure:
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
            _log.info("etcd_connected", node_id=self.node_id, endpoint=endpoint, tls=self._tls)
            return opened
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

    async def _switch_endpoint(self) -> None:
        """Try the other endpoints in turn; keep the current one if none answers."""
        current = self._conn
        assert current is not None
        start = self._endpoints.index(current.endpoint)
        for step in range(1, len(self._endpoints)):
            endpoint = self._endpoints[(start + step) % len(self._endpoints)]
            try:
                conn, _ = await self._open(endpoint, self._interval)
            except (_CallFailed, TimeoutError):
                continue
            self._conn = conn
            _log.warning(
                "etcd_endpoint_switched",
                node_id=self.node_id,
                **{"from": current.endpoint, "to": endpoint},
            )
            await current.close()
            return

    async def _call(
        self, make: Callable[[_Connection], Awaitable[_T]], auth_wait: float | None = None
    ) -> _T:
        """Run one request on the current connection; failures raise ``_CallFailed``.

        Renewing the auth token first waits at most ``auth_wait`` seconds (default:
        the keep-alive interval).
        """
        conn = self._conn
        assert conn is not None
        try:
            if conn.token_stale:
                await self._authenticate(conn, self._interval if auth_wait is None else auth_wait)
            return await _grpc(make(conn), conn)
        except _GRPC_ERRORS as error:
            if isinstance(error, rpc.AioRpcError) and error.code() in _AUTH_CODES:
                conn.token_stale = self._username is not None
            raise _CallFailed(conn.endpoint, error) from error

    async def _first_reply(self, call: Any, request: Any) -> Any:
        """Send ``request`` on a streaming call; return its first reply, ``None`` at end."""
        try:
            await call.write(request)
            async for reply in call:
                return reply
            return None
        finally:
            call.cancel()

    def _touch(self, sent: float) -> None:
        """etcd answered a request sent at ``sent``: the node's view is current until then."""
        until = sent + self._proof
        if until > self._contact_until:
            self._contact_until = until
        touched = self._touched
        if touched is not None:
            self._touched = None
            touched.set()

    async def _contact_guard(self) -> None:
        """Publish ``Unknown()`` once etcd stayed silent for the proof window."""
        while True:
            until = self._contact_until
            if anyio.current_time() < until:
                await anyio.sleep_until(until)
                continue
            if until > -math.inf:
                _log.warning(
                    "etcd_unreachable",
                    node_id=self.node_id,
                    endpoint=self.etcd_endpoint,
                    silent_for=round(anyio.current_time() - until + self._proof, 3),
                )
            self._update()
            touched = self._touched = anyio.Event()
            if len(self._endpoints) == 1:
                await touched.wait()
                continue
            with anyio.move_on_after(self._interval):
                await touched.wait()
            if not touched.is_set():
                await self._switch_endpoint()

    # -- observing the leader ------------------------------------------------------

    async def _view_loop(self) -> None:
        """Track the leader key: read it, watch it (or the empty prefix), read again."""
        backoff = _Backoff(0.05, min(_MAX_BACKOFF, self._interval))
        failing = False
        end = _prefix_end(self._prefix)
        leader_query = self._leader_query
        while True:
            sent = anyio.current_time()
            try:
                reply = await self._call(
                    lambda c: c.kv.Range(leader_query, timeout=self._interval, metadata=c.metadata)
                )
                self._touch(sent)
                self._set_view(reply.kvs[0] if reply.kvs else None, reply.header.revision, sent)
                if reply.kvs:
                    key, filters = reply.kvs[0].key, []
                    watch_end = b""
                else:
                    key, filters = self._prefix, [rpc.WatchCreateRequest.NODELETE]
                    watch_end = end
                changed = await self._wait_events(
                    key, watch_end, reply.header.revision + 1, filters
                )
                campaign = self._campaign
                if changed is not None and campaign is not None and campaign.waiting_on == key:
                    # The leader is this node's predecessor: let the campaign
                    # decide first, so the hand-over is not slowed by this re-read.
                    with anyio.move_on_after(self._interval):
                        await campaign.step_done.wait()
            except _CallFailed as failure:
                if not failing:
                    _log.warning("etcd_request_failed", node_id=self.node_id, error=str(failure))
                failing = True
                await backoff.wait()
                continue
            failing = False
            backoff.reset()

    async def _wait_events(
        self, key: bytes, range_end: bytes, start_revision: int, filters: list[int]
    ) -> list[Any] | None:
        """Watch from ``start_revision``: the first events etcd reports, ``None`` after a while.

        etcd reports a watch's events in revision order and never splits one
        revision's events, so the list holds every change in the range up to the
        revisions it covers.
        """
        create = rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, filters=filters
        )
        request = rpc.WatchRequest(create_request=create)

        async def first_events(conn: _Connection) -> list[Any] | None:
            call = conn.watch.Watch(metadata=conn.metadata)
            try:
                await call.write(request)
                async for reply in call:
                    if reply.canceled or reply.compact_revision:
                        return None
                    if reply.events:
                        return list(reply.events)
            finally:
                call.cancel()
            raise rpc.InternalError("etcd closed the watch stream")

        with anyio.move_on_after(self._interval):
            return await self._call(first_events)
        return None

    def _set_view(self, kv: Any, revision: int, sent: float) -> None:
        campaign = self._campaign
        if kv is None:
            self._view = None
        else:
            self._view = _View(
                kv.key, kv.create_revision, kv.mod_revision, self._endpoint_of(kv), revision, sent
            )
            if (
                campaign is not None
                and campaign.won_at is None
                and kv.key == campaign.key
                and kv.create_revision == campaign.revision
            ):
                self._won(campaign, revision)
        if (
            campaign is not None
            and campaign.won_at is not None
            and revision >= campaign.won_at
            and (kv is None or kv.key != campaign.key)
        ):
            self._end_session("campaign_key_deleted")
        self._update()

    def _endpoint_of(self, kv: Any) -> str | None:
        try:
            return parse_endpoint(kv.value.decode("utf-8"))
        except (UnicodeDecodeError, InvalidEndpoint) as error:
            seen = (kv.key, kv.mod_revision)
            if seen != self._reported_invalid:
                self._reported_invalid = seen
                _log.error(
                    "etcd_leader_endpoint_invalid",
                    node_id=self.node_id,
                    key=kv.key.decode("utf-8", "replace"),
                    value=kv.value[:300].decode("utf-8", "replace"),
                    create_revision=kv.create_revision,
                    reason=str(error),
                )
            return None

    def _state_now(self) -> LeaderState:
        now = anyio.current_time()
        campaign = self._campaign
        if (
            campaign is not None
            and campaign.won_at is not None
            and now < campaign.lease.proven_until
        ):
            return Leader(epoch=campaign.revision)
        view = self._view
        if view is None or now >= self._contact_until:
            return Unknown()
        if campaign is not None and view.key == campaign.key:
            return Unknown()
        if self._node_endpoint is not None and view.endpoint == self._node_endpoint:
            # A key of ours from an abandoned lease: it leads nobody.
            return Unknown()
        high_water = self._watch.high_water
        if high_water is not None and view.create_revision < high_water:
            seen = (view.key, view.create_revision)
            # A read sent before this node published its newest epoch is merely
            # stale; one sent after it means etcd went back in time.
            if view.sent > self._high_water_at and seen != self._reported_behind:
                self._reported_behind = seen
                _log.error(
                    "etcd_epoch_behind",
                    node_id=self.node_id,
                    key=view.key.decode("utf-8", "replace"),
                    create_revision=view.create_revision,
                    high_water=high_water,
                )
            return Unknown()
        return Follower(leader_endpoint=view.endpoint, leader_epoch=view.create_revision)

    def _update(self) -> None:
        if not self._watch.is_closed:
            high_water = self._watch.high_water
            self._publish(self._state_now())
            if self._watch.high_water != high_water:
                self._high_water_at = anyio.current_time()

    # -- campaigning ---------------------------------------------------------------

    async def _campaign_loop(self) -> None:
        backoff = _Backoff(0.05, min(_MAX_BACKOFF, self._interval))
        while self.campaigning:
            lease = await self._grant()
            if not self.campaigning:
                # The driver resigned or is leaving: never start a campaign it would not resign.
                await self._revoke(lease)
                return
            started = anyio.current_time()
            try:
                async with anyio.create_task_group() as session:
                    self._session = session.cancel_scope
                    session.start_soon(self._keep_alive, lease)
                    session.start_soon(self._guard_lease, lease)
                    session.start_soon(self._campaign_with, lease)
            finally:
                self._session = None
                self._campaign = None
                self._update()
                await self._revoke(lease)
            if anyio.current_time() - started > self._proof:
                backoff.reset()
            await backoff.wait()

    async def _grant(self) -> _Lease:
        backoff = _Backoff(0.05, min(_MAX_BACKOFF, self._interval))
        request = rpc.LeaseGrantRequest(TTL=self._ttl)
        while True:
            sent = anyio.current_time()
            try:
                reply = await self._call(
                    lambda c: c.lease.LeaseGrant(
                        request, timeout=self._interval, metadata=c.metadata
                    )
                )
            except _CallFailed as failure:
                _log.debug("etcd_lease_grant_failed", node_id=self.node_id, error=str(failure))
                await backoff.wait()
                continue
            if reply.error or reply.TTL <= 0:
                _log.warning("etcd_lease_grant_refused", node_id=self.node_id, error=reply.error)
                await backoff.wait()
                continue
            self._touch(sent)
            proven = min(self._ttl, reply.TTL) - self._margin
            _log.info(
                "etcd_lease_granted", node_id=self.node_id, lease_id=f"{reply.ID:x}", ttl=reply.TTL
            )
            return _Lease(reply.ID, sent, sent + proven)

    async def _keep_alive(self, lease: _Lease) -> None:
        request = rpc.LeaseKeepAliveRequest(ID=lease.id)
        retry = min(0.1, self._interval / 4)
        next_send = lease.acked_send + self._interval
        while True:
            await anyio.sleep_until(next_send)
            sent = anyio.current_time()
            try:
                reply = await self._call(
                    lambda c: self._first_reply(
                        c.lease.LeaseKeepAlive(timeout=self._interval, metadata=c.metadata),
                        request,
                    )
                )
            except _CallFailed as failure:
                _log.debug("etcd_keepalive_failed", node_id=self.node_id, error=str(failure))
                next_send = max(anyio.current_time(), sent + retry)
                continue
            if reply is None:
                # The stream ended without an answer: a transport failure, not a
                # verdict on the lease (_guard_lease still bounds how long it counts).
                _log.debug("etcd_keepalive_failed", node_id=self.node_id, error="stream ended")
                next_send = max(anyio.current_time(), sent + retry)
                continue
            if reply.TTL <= 0:
                self._end_session("lease_expired", lease_id=f"{lease.id:x}")
                return
            self._touch(sent)
            until = sent + min(self._ttl, reply.TTL) - self._margin
            if until > lease.proven_until:
                lease.acked_send = sent
                lease.proven_until = until
            next_send = sent + self._interval

    async def _guard_lease(self, lease: _Lease) -> None:
        """End the campaign the moment the lease can no longer be proven alive."""
        while True:
            until = lease.proven_until
            if anyio.current_time() >= until:
                break
            await anyio.sleep_until(until)
        self._end_session(
            "lease_unproven",
            lease_id=f"{lease.id:x}",
            last_acked_send=lease.acked_send,
            proven_until=lease.proven_until,
        )

    def _end_session(self, reason: str, **fields: object) -> None:
        """Stop leading (publish first), then abandon the lease and its key."""
        campaign = self._campaign
        was_leader = campaign is not None and campaign.won_at is not None
        self._campaign = None
        self._update()
        if not self.campaigning:
            if self._session is not None:
                self._session.cancel()
            return
        _log.warning(
            "etcd_campaign_abandoned",
            node_id=self.node_id,
            reason=reason,
            was_leader=was_leader,
            at=anyio.current_time(),
            **fields,
        )
        if self._session is not None:
            self._session.cancel()

    def _won(self, campaign: _Campaign, revision: int) -> None:
        campaign.won_at = revision
        self._update()
        _log.info(
            "etcd_campaign_won",
            node_id=self.node_id,
            key=campaign.key.decode("utf-8", "replace"),
            epoch=campaign.revision,
        )

    async def _campaign_with(self, lease: _Lease) -> None:
        """Put this node's key, then wait until no key with a lower create revision remains."""
        assert self._node_endpoint is not None
        backoff = _Backoff(0.05, min(_MAX_BACKOFF, self._interval))
        key = self._prefix + f"{lease.id:x}".encode()
        create = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=0
                )
            ],
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(
                        key=key, value=self._node_endpoint.encode(), lease=lease.id
                    )
                )
            ],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )
        while True:
            try:
                reply = await self._call(
                    lambda c: c.kv.Txn(create, timeout=self._interval, metadata=c.metadata)
                )
                break
            except _CallFailed:
                await backoff.wait()
        if reply.succeeded:
            revision = reply.header.revision
        else:
            existing = reply.responses[0].response_range.kvs
            if not existing:
                self._end_session("campaign_key_deleted")
                return
            revision = existing[0].create_revision
        campaign = _Campaign(key, revision, lease)
        self._campaign = campaign
        _log.info(
            "etcd_campaign_started",
            node_id=self.node_id,
            key=key.decode("utf-8", "replace"),
            create_revision=revision,
        )
        predecessors = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    result=rpc.Compare.EQUAL,
                    target=rpc.Compare.CREATE,
                    key=key,
                    create_revision=revision,
                )
            ],
            success=[
                rpc.RequestOp(
                    request_range=self._first_key(
                        rpc.RangeRequest.DESCEND,
                        max_create_revision=revision - 1,
                        keys_only=True,
                    )
                ),
                rpc.RequestOp(
                    request_range=self._first_key(rpc.RangeRequest.ASCEND, keys_only=True)
                ),
            ],
        )
        try:
            while campaign.won_at is None:
                try:
                    reply = await self._call(
                        lambda c: c.kv.Txn(
                            predecessors, timeout=self._interval, metadata=c.metadata
                        )
                    )
                except _CallFailed:
                    campaign.finish_step()
                    await backoff.wait()
                    continue
                backoff.reset()
                campaign.finish_step()
                if not reply.succeeded:
                    self._end_session("campaign_key_deleted")
                    return
                found = reply.responses[0].response_range.kvs
                if not found:
                    if campaign.won_at is None:
                        self._won(campaign, reply.header.revision)
                    break
                predecessor = found[0].key
                lowest = reply.responses[1].response_range.kvs
                next_in_line = bool(lowest) and lowest[0].key == predecessor
                if next_in_line:
                    # One watch over a key range holding both the predecessor and
                    # this node's key: its in-order events show whether this key
                    # outlived the predecessor, saving a round trip on hand-over.
                    low, high = sorted((predecessor, key))
                    watched, watched_end = low, high + b"\0"
                else:
                    watched, watched_end = predecessor, b""
                campaign.waiting_on = predecessor
                try:
                    events = await self._wait_events(
                        watched,
                        watched_end,
                        reply.header.revision + 1,
                        [rpc.WatchCreateRequest.NOPUT],
                    )
                except _CallFailed:
                    await backoff.wait()
                    continue
                if next_in_line and events is not None:
                    deleted = {event.kv.key: event.kv.mod_revision for event in events}
                    if predecessor in deleted and key not in deleted:
                        # Nothing below this key is left (lower create revisions
                        # are never made again) and this key still existed then.
                        if campaign.won_at is None:
                            self._won(campaign, deleted[predecessor])
                        break
                # Anything else: only the transaction, which compares this node's
                # own key, decides.
        finally:
            campaign.finish_step()
        self._update()

    async def _delete_key(self, campaign: _Campaign) -> None:
        """Best effort, bounded: delete this node's key, which wakes its successor at once.

        Deleting the key is one etcd proposal, like ``etcdctl elect``'s resign;
        revoking the lease afterwards is then off the hand-over's path.
        """
        wait = min(_MAX_RESIGN_WAIT, self._interval)
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    result=rpc.Compare.EQUAL,
                    target=rpc.Compare.CREATE,
                    key=campaign.key,
                    create_revision=campaign.revision,
                )
            ],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=campaign.key))],
        )
        error: str | None = None
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + wait) as scope:
            try:
                await self._call(
                    lambda c: c.kv.Txn(request, timeout=wait, metadata=c.metadata), auth_wait=wait
                )
            except _CallFailed as failure:
                error = str(failure)
        if scope.cancelled_caught:
            error = f"no answer within {wait:g}s"
        if error is not None:
            _log.warning(
                "etcd_resign_failed",
                node_id=self.node_id,
                key=campaign.key.decode("utf-8", "replace"),
                error=error,
            )

    async def _revoke(self, lease: _Lease) -> None:
        """Best effort, bounded: delete the lease and its key so a successor need not wait."""
        if lease.revoked:
            return
        lease.revoked = True
        wait = min(_MAX_RESIGN_WAIT, self._interval)
        request = rpc.LeaseRevokeRequest(ID=lease.id)
        error: str | None = None
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + wait) as scope:
            try:
                await self._call(
                    lambda c: c.lease.LeaseRevoke(request, timeout=wait, metadata=c.metadata),
                    auth_wait=wait,
                )
            except _CallFailed as failure:
                if failure.code == grpc.StatusCode.NOT_FOUND:
                    return
                error = str(failure)
        if scope.cancelled_caught:
            error = f"no answer within {wait:g}s"
        if error is not None:
            _log.warning(
                "etcd_lease_revoke_failed",
                node_id=self.node_id,
                lease_id=f"{lease.id:x}",
                error=error,
            )
            return
        _log.info("etcd_lease_revoked", node_id=self.node_id, lease_id=f"{lease.id:x}")
