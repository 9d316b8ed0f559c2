"""The server's leader-watch task and its serving gate (DESIGN contract 8).

:class:`LeaderWatchTask` turns a node's leadership stream into calls on a
:class:`LeadershipHandler` and into a *serving gate*: a watch channel of
:class:`Serving` / :class:`NotServing` values that request handlers read
(see :mod:`leaderwatch.redirect`). Being elected is not being ready: the gate
shows ``Serving(epoch)`` only once ``on_leader(epoch)`` has completed and the
node still leads at that epoch.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskGroup
from pydantic import BaseModel, ConfigDict, Field, model_validator

from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.channel import ChannelClosed, WatchReceiver, WatchSender
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import Endpoint, Epoch, Follower, Leader, LeaderState

__all__ = [
    "EVENT_NAMES",
    "BaseLeadershipHandler",
    "LeaderWatchTask",
    "LeaderWatchTaskStats",
    "LeadershipHandler",
    "LeadershipStreamClosed",
    "NotServing",
    "RetryBackoff",
    "Serving",
    "ServingState",
    "TransientLeadershipError",
]

_log = get_logger("leaderwatch.serving")

EVENT_NAMES: Final = (
    "serving_gate_changed",
    "leadership_fence_completed",
    "leadership_fence_superseded",
    "leadership_handler_retrying",
    "leadership_handler_retry_stuck",
    "leadership_handler_failed",
    "leadership_stream_closed",
    "leadership_task_cancelled",
)
"""Every log event this module emits (stable names)."""


class Serving(FrozenValue):
    """This node leads at ``epoch`` and its ``on_leader(epoch)`` has completed: serve."""

    __match_args__ = ("epoch",)
    kind: Literal["serving"] = Field(default="serving", repr=False)
    epoch: Epoch


class NotServing(FrozenValue):
    """This node must not serve; the leader's endpoint and epoch, each when known."""

    __match_args__ = ("leader_endpoint", "leader_epoch")
    kind: Literal["not_serving"] = Field(default="not_serving", repr=False)
    leader_endpoint: Endpoint | None = None
    leader_epoch: Epoch | None = None


ServingState = Annotated[Serving | NotServing, Field(discriminator="kind")]
"""One of :class:`Serving`, :class:`NotServing`."""


class TransientLeadershipError(LeaderwatchError):
    """Raised by a handler for a failure worth retrying (the task retries with backoff)."""


class LeadershipStreamClosed(LeaderwatchError):
    """The leadership channel closed (its driver is gone); the gate was closed first."""


@runtime_checkable
class LeadershipHandler(Protocol):
    """What a service does on each leadership transition.

    ``on_leader`` is where a service fences (loads and persists its
    high-water mark, warms caches); it may take seconds and is cancelled when
    a newer transition arrives. Raising :class:`TransientLeadershipError`
    asks for a retry; any other exception stops the task.
    """

    async def on_leader(self, epoch: int) -> None:
        """This node became leader at ``epoch``; the gate opens when this returns."""

    async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
        """This node follows the leader at ``leader_endpoint`` / ``leader_epoch``."""

    async def on_unknown(self) -> None:
        """No leader is known."""


class BaseLeadershipHandler:
    """A :class:`LeadershipHandler` that does nothing; subclass and override what you need."""

    async def on_leader(self, epoch: int) -> None:
        """Do nothing."""

    async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
        """Do nothing."""

    async def on_unknown(self) -> None:
        """Do nothing."""


class RetryBackoff(FrozenValue):
    """How :class:`LeaderWatchTask` retries a handler raising :class:`TransientLeadershipError`.

    Delays start at ``initial`` seconds and grow by ``multiplier`` up to
    ``maximum``. While a handler keeps failing, a
    ``leadership_handler_retry_stuck`` warning is logged every
    ``stuck_warning_interval`` seconds.
    """

    initial: float = Field(default=0.025, gt=0, allow_inf_nan=False)
    maximum: float = Field(default=0.25, gt=0, allow_inf_nan=False)
    multiplier: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    stuck_warning_interval: float = Field(default=10.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _maximum_not_below_initial(self) -> RetryBackoff:
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum}) must be at least initial ({self.initial})")
        return self


class LeaderWatchTaskStats(BaseModel):
    """What a :class:`LeaderWatchTask` did, as a snapshot."""

    model_config = ConfigDict(frozen=True)

    transitions_handled: int
    """Leadership values handed to the handler (superseded ones included)."""
    fences_completed: int
    """``on_leader`` calls that ended with ``Serving`` published."""
    fences_superseded: int
    """``on_leader`` calls cancelled, or finished too late, because leadership moved on."""
    retries: int
    """Handler calls retried after :class:`TransientLeadershipError`."""
    failures: int
    """Handler calls that raised another exception (each one stopped the task)."""
    last_fence_latency: float | None
    """Seconds from ``Leader`` observed to ``Serving`` published, last fence."""
    max_fence_latency: float | None
    """The largest fence latency seen."""


_NOT_SERVING: Final = NotServing()


def _closed_gate(state: LeaderState) -> NotServing:
    match state:
        case Leader(epoch=epoch):
            return NotServing(leader_epoch=epoch)
        case Follower(leader_endpoint=endpoint, leader_epoch=epoch):
            return NotServing(leader_endpoint=endpoint, leader_epoch=epoch)
        case _:
            return NotServing()


def _as_log(value: BaseModel) -> dict[str, Any]:
    return value.model_dump(mode="json")


class LeaderWatchTask:
    """Runs a :class:`LeadershipHandler` against a leadership stream and owns the serving gate.

    Guarantees, once :meth:`run` is awaited:

    - The gate starts ``NotServing()``; every gate value is stored, even with
      no receiver open.
    - ``Leader(e)``: the gate is closed (``NotServing(leader_epoch=e)``)
      before ``on_leader(e)`` starts; ``Serving(e)`` is published when it
      returns only if the leadership is still ``Leader(e)`` and no newer
      value arrived meanwhile. A newer value cancels an in-flight handler
      call and is handled next (intermediate values may be skipped, the
      newest never is). Handler calls never overlap.
    - ``Follower(ep, e)``: gate ``NotServing(ep, e)``, then ``on_follower``.
      ``Unknown()``: gate ``NotServing()``, then ``on_unknown``.
    - :class:`TransientLeadershipError` is retried with capped exponential
      backoff until it succeeds or a newer value arrives.
    - Any other handler exception, the leadership channel closing
      (:class:`LeadershipStreamClosed`) and cancellation all set the gate to
      ``NotServing()`` before they propagate out of :meth:`run`; no task is
      left running. The gate stays ``NotServing()`` afterwards.
    """

    __slots__ = (
        "_backoff",
        "_clock",
        "_closed_view",
        "_failures",
        "_fences_completed",
        "_fences_superseded",
        "_gate",
        "_handler",
        "_last_fence_latency",
        "_leadership",
        "_max_fence_latency",
        "_retries",
        "_running",
        "_stream_closed",
        "_transitions",
    )

    def __init__(
        self,
        leadership: WatchReceiver[LeaderState],
        handler: LeadershipHandler,
        *,
        retry_backoff: RetryBackoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(leadership, WatchReceiver):
            raise TypeError(
                f"leadership must be a WatchReceiver (got {type(leadership).__name__}); "
                "use LeaderWatch.subscribe() or a driver's leadership()"
            )
        if not isinstance(handler, LeadershipHandler) or not all(
            inspect.iscoroutinefunction(getattr(handler, name))
            for name in ("on_leader", "on_follower", "on_unknown")
        ):
            raise TypeError(
                "handler must implement async on_leader, on_follower and on_unknown "
                f"(got {type(handler).__name__}); subclass BaseLeadershipHandler"
            )
        # The task owns its receiver: a caller still using the one it passed
        # in must not be able to mark a transition seen before the task does.
        self._leadership = leadership.clone()
        self._handler = handler
        self._backoff = RetryBackoff() if retry_backoff is None else retry_backoff
        self._clock = clock
        self._gate: WatchSender[Serving | NotServing] = WatchSender(NotServing())
        # current_gate's closed value for the leadership value it was built from (by identity).
        self._closed_view: tuple[object, NotServing] = (None, _NOT_SERVING)
        self._running = False
        self._stream_closed = False
        self._transitions = 0
        self._fences_completed = 0
        self._fences_superseded = 0
        self._retries = 0
        self._failures = 0
        self._last_fence_latency: float | None = None
        self._max_fence_latency: float | None = None

    @property
    def serving(self) -> WatchReceiver[Serving | NotServing]:
        """A new receiver of the serving gate; its first value is the current one."""
        return self._gate.subscribe()

    @property
    def current_gate(self) -> Serving | NotServing:
        """The gate as a request handler must read it now; allocates nothing.

        It is the stored gate value, except that ``Serving(e)`` is shown only
        while the leadership stream still says ``Leader(e)``: between a new
        leadership value and the task's next step, the gate is already
        closed here. Request handlers pass this to
        :func:`~leaderwatch.redirect.decide`.
        """
        gate = self._gate.borrow()
        if isinstance(gate, Serving):
            if not self._stream_open():
                return _NOT_SERVING
            leadership = self._leadership.borrow()
            # Same test as ``leadership != Leader(epoch=gate.epoch)``, without building a value.
            if type(leadership) is not Leader or leadership.epoch != gate.epoch:
                closed = self._closed_view
                if closed[0] is not leadership:
                    closed = self._closed_view = (leadership, _closed_gate(leadership))
                return closed[1]
        return gate

    def _stream_open(self) -> bool:
        try:
            self._leadership.has_changed()
        except ChannelClosed:
            return False
        return True

    @property
    def stats(self) -> LeaderWatchTaskStats:
        """Counts and fence latencies so far."""
        return LeaderWatchTaskStats(
            transitions_handled=self._transitions,
            fences_completed=self._fences_completed,
            fences_superseded=self._fences_superseded,
            retries=self._retries,
            failures=self._failures,
            last_fence_latency=self._last_fence_latency,
            max_fence_latency=self._max_fence_latency,
        )

    def _set_gate(self, value: Serving | NotServing) -> None:
        previous = self._gate.borrow()
        if self._gate.send_if_changed(value):
            _log.info("serving_gate_changed", **{"from": _as_log(previous), "to": _as_log(value)})

    async def run(self) -> None:
        """Handle leadership values until cancelled; see the class guarantees.

        Raises :class:`LeadershipStreamClosed` when the leadership channel
        closes, re-raises a handler's non-transient exception, and
        ``RuntimeError`` if this task is already running.
        """
        if self._running:
            raise RuntimeError("LeaderWatchTask.run() is already running; run it once at a time")
        self._running = True
        self._stream_closed = False
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                try:
                    await self._follow(tg)
                except Exception as exc:
                    self._set_gate(NotServing())
                    failure = exc
                    tg.cancel_scope.cancel()
                except BaseException:
                    self._set_gate(NotServing())
                    _log.info("leadership_task_cancelled")
                    raise
        finally:
            self._set_gate(NotServing())
            self._running = False
        if failure is not None:
            raise failure

    async def _follow(self, tg: TaskGroup) -> None:
        leadership = self._leadership
        while True:
            if not self._stream_open():
                # Never act on what a driver that is gone said last.
                self._stream_closed = True
            else:
                state = leadership.borrow_and_update()
                with anyio.CancelScope() as scope:
                    tg.start_soon(self._cancel_on_change, state, scope)
                    await self._handle(state, scope)
                    await anyio.sleep_forever()
            if self._stream_closed:
                _log.warning("leadership_stream_closed")
                raise LeadershipStreamClosed(
                    "the leadership channel closed (its driver is gone); the gate is closed"
                )

    async def _cancel_on_change(self, handled: LeaderState, scope: anyio.CancelScope) -> None:
        leadership = self._leadership
        while True:
            try:
                await leadership.changed()
            except ChannelClosed:
                self._stream_closed = True
                self._set_gate(NotServing())
                scope.cancel()
                return
            newest = leadership.borrow()
            if newest != handled:
                self._set_gate(_closed_gate(newest))
                scope.cancel()
                return

    async def _handle(self, state: LeaderState, scope: anyio.CancelScope) -> None:
        self._transitions += 1
        handler = self._handler
        match state:
            case Leader(epoch=epoch):
                observed = self._clock()
                self._set_gate(_closed_gate(state))
                try:
                    await self._call("on_leader", lambda: handler.on_leader(epoch))
                except anyio.get_cancelled_exc_class():
                    if scope.cancel_called:
                        self._fence_superseded(epoch)
                    raise
                if (
                    scope.cancel_called
                    or self._leadership.borrow() != state
                    or not self._stream_open()
                ):
                    self._fence_superseded(epoch)
                    return
                self._set_gate(Serving(epoch=epoch))
                latency = max(0.0, self._clock() - observed)
                self._fences_completed += 1
                self._last_fence_latency = latency
                if self._max_fence_latency is None or latency > self._max_fence_latency:
                    self._max_fence_latency = latency
                _log.info("leadership_fence_completed", epoch=epoch, latency_s=latency)
            case Follower(leader_endpoint=endpoint, leader_epoch=leader_epoch):
                self._set_gate(_closed_gate(state))
                await self._call("on_follower", lambda: handler.on_follower(endpoint, leader_epoch))
            case _:
                self._set_gate(NotServing())
                await self._call("on_unknown", handler.on_unknown)

    def _fence_superseded(self, epoch: int) -> None:
        self._fences_superseded += 1
        _log.info("leadership_fence_superseded", epoch=epoch)

    async def _call(self, name: str, call: Callable[[], Awaitable[None]]) -> None:
        backoff = self._backoff
        delay = backoff.initial
        attempts = 0
        first_failure = 0.0
        next_warning = backoff.stuck_warning_interval
        while True:
            try:
                try:
                    await call()
                    return
                except ExceptionGroup as group:
                    # A handler with its own task group: transient only if every error is.
                    transient, other = group.split(TransientLeadershipError)
                    if transient is None or other is not None:
                        raise
                    raise TransientLeadershipError(str(group)) from group
            except TransientLeadershipError as exc:
                attempts += 1
                self._retries += 1
                now = self._clock()
                if attempts == 1:
                    first_failure = now
                elapsed = now - first_failure
                _log.info(
                    "leadership_handler_retrying",
                    handler=name,
                    attempt=attempts,
                    delay_s=delay,
                    error=repr(exc),
                )
                if elapsed >= next_warning:
                    next_warning = (
                        math.floor(elapsed / backoff.stuck_warning_interval) + 1
                    ) * backoff.stuck_warning_interval
                    _log.warning(
                        "leadership_handler_retry_stuck",
                        handler=name,
                        attempts=attempts,
                        elapsed_s=elapsed,
                        error=repr(exc),
                    )
            except Exception as exc:
                self._failures += 1
                self._set_gate(NotServing())
                _log.error("leadership_handler_failed", handler=name, error=repr(exc))
                raise
            await anyio.sleep(delay)
            delay = min(delay * backoff.multiplier, backoff.maximum)
