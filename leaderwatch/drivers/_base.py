"""The driver contract: how an election backend reaches a :class:`LeaderWatch`.

A driver is an async context manager that owns its background tasks and
exposes :meth:`~LeadershipDriver.leadership`. :class:`DriverBase` implements
the lifecycle once so every driver keeps the same guarantees.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import anyio
from anyio.abc import TaskGroup

from leaderwatch.channel import WatchReceiver
from leaderwatch.state import Follower, Leader, Unknown
from leaderwatch.watch import LeaderWatch, LeaderWatchStats

__all__ = ["DriverBase", "LeadershipDriver", "LeadershipState"]

LeadershipState = Leader | Follower | Unknown
"""What a driver publishes: one of the three leadership values."""


@runtime_checkable
class LeadershipDriver(Protocol):
    """What every driver provides.

    - ``async with driver as d`` starts its background tasks and yields the
      driver itself; leaving the block cancels and awaits them, and a node
      that campaigns resigns so a successor need not wait for a timeout.
    - :meth:`leadership` returns a receiver whose first value is available
      at once (``Unknown()`` while nothing is known); every value went
      through a :class:`LeaderWatch`, so dedup and the epoch guard apply.
      Iterating it ends after the driver exited.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...

    def leadership(self) -> WatchReceiver[LeadershipState]: ...


class DriverBase:
    """Lifecycle shared by the shipped drivers; subclass it to write a driver.

    Guarantees:

    - Entering opens a task group and awaits :meth:`_start`; leaving cancels
      that task group, awaits every task in it, then publishes ``Unknown()``
      and closes the channel, so subscribers learn that this node stopped
      leading before their iteration ends.
    - A background task that fails cancels the body of the ``async with``
      and its error is raised on exit (as itself when it is the only one,
      else in an exception group). An error raised by the body itself
      propagates unchanged when no background task failed; when one did
      too, both are raised together in a :class:`BaseExceptionGroup`, the
      body's error first. A cancellation from outside propagates as itself.
    - A driver is entered at most once.

    Subclasses publish only through :meth:`_publish`.
    """

    def __init__(self, node_id: str, *, strict: bool = False) -> None:
        self._watch = LeaderWatch(node_id, strict=strict)
        self._task_group: TaskGroup | None = None
        self._entered = False

    @property
    def node_id(self) -> str:
        """The node this driver speaks for (used in logs)."""
        return self._watch.node_id

    @property
    def current(self) -> LeadershipState:
        """The value subscribers see now."""
        return self._watch.current

    @property
    def stats(self) -> LeaderWatchStats:
        """Delivered, suppressed and regressing publishes so far."""
        return self._watch.stats

    def leadership(self) -> WatchReceiver[LeadershipState]:
        """A new receiver; ``async for`` over it yields the current value first."""
        return self._watch.subscribe()

    def _publish(self, state: LeadershipState) -> bool:
        return self._watch.publish(state)

    async def _start(self, task_group: TaskGroup) -> None:
        """Start background tasks in ``task_group``; runs once, on enter."""

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"{type(self).__name__} can be entered only once")
        self._entered = True
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await self._start(task_group)
        except BaseException as error:
            await self.__aexit__(type(error), error, error.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group = self._task_group
        if task_group is None:
            return None
        self._task_group = None
        task_group.cancel_scope.cancel()
        # Only a cancellation belongs to the task group; anything else raised
        # by the body must propagate as itself, not inside an exception group.
        forward = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
        try:
            if forward:
                return await task_group.__aexit__(exc_type, exc, tb)
            await task_group.__aexit__(None, None, None)
            return None
        except BaseExceptionGroup as group:
            if exc is not None and not forward:
                raise BaseExceptionGroup(
                    f"{type(self).__name__}: the body and a background task failed",
                    [exc, *group.exceptions],
                ) from None
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise
        finally:
            self._watch.publish(Unknown())
            self._watch.close()
