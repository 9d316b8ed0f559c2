"""The observer: the current leader key of an election, as read from etcd.

The counterpart of ``Leader``/``Observe`` in ``election.go`` of etcd's Go
``client/v3/concurrency``, except that "no candidate" is reported too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import anyio

from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient
from leaderwatch.drivers.etcd._keys import ElectionKeys
from leaderwatch.state import InvalidEndpoint, parse_endpoint

__all__ = ["LeaderKey", "LeaderObserver", "LeaderRead"]

_log = get_logger("leaderwatch.drivers.etcd")


class LeaderKey(FrozenValue):
    """The leader's key: the election's key with the lowest create revision."""

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

    - :meth:`run` reads the leader key, then watches that key (or, with no
      candidate, the election's prefix for a new one) from the revision read,
      and reads again after a change, after ``call_timeout`` without one, or
      after a failure (with backoff; one ``etcd_request_failed`` warning per
      run of failures). Every read goes to ``on_read``.
    - A leader key whose value is not a scheme-less ``host:port`` is read as
      ``endpoint=None`` with one ``etcd_leader_endpoint_invalid`` error log
      per value.
    """

    def __init__(
        self, client: EtcdClient, keys: ElectionKeys, timing: LeaseTiming, *, node_id: str
    ) -> None:
        self._client = client
        self._keys = keys
        self._timing = timing
        self._node_id = node_id
        self._reported_invalid: tuple[bytes, int] | None = None

    def read_from(self, reply: Any, sent: float) -> LeaderRead:
        """The :class:`LeaderRead` in a reply to :attr:`ElectionKeys.leader_query`."""
        leader = None
        if reply.kvs:
            kv = reply.kvs[0]
            leader = LeaderKey(
                key=kv.key, create_revision=kv.create_revision, endpoint=self._endpoint_of(kv)
            )
        return LeaderRead(leader=leader, revision=reply.header.revision, sent=sent)

    async def run(
        self,
        on_read: Callable[[LeaderRead], None],
        before_reread: Callable[[bytes], Awaitable[None]],
    ) -> NoReturn:
        """Track the leader key forever.

        ``before_reread(key)`` is awaited after the watched ``key`` changed,
        before the next read.
        """
        backoff = self._timing.backoff()
        failing = False
        keys = self._keys
        while True:
            sent = anyio.current_time()
            try:
                reply = await self._client.range(keys.leader_query)
                read = self.read_from(reply, sent)
                on_read(read)
                if read.leader is not None:
                    watched = read.leader.key
                    changed = await self._client.first_events(
                        watched, b"", start_revision=read.revision + 1
                    )
                else:
                    watched = keys.prefix
                    changed = await self._client.first_events(
                        watched, keys.prefix_end, start_revision=read.revision + 1, only="puts"
                    )
                if changed is not None:
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
            return parse_endpoint(kv.value.decode("utf-8"))
        except (UnicodeDecodeError, InvalidEndpoint) as error:
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
