"""The revision floor: how an election recovers when etcd went back in time.

A store that lost its data hands out create revisions (epochs) the group
already used. Every node that notices (:class:`StoreHistory`) writes the
highest revision it saw to the election's floor key,
``<election>.revision-floor``, and moves etcd's revision past it by writing
that key again and again; a candidate creates its key only once the
revision is past the floor and the floor key still says so. Its epoch then
exceeds every epoch any node that wrote the floor ever published.
"""

from __future__ import annotations

import re
from typing import Any, Final, NoReturn

import anyio
from aetcd import rpc

from leaderwatch._log import get_logger
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient
from leaderwatch.drivers.etcd._keys import ElectionKeys

__all__ = ["RevisionFloor", "floor_from_value"]

_log = get_logger("leaderwatch.drivers.etcd")

_WRITERS: Final = 32
"""Writes in flight while moving etcd's revision forward (etcd batches them)."""
_DIGITS: Final = re.compile(rb"(?:0|[1-9][0-9]{0,18})\Z")
_MAX_REVISION: Final = 2**63 - 1


def floor_from_value(value: bytes) -> int | None:
    """The revision a floor key's value holds: a decimal in ``[0, 2**63)``; ``None`` otherwise."""
    if _DIGITS.match(value) is None:
        return None
    revision = int(value)
    return revision if revision <= _MAX_REVISION else None


class RevisionFloor:
    """Keeps etcd past the election's revision floor, for this node and its campaigns.

    Guarantees:

    - :meth:`ready` returns only once the store settled (see
      :attr:`StoreHistory.settled_at`) and :meth:`catch_up` returned.
    - :meth:`catch_up` returns only when etcd's revision is at or above the
      floor (:attr:`StoreHistory.floor`) and the floor key holds the floor; it
      returns the transaction condition "the floor key is unchanged", so a
      key created under it has a create revision above the floor.
    - It never lowers the floor key: a write replaces it only while it
      holds what was just read (or exactly the floor, when moving etcd on).
    - :meth:`keep` does the same whenever :attr:`StoreHistory.needs_catch_up`,
      so observers move etcd forward too.
    - A floor key whose value is not a decimal revision counts as 0 (one
      ``etcd_revision_floor_invalid`` warning per value) and is replaced
      once a node knows a floor.
    """

    def __init__(
        self, client: EtcdClient, keys: ElectionKeys, timing: LeaseTiming, *, node_id: str
    ) -> None:
        self._client = client
        self._key = keys.revision_floor
        self._timing = timing
        self._node_id = node_id
        self._history = client.history
        self._reported_invalid: bytes | None = None
        self._read = self.range()

    def range(self, revision: int = 0) -> Any:
        """The range request that reads the floor key (as of ``revision``, 0: now)."""
        return rpc.RangeRequest(key=self._key, revision=revision)

    def note(self, kvs: Any) -> None:
        """Note the floor key as read in ``kvs`` (the reply to :meth:`range`)."""
        self._history.note_floor_key(self._value(kvs), now=anyio.current_time())

    async def keep(self) -> NoReturn:
        """Forever: whenever etcd is behind the floor, or the floor key below it, catch up."""
        history = self._history
        while True:
            while not history.needs_catch_up:
                await history.wait_changed()
            await self.catch_up()

    async def ready(self) -> Any:
        """Wait until a candidate may create its key; return the condition guarding the floor.

        That is once :attr:`StoreHistory.settled_at` passed and :meth:`catch_up`
        returned: a key created under the condition has a create revision
        above the floor, and every lease of a store that went back ran out.
        """
        while True:
            await anyio.sleep_until(self._history.settled_at)
            guard = await self.catch_up()
            if anyio.current_time() >= self._history.settled_at:
                return guard

    async def catch_up(self) -> Any:
        """Move etcd and the floor key up to the floor; return the condition guarding it."""
        backoff = self._timing.backoff()
        failing = False
        while True:
            try:
                reply = await self._client.range(self._read)
                kvs = reply.kvs
                self.note(kvs)
                value = self._history.floor_key_value
                floor = self._history.floor
                if floor == 0 or (value == floor and reply.header.revision >= floor):
                    return rpc.Compare(
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.MOD,
                        key=self._key,
                        mod_revision=kvs[0].mod_revision if kvs else 0,
                    )
                if value < floor:
                    await self._replace(kvs[0].mod_revision if kvs else 0, floor)
                else:
                    await self._move_past(floor, reply.header.revision)
            except CallFailed as failure:
                if not failing:
                    _log.warning(
                        "etcd_revision_floor_failed", node_id=self._node_id, error=str(failure)
                    )
                failing = True
                await backoff.wait()
                continue
            failing = False
            backoff.reset()

    def _value(self, kvs: Any) -> int:
        if not kvs:
            return 0
        raw = kvs[0].value
        value = floor_from_value(raw)
        if value is None:
            if raw != self._reported_invalid:
                self._reported_invalid = raw
                _log.warning(
                    "etcd_revision_floor_invalid",
                    node_id=self._node_id,
                    key=self._key.decode("utf-8", "replace"),
                    value=raw[:100].decode("utf-8", "replace"),
                )
            return 0
        return value

    async def _replace(self, mod_revision: int, floor: int) -> None:
        """Write ``floor`` to the floor key if it is still what was read (``mod_revision``)."""
        unchanged = rpc.Compare(
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.MOD,
            key=self._key,
            mod_revision=mod_revision,
        )
        reply = await self._client.txn(
            rpc.TxnRequest(compare=[unchanged], success=[self._put(floor)])
        )
        if reply.succeeded:
            _log.warning("etcd_revision_floor_raised", node_id=self._node_id, floor=floor)

    async def _move_past(self, floor: int, revision: int) -> None:
        """Rewrite the floor key (holding ``floor``) until etcd's revision reaches ``floor``."""
        _log.warning(
            "etcd_revision_floor_push",
            node_id=self._node_id,
            revision=revision,
            floor=floor,
            writes=floor - revision,
        )
        holds_floor = rpc.Compare(
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.VALUE,
            key=self._key,
            value=str(floor).encode(),
        )
        rewrite = rpc.TxnRequest(compare=[holds_floor], success=[self._put(floor)])
        done = False
        failure: CallFailed | None = None

        async def write() -> None:
            nonlocal done, failure
            while not done:
                try:
                    reply = await self._client.txn(rewrite)
                except CallFailed as error:
                    failure, done = error, True
                    return
                if not reply.succeeded or reply.header.revision >= floor:
                    done = True

        async with anyio.create_task_group() as writers:
            for _ in range(min(_WRITERS, floor - revision + 1)):
                writers.start_soon(write)
        if failure is not None:
            raise failure

    def _put(self, floor: int) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=self._key, value=str(floor).encode()))
