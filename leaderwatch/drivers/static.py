"""A single node that leads at a fixed epoch for as long as it runs."""

from __future__ import annotations

from anyio.abc import TaskGroup

from leaderwatch.drivers._base import DriverBase
from leaderwatch.state import Leader, Unknown, check_epoch

__all__ = ["StaticDriver"]


class StaticDriver(DriverBase):
    """This node leads at ``epoch`` from enter until exit.

    Inside ``async with`` the first value is ``Leader(epoch)``; before enter
    and after exit or :meth:`resign` it is ``Unknown()``. Raises ``InvalidEpoch`` at
    construction for an epoch outside ``[0, 2**128)``.
    """

    def __init__(self, epoch: int = 1, *, node_id: str = "static") -> None:
        super().__init__(node_id)
        self._epoch = check_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The epoch this node leads at."""
        return self._epoch

    async def _start(self, task_group: TaskGroup) -> None:
        self._publish(Leader(epoch=self._epoch))

    async def _resign(self) -> None:
        self._publish(Unknown())
