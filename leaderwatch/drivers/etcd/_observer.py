"""The observer: the current leader key of an election, as read from etcd.

The counterpart of ``Leader``/``Observe`` in ``election.go`` of etcd's Go
``client/v3/concurrency``, except that "no candidate" is reported too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Literal, NoReturn

import anyio

from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient
from leaderwatch.drivers.etcd._floor import RevisionFloor
from leaderwatch.drivers.etcd._keys import ElectionKeys
from leaderwatch.state import MAX_ENDPOINT_LENGTH, InvalidEndpoint, parse_endpoint

__all__ = ["LeaderKey", "LeaderObserver", "LeaderRead", "endpoint_from_value"]

_log = get_logger("leaderwatch.drivers.etcd")


def endpoint_from_value(value: bytes) -> str:
    """The endpoint a leader key's value names, as any program may have written it.

    Raises :class:`~leaderwatch.state.InvalidEndpoint`, naming the rule
    broken, unless ``value`` is the UTF-8 text of a scheme-less ``host:port``
    (see :func:`~leaderwatch.state.parse_endpoint`).
    """
    if len(value) > 4 * MAX_ENDPOINT_LENGTH:
        raise InvalidEndpoint(
            f"the value holds {len(value)} bytes; an endpoint has at most "
            f"{MAX_ENDPOINT_LENGTH} characters"
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEndpoint("the value is not UTF-8 text") from None
    return parse_endpoint(text)


class LeaderKey(FrozenValue):
    """The leader's key: the election's candidate key with the lowest create revision."""

    key: bytes
    create_revision: int
    """The leader's epoch."""
    endpoint: str | None
    """The key's value when it is a scheme-less ``host:port``, else ``None``."""


class LeaderRead(FrozenValue):
    """One read of the leader key."""

    leader: LeaderKey | None
    """``None`` when no candidate exists."""
    revision: int
    """etcd's revision when it answered."""
    sent: float
    """When the read was sent (``anyio.current_time()``)."""


class LeaderObserver:
    """Reads the leader key of one election whenever it may have changed.

    Guarantees:

    - :meth:`read` finds the candidate key (:meth:`ElectionKeys.is_candidate`)
      with the lowest create revision, skipping every other key under the
      prefix, and reads the election's revision floor in the same request.
    - :meth:`run` reads, then watches the leader key (or, with no candidate,
      the election's prefix for a new one) from the revision read, and reads
      again after a change, after ``call_timeout`` without one, or after a
      failure (with backoff; one ``etcd_request_failed`` warning per run of
      failures). Every read goes to ``on_read``, the events of every change
      to ``on_events`` first.
    - :attr:`watching` is the key (or prefix) whose watch etcd confirmed, and
      ``None`` whenever no such watch runs.
    - A leader key whose value is not a scheme-less ``host:port``
      (:func:`endpoint_from_value`) is read as ``endpoint=None`` with one
      ``etcd_leader_endpoint_invalid`` error log per value.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: ElectionKeys,
        floor: RevisionFloor,
        timing: LeaseTiming,
        *,
        node_id: str,
    ) -> None:
        self._client = client
        self._keys = keys
        self._floor = floor
        self._timing = timing
        self._node_id = node_id
        self._reported_invalid: tuple[bytes, int] | None = None
        self.watching: bytes | None = None

    async def read(self) -> LeaderRead:
        """Read the leader key and the revision floor now."""
        keys = self._keys
        sent = anyio.current_time()
        # Two reads at one revision, never a read-only transaction (see EtcdClient.txn).
        page = await self._client.range(keys.leader_query)
        revision = int(page.header.revision)
        floor = await self._client.range(self._floor.range(revision))
        self._floor.note(floor.kvs)
        kv = keys.first_candidate(page.kvs)
        while kv is None and page.more:
            page = await self._client.range(
                keys.lowest(above=page.kvs[-1].create_revision, revision=revision)
            )
            kv = keys.first_candidate(page.kvs)
        leader = None
        if kv is not None:
            leader = LeaderKey(
                key=kv.key, create_revision=kv.create_revision, endpoint=self._endpoint_of(kv)
            )
        return LeaderRead(leader=leader, revision=revision, sent=sent)

    async def run(
        self,
        on_read: Callable[[LeaderRead], None],
        on_events: Callable[[list[Any]], None],
        before_reread: Callable[[bytes], Awaitable[None]],
    ) -> NoReturn:
        """Track the leader key forever.

        ``on_events(events)`` gets the events of a change of the watched key
        as soon as they arrive; ``before_reread(key)`` is awaited after it,
        before the next read.
        """
        backoff = self._timing.backoff()
        failing = False
        keys = self._keys
        while True:
            try:
                read = await self.read()
                on_read(read)
                only: Literal["all", "puts"] = "all"
                if read.leader is not None:
                    watched, end = read.leader.key, b""
                else:
                    watched, end, only = keys.prefix, keys.prefix_end, "puts"
                try:
                    changed = await self._client.first_events(
                        watched,
                        end,
                        start_revision=read.revision + 1,
                        only=only,
                        on_created=partial(setattr, self, "watching", watched),
                    )
                finally:
                    self.watching = None
                if changed is not None:
                    on_events(changed)
                    await before_reread(watched)
            except CallFailed as failure:
                if not failing:
                    _log.warning("etcd_request_failed", node_id=self._node_id, error=str(failure))
                failing = True
                await backoff.wait()
                continue
            failing = False
            backoff.reset()

    def _endpoint_of(self, kv: Any) -> str | None:
        try:
            return endpoint_from_value(kv.value)
        except InvalidEndpoint as error:
            seen = (kv.key, kv.mod_revision)
            if seen != self._reported_invalid:
                self._reported_invalid = seen
                _log.error(
                    "etcd_leader_endpoint_invalid",
                    node_id=self._node_id,
                    key=kv.key.decode("utf-8", "replace"),
                    value=kv.value[:300].decode("utf-8", "replace"),
                    create_revision=kv.create_revision,
                    reason=str(error),
                )
            return None
