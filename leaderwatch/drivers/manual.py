"""Scripted leadership: the caller decides every transition."""

from __future__ import annotations

from leaderwatch.drivers._base import DriverBase
from leaderwatch.state import Follower, Leader, Unknown, check_epoch, parse_endpoint

__all__ = ["ManualDriver"]


class ManualDriver(DriverBase):
    """Leadership driven by explicit calls, for tests, examples and conformance suites.

    Each ``become_*`` call goes through the node's :class:`LeaderWatch`:
    it returns ``True`` iff the value reached subscribers; an equal value is
    suppressed, and a value whose epoch is below the node's high-water mark
    is refused and ``Unknown()`` is delivered in its place. Bad arguments
    raise ``InvalidEpoch`` or ``InvalidEndpoint`` and publish nothing. After
    exit every call raises :class:`~leaderwatch.channel.ChannelClosed`.
    :meth:`resign` publishes ``Unknown()`` if this node leads; the script
    stays in charge afterwards.
    """

    def __init__(self, *, node_id: str = "manual", strict: bool = False) -> None:
        super().__init__(node_id, strict=strict)

    async def _resign(self) -> None:
        if isinstance(self.current, Leader):
            self._publish(Unknown())

    def become_leader(self, epoch: int) -> bool:
        """Publish ``Leader(epoch)``."""
        return self._publish(Leader(epoch=check_epoch(epoch)))

    def become_follower(
        self, leader_endpoint: str | None = None, leader_epoch: int | None = None
    ) -> bool:
        """Publish ``Follower(leader_endpoint, leader_epoch)``; either may be unknown."""
        if leader_endpoint is not None:
            parse_endpoint(leader_endpoint)
        if leader_epoch is not None:
            check_epoch(leader_epoch)
        return self._publish(Follower(leader_endpoint=leader_endpoint, leader_epoch=leader_epoch))

    def become_unknown(self) -> bool:
        """Publish ``Unknown()``."""
        return self._publish(Unknown())
