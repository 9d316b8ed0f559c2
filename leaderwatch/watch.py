"""The guarded publisher of one node's leadership (DESIGN contracts 4-5).

Every leadership value a driver produces goes through :class:`LeaderWatch`:
equal values are suppressed, different values always reach every
subscriber, and neither an epoch that would move backwards nor a second
leader at one epoch ever reaches anyone.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

from leaderwatch import _registry
from leaderwatch._log import get_logger
from leaderwatch.channel import ChannelClosed, WatchReceiver, WatchSender
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import (
    Follower,
    Leader,
    LeaderState,
    Unknown,
    observed_epoch,
    parse_endpoint,
    same_endpoint,
)

__all__ = ["THIS_NODE", "EpochConflict", "EpochRegression", "LeaderWatch", "LeaderWatchStats"]

_log = get_logger("leaderwatch.watch")

_STATE_TYPES = (Leader, Follower, Unknown)

THIS_NODE: Final = "this node"
"""How logs and :class:`EpochConflict` name this node as the leader of an epoch.

It can never be an endpoint (endpoints hold no whitespace).
"""


class EpochRegression(LeaderwatchError, RuntimeError):
    """A driver published an epoch below this node's high-water mark (strict mode).

    By the time this is raised, ``Unknown()`` has been published in place of
    the regressing state.
    """

    def __init__(self, node_id: str, high_water: int, state: Leader | Follower) -> None:
        self.node_id = node_id
        self.high_water = high_water
        self.state = state
        super().__init__(
            f"node {node_id!r} published {state!r} below its epoch high-water mark "
            f"{high_water}; this is a driver bug (epochs must never decrease), "
            "Unknown() was published in its place"
        )


class EpochConflict(LeaderwatchError, RuntimeError):
    """A driver published a second leader for an epoch that already had one (strict mode).

    ``epoch_leader`` is the leader this node already published at ``epoch``
    (an endpoint, or :data:`THIS_NODE`). By the time this is raised,
    ``Unknown()`` has been published in place of ``state``.
    """

    def __init__(
        self, node_id: str, epoch: int, epoch_leader: str, state: Leader | Follower
    ) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.epoch_leader = epoch_leader
        self.state = state
        super().__init__(
            f"node {node_id!r} published {state!r}, but epoch {epoch} already named "
            f"{epoch_leader} as leader; one epoch never names two leaders. This is a driver "
            "bug or a store that went back in time (the driver must move the store past "
            f"epoch {epoch}); Unknown() was published in its place"
        )


class LeaderWatchStats(BaseModel):
    """Counts of what :meth:`LeaderWatch.publish` did, as a snapshot."""

    model_config = ConfigDict(frozen=True)

    delivered: int
    """Values that reached subscribers (substituted ``Unknown()`` included)."""
    suppressed: int
    """Values offered equal to the current one, which woke nobody (regressions not included)."""
    regressions: int
    """Values refused because their epoch was below the high-water mark."""
    conflicts: int
    """Values refused because their epoch already named another leader."""


def _as_log(state: LeaderState) -> dict[str, Any]:
    return state.model_dump(mode="json")


def _named_leader(state: LeaderState) -> str | None:
    if isinstance(state, Leader):
        return THIS_NODE
    if isinstance(state, Follower):
        return state.leader_endpoint
    return None


class LeaderWatch:
    """One node's leadership, published to any number of subscribers.

    Guarantees:

    - Publishing a value equal to the current one wakes nobody; any
      different value (same variant with another epoch or endpoint included)
      reaches every subscriber.
    - Across ``Leader.epoch`` and ``Follower.leader_epoch`` one high-water
      mark is kept; a state below it is never delivered. ``Unknown()`` is
      delivered in its place (a step-down is never hidden), the error is
      logged as ``leader_state_epoch_regression`` and counted, and with
      ``strict=True`` :class:`EpochRegression` is raised.
    - One epoch never names two leaders: once this node published
      ``Leader(e)`` it never publishes ``Follower(x, e)`` for another node
      ``x``; once it published ``Follower(x, e)`` it never publishes
      ``Leader(e)`` nor ``Follower(y, e)`` for another node ``y``.
      ``Follower(None, e)`` and ``Unknown()`` name nobody and forget
      nothing. Endpoints compare with :func:`~leaderwatch.state.same_endpoint`;
      ``Follower(x, e)`` names this node only when ``x`` is ``self_endpoint``
      (without it, every endpoint is another node). A refused state is
      handled like a regression: ``Unknown()`` in its place,
      ``leader_state_epoch_conflict`` logged and counted, and with
      ``strict=True`` :class:`EpochConflict` raised. Once two leaders were
      offered at the high-water epoch, no leader at that epoch is delivered
      again; a higher epoch starts afresh.
    - A value published with no subscriber is stored for later ones.

    ``self_endpoint``, when given, must be a valid endpoint
    (:class:`~leaderwatch.state.InvalidEndpoint` otherwise).
    """

    __slots__ = (
        "__weakref__",
        "_conflicts",
        "_delivered",
        "_epoch_leaders",
        "_high_water",
        "_node_id",
        "_regressions",
        "_self_endpoint",
        "_sender",
        "_strict",
        "_suppressed",
    )

    def __init__(
        self,
        node_id: str,
        *,
        initial: LeaderState | None = None,
        strict: bool = False,
        self_endpoint: str | None = None,
    ) -> None:
        start = Unknown() if initial is None else initial
        if not isinstance(start, _STATE_TYPES):
            raise TypeError(f"initial must be a LeaderState (got {type(start).__name__})")
        self._node_id = node_id
        self._strict = strict
        self._self_endpoint = None if self_endpoint is None else parse_endpoint(self_endpoint)
        self._sender: WatchSender[LeaderState] = WatchSender(start)
        self._high_water = observed_epoch(start)
        # The leaders named at the high-water epoch, in the order offered: one
        # normally, more once a conflicting one was refused (the epoch is contested).
        leader = _named_leader(start)
        self._epoch_leaders: list[str] = [] if leader is None else [leader]
        self._delivered = 0
        self._suppressed = 0
        self._regressions = 0
        self._conflicts = 0
        _registry.track("watch", self, node_id)

    @property
    def node_id(self) -> str:
        """The node this watch speaks for (used in logs)."""
        return self._node_id

    @property
    def current(self) -> LeaderState:
        """The value subscribers see now."""
        return self._sender.borrow()

    @property
    def self_endpoint(self) -> str | None:
        """This node's own endpoint, if given: ``Follower`` values naming it name this node."""
        return self._self_endpoint

    @property
    def high_water(self) -> int | None:
        """The highest epoch published so far, ``None`` if none was."""
        return self._high_water

    @property
    def stats(self) -> LeaderWatchStats:
        """Counts of delivered, suppressed, regressing and conflicting publishes."""
        return LeaderWatchStats(
            delivered=self._delivered,
            suppressed=self._suppressed,
            regressions=self._regressions,
            conflicts=self._conflicts,
        )

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._sender.is_closed

    def subscribe(self) -> WatchReceiver[LeaderState]:
        """A new receiver; ``async for`` over it yields the current value first.

        Iteration never yields two equal values in a row, even when a reader
        falls behind a change and its reversal.
        """
        return self._sender.subscribe(distinct=True)

    def publish(self, state: LeaderState) -> bool:
        """Offer ``state``; return ``True`` iff it was delivered to subscribers.

        ``False`` means it equalled the current value (suppressed), or its
        epoch regressed or already named another leader (refused;
        ``Unknown()`` delivered instead). Raises
        :class:`~leaderwatch.channel.ChannelClosed` after :meth:`close`.
        """
        if not isinstance(state, _STATE_TYPES):
            raise TypeError(f"publish() takes a LeaderState (got {type(state).__name__})")
        if self._sender.is_closed:
            raise ChannelClosed(f"LeaderWatch for node {self._node_id!r} is closed")
        if not isinstance(state, Unknown):
            epoch = observed_epoch(state)
            if epoch is not None:
                high_water = self._high_water
                if high_water is not None and epoch < high_water:
                    self._refuse_regression(state, high_water)
                    return False
                leader = _named_leader(state)
                if high_water is None or epoch > high_water:
                    self._high_water = epoch
                    self._epoch_leaders = [] if leader is None else [leader]
                elif leader is not None:
                    if not all(self._same_leader(known, leader) for known in self._epoch_leaders):
                        self._refuse_conflict(state, epoch, leader)
                        return False
                    if not self._epoch_leaders:
                        self._epoch_leaders.append(leader)
        return self._deliver(state)

    def _same_leader(self, first: str, second: str) -> bool:
        if THIS_NODE in (first, second):
            other = second if first == THIS_NODE else first
            return other == THIS_NODE or (
                self._self_endpoint is not None and same_endpoint(other, self._self_endpoint)
            )
        return same_endpoint(first, second)

    def _deliver(self, state: LeaderState, *, offered: bool = True) -> bool:
        sender = self._sender
        previous = sender.borrow()
        if not sender.send_if_changed(state):
            if offered:
                self._suppressed += 1
            return False
        self._delivered += 1
        _log.info(
            "leader_state_changed",
            node_id=self._node_id,
            **{"from": _as_log(previous), "to": _as_log(state)},
        )
        return True

    def _refuse_regression(self, state: Leader | Follower, high_water: int) -> None:
        self._regressions += 1
        _log.error(
            "leader_state_epoch_regression",
            node_id=self._node_id,
            high_water=high_water,
            state=_as_log(state),
        )
        self._deliver(Unknown(), offered=False)
        if self._strict:
            raise EpochRegression(self._node_id, high_water, state)

    def _refuse_conflict(self, state: Leader | Follower, epoch: int, leader: str) -> None:
        self._conflicts += 1
        epoch_leader = self._epoch_leaders[0]
        if not any(self._same_leader(known, leader) for known in self._epoch_leaders):
            self._epoch_leaders.append(leader)
        _log.error(
            "leader_state_epoch_conflict",
            node_id=self._node_id,
            epoch=epoch,
            epoch_leader=epoch_leader,
            state=_as_log(state),
        )
        self._deliver(Unknown(), offered=False)
        if self._strict:
            raise EpochConflict(self._node_id, epoch, epoch_leader, state)

    def close(self) -> None:
        """Close the channel; idempotent. Subscribers' iterations end after the final value."""
        self._sender.close()

    async def __aenter__(self) -> LeaderWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
