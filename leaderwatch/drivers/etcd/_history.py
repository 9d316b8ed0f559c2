"""What one node knows of the history of the etcd store it talks to: has it gone back in time?

etcd's revision only grows, in a store that keeps its data. A store whose
data directory was wiped, or that was restored from an older snapshot, or
another cluster behind the same address, answers with a lower revision or
another cluster id. Create revisions (the epochs) it hands out then repeat
ones the group already used: this module notices, and keeps the *floor*
at or below which no candidate key may lead.
"""

from __future__ import annotations

import math

import anyio

from leaderwatch._log import get_logger

__all__ = ["StoreHistory"]

_log = get_logger("leaderwatch.drivers.etcd")


class StoreHistory:
    """The revisions and cluster identity etcd answered with, and the floor they imply.

    Fed with the header of every linearizable reply (ranges and transactions)
    and with every value read from the election's revision floor key. In a
    store that keeps its data, a linearizable request sent after a reply
    arrived is answered at that reply's revision or later, whichever member
    answers (replies to requests in flight together may arrive in any order).

    Guarantees:

    - :attr:`high_water` is the highest revision etcd answered with since it
      was last seen going back.
    - The store *went back* when a reply's revision is below what
      :attr:`high_water` was when its request was sent (:meth:`mark`), or
      its cluster id differs from the one seen before. :attr:`floor` then
      rises to :attr:`high_water`, and :attr:`high_water` starts again from
      the store as it is now; one ``etcd_store_went_back`` error log says
      so, once per episode (until the store is past the floor again and the
      floor key holds it, which ``etcd_store_caught_up`` reports).
    - :attr:`floor` never decreases: it is the highest of the high-water
      marks at every going back and of every value read from the floor key.
      No key created at or below it may lead.
    - :attr:`settled_at`: ``settle`` seconds after this node first saw the
      store go back, or behind the floor, or the floor key rise above a
      floor it had already read (another node saw the store go back and
      moved it on before this node's first reply); a candidate campaigns
      only after it, so every lease the old store held has run out by then,
      and no leader of the old store still believes its lease.
    """

    __slots__ = (
        "_changed",
        "_episode",
        "_floor_read",
        "_lineage",
        "_node_id",
        "_reported",
        "_settle",
        "cluster_id",
        "floor",
        "floor_key_value",
        "high_water",
        "revision",
        "settled_at",
    )

    def __init__(self, *, node_id: str, settle: float) -> None:
        self._node_id = node_id
        self._settle = settle
        self.high_water = 0
        self.revision = 0
        """The revision of the last reply."""
        self.cluster_id: int | None = None
        self.floor = 0
        self.floor_key_value = 0
        """The last value read from the floor key (0: absent or not a revision)."""
        self.settled_at = -math.inf
        self._lineage = 0
        self._floor_read = False
        self._episode = False
        self._reported = False
        self._changed: anyio.Event | None = None

    @property
    def behind(self) -> bool:
        """Whether the store's last known revision is below the floor."""
        return self.revision < self.floor

    @property
    def needs_catch_up(self) -> bool:
        """Whether etcd must be moved forward: below the floor, or the floor key holds less."""
        return self.floor > 0 and (self.revision < self.floor or self.floor_key_value < self.floor)

    def mark(self) -> tuple[int, int]:
        """What to pass as ``sent`` to :meth:`note_reply` for a request sent now."""
        return self._lineage, self.high_water

    def note_reply(
        self,
        revision: int,
        cluster_id: int,
        *,
        sent: tuple[int, int],
        endpoint: str,
        now: float,
    ) -> None:
        """A linearizable reply from ``endpoint`` at ``revision`` of cluster ``cluster_id``.

        ``sent`` is :meth:`mark` as it was when the request was sent. A reply
        to a request sent before the store was last seen going back is
        ignored: it cannot be compared with the store as it is now.
        """
        lineage, sent_at = sent
        if lineage != self._lineage:
            return
        known_cluster = self.cluster_id
        if revision < sent_at or (known_cluster is not None and cluster_id != known_cluster):
            self.floor = max(self.floor, self.high_water)
            self._lineage += 1
            self.high_water = 0
            self._start_episode(now)
            if not self._reported:
                self._reported = True
                _log.error(
                    "etcd_store_went_back",
                    node_id=self._node_id,
                    endpoint=endpoint,
                    revision=revision,
                    high_water=self.floor,
                    cluster_id=f"{cluster_id:x}",
                    previous_cluster_id=None if known_cluster is None else f"{known_cluster:x}",
                    action="no key created at or below high_water leads; etcd is moved past it "
                    "before this node campaigns",
                )
        self.cluster_id = cluster_id
        self.revision = revision
        self.high_water = max(self.high_water, revision)
        self._after_change(now)

    def note_floor_key(self, value: int, *, now: float) -> None:
        """The floor key was read holding ``value`` (0 when absent or not a revision)."""
        self.floor_key_value = value
        if value > self.floor:
            if self._floor_read:
                self.settled_at = max(self.settled_at, now + self._settle)
                _log.warning(
                    "etcd_revision_floor_rose",
                    node_id=self._node_id,
                    floor=value,
                    previous_floor=self.floor,
                    action=f"another node saw etcd go back: campaigning waits {self._settle:g} s",
                )
            self.floor = value
        self._floor_read = True
        self._after_change(now)

    def _start_episode(self, now: float) -> None:
        if not self._episode:
            self._episode = True
            self.settled_at = max(self.settled_at, now + self._settle)

    def _after_change(self, now: float) -> None:
        if self.behind:
            # Behind a floor another node wrote: settle as if this node had seen it go back.
            self._start_episode(now)
        if self._episode and not self.needs_catch_up:
            self._episode = self._reported = False
            _log.info(
                "etcd_store_caught_up",
                node_id=self._node_id,
                revision=self.revision,
                floor=self.floor,
            )
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_changed(self) -> None:
        """Wait until the next reply or floor key read."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
