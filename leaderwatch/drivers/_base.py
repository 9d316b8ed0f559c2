"""The driver contract: how an election backend reaches a :class:`LeaderWatch`.

A driver is an async context manager that owns its background tasks and
exposes :meth:`~LeadershipDriver.leadership`. :class:`DriverBase` implements
the lifecycle once so every driver keeps the same guarantees.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from leaderwatch import _registry
from leaderwatch.channel import WatchReceiver
from leaderwatch.state import Leader, LeaderState, Unknown
from leaderwatch.watch import LeaderWatch, LeaderWatchStats

__all__ = ["DriverBase", "LeadershipDriver"]


@runtime_checkable
class LeadershipDriver(Protocol):
    """What every driver provides.

    - ``async with driver as d`` starts its background tasks and yields the
      driver itself; leaving the block publishes ``Unknown()``, resigns so a
      successor need not wait for a timeout, and stops the tasks.
    - :meth:`leadership` returns a receiver whose first value is available
      at once (``Unknown()`` while nothing is known); every value went
      through a :class:`LeaderWatch`, so dedup and the epoch guard apply.
      Iterating it ends after the driver exited.
    - :meth:`resign` gives up leadership (if held) and stops campaigning,
      while the driver keeps observing and publishing who leads.
    - :attr:`proven_until` is the instant, on the event loop's clock
      (``anyio.current_time()``), until which the current ``Leader`` value
      is proven by the backend; ``math.inf`` when the backend needs no
      lease, ``-math.inf`` when this node does not lead.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...

    def leadership(self) -> WatchReceiver[LeaderState]: ...

    async def resign(self) -> None: ...

    @property
    def proven_until(self) -> float: ...


class DriverBase:
    """Lifecycle shared by the shipped drivers; subclass it to write a driver.

    Guarantees:

    - Entering opens a task group and awaits :meth:`_start`. Leaving, in this
      order and whatever the exit: stops accepting publishes from the
      driver's tasks, publishes ``Unknown()``, awaits :meth:`_resign`
      (shielded; the driver bounds it), cancels and awaits every task,
      awaits :meth:`_release` (shielded), closes the channel. Subscribers
      thus learn that this node stopped leading before their iteration
      ends, and a successor is not kept waiting for task teardown.
    - A background task that fails cancels the body of the ``async with``
      and its error is raised on exit as itself when it is the only one,
      else in an exception group. An error raised by the body itself
      propagates unchanged when no background task failed; when one did
      too, both are raised together in a :class:`BaseExceptionGroup`, the
      body's error first. A cancellation from outside propagates as itself.
    - A driver is entered at most once.
    - :meth:`resign` makes :attr:`campaigning` false for good and awaits
      :meth:`_resign`; the driver keeps observing.

    ``self_endpoint`` is this node's own endpoint, when it has one: the epoch
    guard then knows that ``Follower(self_endpoint, e)`` names this node (see
    :class:`~leaderwatch.watch.LeaderWatch`).

    Subclasses publish only through :meth:`_publish` and override
    :meth:`_start`, :meth:`_resign`, :meth:`_release` and
    :attr:`proven_until` as they need; none overrides ``__aexit__``.
    """

    def __init__(
        self, node_id: str, *, strict: bool = False, self_endpoint: str | None = None
    ) -> None:
        self._watch = LeaderWatch(node_id, strict=strict, self_endpoint=self_endpoint)
        self._lifecycle: contextlib.AbstractAsyncContextManager[None] | None = None
        self._entered = False
        self._leaving = False
        self._campaigning = True
        _registry.track("driver", self, node_id)

    @property
    def node_id(self) -> str:
        """The node this driver speaks for (used in logs)."""
        return self._watch.node_id

    @property
    def current(self) -> LeaderState:
        """The value subscribers see now."""
        return self._watch.current

    @property
    def stats(self) -> LeaderWatchStats:
        """Delivered, suppressed, regressing and conflicting publishes so far."""
        return self._watch.stats

    @property
    def campaigning(self) -> bool:
        """Whether this node still seeks leadership (false after :meth:`resign` or on exit)."""
        return self._campaigning and not self._leaving

    @property
    def proven_until(self) -> float:
        """Until when (``anyio.current_time()`` clock) the current leadership is proven.

        The base answers ``math.inf`` while the published value is ``Leader``
        (a backend without leases) and ``-math.inf`` otherwise.
        """
        return math.inf if isinstance(self._watch.current, Leader) else -math.inf

    def leadership(self) -> WatchReceiver[LeaderState]:
        """A new receiver; ``async for`` over it yields the current value first."""
        return self._watch.subscribe()

    async def resign(self) -> None:
        """Give up leadership now and never campaign again; keep observing.

        Idempotent. When it returns, this node no longer publishes ``Leader``.
        """
        self._campaigning = False
        with anyio.CancelScope(shield=True):
            await self._resign()

    def _publish(self, state: LeaderState) -> bool:
        """Offer ``state`` to subscribers; ignored while the driver is leaving.

        Raises :class:`~leaderwatch.channel.ChannelClosed` after exit.
        """
        if self._leaving and not self._watch.is_closed:
            return False
        return self._watch.publish(state)

    async def _start(self, task_group: TaskGroup) -> None:
        """Start background tasks in ``task_group``; runs once, on enter."""

    async def _resign(self) -> None:
        """Give up leadership promptly (runs shielded; must bound its own duration).

        Called by :meth:`resign` and on exit before the tasks are cancelled.
        After it returns this node must not publish ``Leader``.
        """

    async def _release(self) -> None:
        """Release resources once every task has ended (runs shielded, on exit)."""

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        body_error: BaseException | None = None
        try:
            try:
                async with anyio.create_task_group() as task_group:
                    await self._start(task_group)
                    try:
                        yield
                    except BaseException as error:
                        # Only a cancellation belongs to the task group; anything
                        # else raised by the body must propagate as itself.
                        if isinstance(error, anyio.get_cancelled_exc_class()):
                            raise
                        body_error = error
                    finally:
                        await self._leave()
                        task_group.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._release()
                self._watch.close()
        except BaseExceptionGroup as group:
            if body_error is not None:
                raise BaseExceptionGroup(
                    f"{type(self).__name__}: the body and a background task failed",
                    [body_error, *group.exceptions],
                ) from None
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise
        if body_error is not None:
            raise body_error

    async def _leave(self) -> None:
        self._campaigning = False
        with anyio.CancelScope(shield=True):
            # One scheduling step first: subscribers that have not yet looked at
            # the value the body left behind get to see it before Unknown().
            await anyio.lowlevel.checkpoint()
            if not self._watch.is_closed:
                self._watch.publish(Unknown())
            self._leaving = True
            await self._resign()

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"{type(self).__name__} can be entered only once")
        self._entered = True
        _registry.note_event_loop_clock(self)
        lifecycle = self._running()
        await lifecycle.__aenter__()
        self._lifecycle = lifecycle
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        lifecycle = self._lifecycle
        if lifecycle is None:
            return None
        self._lifecycle = None
        return await lifecycle.__aexit__(exc_type, exc, tb)
