"""A campaign: this node's key in the election, its wait to be first in line, its resignation.

The counterpart of ``Campaign``/``Resign`` in ``election.go`` and
``waitDeletes`` in ``key.go`` of etcd's Go ``client/v3/concurrency``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from aetcd import rpc

from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.etcd._client import CallFailed, EtcdClient
from leaderwatch.drivers.etcd._floor import RevisionFloor
from leaderwatch.drivers.etcd._keys import ElectionKeys
from leaderwatch.drivers.etcd._lease import Lease

__all__ = ["Campaign", "CampaignStanding"]

_log = get_logger("leaderwatch.drivers.etcd")


class CampaignStanding(FrozenValue):
    """This node's key and whether it was proven first in line: what the decision needs."""

    key: bytes
    create_revision: int
    """The key's create revision: the epoch if it leads."""
    won_at: int | None = None
    """The etcd revision at which no lower key remained while this one existed, if so."""
    key_gone: bool = False
    """Whether this node learned that the key is gone (after it won)."""


def _same_key(key: bytes, create_revision: int) -> Any:
    """A transaction condition: ``key`` exists with ``create_revision`` (0: absent)."""
    return rpc.Compare(
        result=rpc.Compare.EQUAL,
        target=rpc.Compare.CREATE,
        key=key,
        create_revision=create_revision,
    )


class Campaign:
    """This node's key in one election, on one lease, and its place in line.

    Guarantees:

    - The key is created only if absent, holding this node's endpoint and
      attached to the lease, and only above the election's revision floor
      (:meth:`create`).
    - :meth:`wait_until_first` sets :attr:`won_at` at most once, and only on
      proof that no candidate key (:meth:`ElectionKeys.is_candidate`) with a
      lower create revision remained while this key still existed; other
      keys under the prefix are skipped. It watches only the predecessor; the candidate
      next in line watches the predecessor and its own key in one watch,
      whose in-order events prove both at once.
    - :attr:`waiting_on` names the predecessor whose change the campaign is
      about to react to; :meth:`wait_reacted` lets another task wait (bounded)
      until it has.
    - :meth:`delete_key` (resign) is shielded and bounded by ``resign_wait``,
      and deletes the key only while it is still this campaign's.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: ElectionKeys,
        timing: LeaseTiming,
        lease: Lease,
        key: bytes,
        create_revision: int,
        *,
        node_id: str,
    ) -> None:
        self._client = client
        self._keys = keys
        self._timing = timing
        self._node_id = node_id
        self.lease = lease
        self.key = key
        self.create_revision = create_revision
        self.won_at: int | None = None
        self.waiting_on: bytes | None = None
        """The predecessor key the campaign watches (or just saw change), if any."""
        self._reacted = anyio.Event()
        self.key_gone = anyio.Event()
        """Set by whoever learns that this key is gone after it won."""

    @classmethod
    async def create(
        cls,
        client: EtcdClient,
        keys: ElectionKeys,
        timing: LeaseTiming,
        lease: Lease,
        *,
        floor: RevisionFloor,
        endpoint: str,
        node_id: str,
    ) -> Campaign | None:
        """Put this node's key on ``lease``, above the floor; ``None`` when it is already gone.

        Waits for :meth:`RevisionFloor.ready` first, and again whenever the
        floor key changed before the key was created.
        """
        key = keys.candidate(lease.id)
        put = rpc.RequestOp(
            request_put=rpc.PutRequest(key=key, value=endpoint.encode(), lease=lease.id)
        )
        backoff = timing.backoff()
        outcome_unknown = False  # an attempt failed in flight: it may have created the key
        while True:
            create = rpc.TxnRequest(
                compare=[_same_key(key, 0), await floor.ready()],
                success=[put],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
            )
            try:
                reply = await client.txn(create)
            except CallFailed:
                outcome_unknown = True
                await backoff.wait()
                continue
            if reply.succeeded:
                revision = reply.header.revision
                break
            existing = reply.responses[0].response_range.kvs
            if existing:
                # An earlier attempt created it and its reply was lost.
                revision = existing[0].create_revision
                break
            if outcome_unknown:
                return None  # created by a lost attempt and gone again, or never: start over
            # The floor key changed under this attempt: catch up with it again.
        _log.info(
            "etcd_campaign_started",
            node_id=node_id,
            key=key.decode("utf-8", "replace"),
            create_revision=revision,
        )
        return cls(client, keys, timing, lease, key, revision, node_id=node_id)

    @property
    def standing(self) -> CampaignStanding:
        """The key and whether it won, as a value."""
        return CampaignStanding(
            key=self.key,
            create_revision=self.create_revision,
            won_at=self.won_at,
            key_gone=self.key_gone.is_set(),
        )

    async def wait_until_first(self, on_won: Callable[[], None]) -> bool:
        """Wait until no candidate key with a lower create revision remains: ``True``, won.

        ``False`` when this node's own key went first. ``on_won`` runs as soon
        as :attr:`won_at` is set, before this task yields: what it publishes
        comes before any re-read by a :meth:`wait_reacted` caller.
        """
        backoff = self._timing.backoff()
        try:
            while True:
                try:
                    line = await self._line()
                except CallFailed:
                    self._done_reacting()
                    await backoff.wait()
                    continue
                backoff.reset()
                self._done_reacting()
                if line is None:
                    return False
                revision, predecessor, next_in_line = line
                if predecessor is None:
                    self.won_at = revision
                    on_won()
                    return True
                try:
                    won_at = await self._wait_for_delete(
                        predecessor, next_in_line=next_in_line, after=revision
                    )
                except CallFailed:
                    await backoff.wait()
                    continue
                if won_at is not None:
                    self.won_at = won_at
                    on_won()
                    return True
        finally:
            self._done_reacting()

    async def _line(self) -> tuple[int, bytes | None, bool] | None:
        """Where this key stands: ``None`` when it is gone, else (revision, predecessor, next?).

        The predecessor is the candidate key right before this one in line
        (``None``: this key is first), ``next?`` whether the predecessor is
        first in line; both as of the returned revision, at which this key
        still existed. One range request (reads, never a read-only
        transaction: see :meth:`EtcdClient.txn`), read from this key down, plus
        a page per :data:`PAGE` keys that are not candidates, all at one
        revision.
        """
        keys = self._keys
        page = await self._client.range(keys.line_from(self.create_revision, keys_only=True))
        revision = int(page.header.revision)
        line: list[Any] = []  # candidates, this key first if it still exists, then down the line
        while True:
            line += [kv for kv in page.kvs if keys.is_candidate(kv.key)]
            if len(line) >= 3 or not page.more:
                break
            page = await self._client.range(
                keys.line_from(page.kvs[-1].create_revision - 1, keys_only=True, revision=revision)
            )
        if not line or line[0].key != self.key or line[0].create_revision != self.create_revision:
            return None
        if len(line) == 1:
            return revision, None, False
        return revision, line[1].key, len(line) == 2

    async def _wait_for_delete(
        self, predecessor: bytes, *, next_in_line: bool, after: int
    ) -> int | None:
        """Watch ``predecessor`` from revision ``after + 1`` until it changes (or a while).

        Returns the revision at which this campaign won when the watch proves
        it; ``None`` when only the transaction, which compares this node's own
        key, can decide.
        """
        if next_in_line:
            # One watch over a key range holding both the predecessor and this
            # node's key: its in-order events show whether this key outlived
            # the predecessor, saving a round trip on hand-over.
            low, high = sorted((predecessor, self.key))
            watched, watched_end = low, high + b"\0"
        else:
            watched, watched_end = predecessor, b""
        self.waiting_on = predecessor
        events = await self._client.first_events(
            watched, watched_end, start_revision=after + 1, only="deletes"
        )
        if not next_in_line or events is None:
            return None
        deleted = {event.kv.key: event.kv.mod_revision for event in events}
        if predecessor in deleted and self.key not in deleted:
            # Nothing below this key is left (lower create revisions are never
            # made again) and this key still existed then.
            return int(deleted[predecessor])
        return None

    def _done_reacting(self) -> None:
        """The campaign has reacted to ``waiting_on``'s change: wake whoever waits for that."""
        if self.waiting_on is not None:
            self.waiting_on = None
            self._reacted.set()
            self._reacted = anyio.Event()

    async def wait_reacted(self, key: bytes, within: float) -> None:
        """If the campaign watches ``key``, wait until it reacted to its change (``within`` s)."""
        if self.waiting_on == key:
            with anyio.move_on_after(within):
                await self._reacted.wait()

    async def delete_key(self) -> None:
        """Resign: best effort, shielded, within ``resign_wait``, delete this campaign's key.

        Deleting the key is one etcd proposal, like ``etcdctl elect``'s
        resign, and wakes the successor at once; revoking the lease afterwards
        is then off the hand-over's path.
        """
        wait = self._timing.resign_wait
        request = rpc.TxnRequest(
            compare=[_same_key(self.key, self.create_revision)],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self.key))],
        )
        error: str | None = f"no answer within {wait:g}s"  # unless etcd answers in time
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + wait):
            try:
                await self._client.txn(request, within=wait)
                error = None
            except CallFailed as failure:
                error = str(failure)
        if error is not None:
            _log.warning(
                "etcd_resign_failed",
                node_id=self._node_id,
                key=self.key.decode("utf-8", "replace"),
                error=error,
            )
