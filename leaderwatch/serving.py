"""The server's leader-watch task and its serving gate (DESIGN contract 8).

:class:`LeaderWatchTask` turns a node's leadership stream into calls on a
:class:`LeadershipHandler` and into a *serving gate*: a watch channel of
:class:`Serving` / :class:`NotServing` values that request handlers read
(see :mod:`leaderwatch.redirect`). Being elected is not being ready: the gate
shows ``Serving(epoch)`` only once ``on_leader(epoch)`` has completed and the
node still leads at that epoch.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal, NoReturn, Protocol, runtime_checkable

import anyio
import anyio.lowlevel
from pydantic import BaseModel, ConfigDict, Field, model_validator

from leaderwatch import _registry
from leaderwatch._backoff import Backoff
from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.channel import ChannelClosed, WatchReceiver, WatchSender
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import Endpoint, Epoch, Follower, Leader, LeaderState

__all__ = [
    "EVENT_NAMES",
    "FENCE_LATENCY_BUCKETS",
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

FENCE_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds, in seconds, of the fence latency histogram in :class:`LeaderWatchTaskStats`."""


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

    def backoff(self) -> Backoff:
        """A fresh series of these delays, starting at ``initial``."""
        return Backoff(self.initial, self.maximum, self.multiplier)


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
    fence_latency_sum: float = 0.0
    """Seconds of all completed fences added up (over ``fences_completed``: the mean)."""
    fence_latency_buckets: tuple[int, ...] = ()
    """Completed fences at most as slow as each bound of :data:`FENCE_LATENCY_BUCKETS`.

    Cumulative, one count per bound (a Prometheus histogram's buckets; the
    ``+Inf`` bucket is ``fences_completed``).
    """


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


async def _call_once(call: Callable[[], Awaitable[None]]) -> None:
    """Await ``call``; an exception group holding only transient errors is raised as one."""
    try:
        await call()
    except ExceptionGroup as group:
        # A handler with its own task group: transient only if every error is.
        transient, other = group.split(TransientLeadershipError)
        if transient is None or other is not None:
            raise
        raise TransientLeadershipError(str(group)) from group


class _RetryTracker:
    """Delays, logs and counts for the handler calls of one task, one call at a time.

    :meth:`start` begins a call; each :meth:`transient_failure` logs
    ``leadership_handler_retrying`` (and ``leadership_handler_retry_stuck``
    every ``stuck_warning_interval`` while the call keeps failing) and
    returns the delay before the next attempt; :meth:`failure` logs
    ``leadership_handler_failed``. :attr:`retries` and :attr:`failures`
    count across calls.
    """

    __slots__ = (
        "_attempts",
        "_backoff",
        "_clock",
        "_first_failure",
        "_handler",
        "_next_warning",
        "_settings",
        "failures",
        "retries",
    )

    def __init__(self, settings: RetryBackoff, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._backoff = settings.backoff()
        self._first_failure = 0.0
        self.retries = 0
        self.failures = 0
        self.start("")

    def start(self, handler: str) -> None:
        """A call of ``handler`` begins: its delays start again at ``initial``."""
        self._handler = handler
        self._attempts = 0
        self._next_warning = self._settings.stuck_warning_interval
        self._backoff.reset()

    def transient_failure(self, error: TransientLeadershipError) -> float:
        """Count and log one transient failure; return the seconds to wait before retrying."""
        self._attempts += 1
        self.retries += 1
        now = self._clock()
        if self._attempts == 1:
            self._first_failure = now
        elapsed = now - self._first_failure
        delay = self._backoff.next_delay()
        _log.info(
            "leadership_handler_retrying",
            handler=self._handler,
            attempt=self._attempts,
            delay_s=delay,
            error=repr(error),
        )
        if elapsed >= self._next_warning:
            interval = self._settings.stuck_warning_interval
            self._next_warning = (math.floor(elapsed / interval) + 1) * interval
            _log.warning(
                "leadership_handler_retry_stuck",
                handler=self._handler,
                attempts=self._attempts,
                elapsed_s=elapsed,
                error=repr(error),
            )
        return delay

    def failure(self, error: Exception) -> None:
        """Count and log a failure that is not retried."""
        self.failures += 1
        _log.error("leadership_handler_failed", handler=self._handler, error=repr(error))


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

    ``node_id``, when given, names the node this task serves for in metrics
    (:mod:`leaderwatch.prometheus`).
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_closed_view",
        "_fence_buckets",
        "_fence_latency_sum",
        "_fences_completed",
        "_fences_superseded",
        "_gate",
        "_handler",
        "_last_fence_latency",
        "_leadership",
        "_max_fence_latency",
        "_node_id",
        "_retry",
        "_running",
        "_transitions",
    )

    def __init__(
        self,
        leadership: WatchReceiver[LeaderState],
        handler: LeadershipHandler,
        *,
        retry_backoff: RetryBackoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        node_id: str | None = None,
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
        self._retry = _RetryTracker(
            RetryBackoff() if retry_backoff is None else retry_backoff, clock
        )
        self._clock = clock
        self._gate: WatchSender[Serving | NotServing] = WatchSender(NotServing())
        # current_gate's closed value for the leadership value it was built from (by identity).
        self._closed_view: tuple[object, NotServing] = (None, _NOT_SERVING)
        self._running = False
        self._transitions = 0
        self._fences_completed = 0
        self._fences_superseded = 0
        self._last_fence_latency: float | None = None
        self._max_fence_latency: float | None = None
        self._fence_latency_sum = 0.0
        self._fence_buckets = [0] * len(FENCE_LATENCY_BUCKETS)
        self._node_id = node_id
        _registry.track("task", self, "task" if node_id is None else node_id)

    @property
    def node_id(self) -> str | None:
        """The node this task serves for, if it was given (it names the task in metrics)."""
        return self._node_id

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
            if self._leadership.is_closed:
                return _NOT_SERVING
            leadership = self._leadership.borrow()
            # Same test as ``leadership != Leader(epoch=gate.epoch)``, without building a value.
            if type(leadership) is not Leader or leadership.epoch != gate.epoch:
                closed = self._closed_view
                if closed[0] is not leadership:
                    closed = self._closed_view = (leadership, _closed_gate(leadership))
                return closed[1]
        return gate

    @property
    def stats(self) -> LeaderWatchTaskStats:
        """Counts and fence latencies so far."""
        return LeaderWatchTaskStats(
            transitions_handled=self._transitions,
            fences_completed=self._fences_completed,
            fences_superseded=self._fences_superseded,
            retries=self._retry.retries,
            failures=self._retry.failures,
            last_fence_latency=self._last_fence_latency,
            max_fence_latency=self._max_fence_latency,
            fence_latency_sum=self._fence_latency_sum,
            fence_latency_buckets=tuple(itertools.accumulate(self._fence_buckets)),
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
        try:
            await self._follow()
        except BaseException as stop:
            self._set_gate(NotServing())
            if not isinstance(stop, Exception):
                _log.info("leadership_task_cancelled")
            raise
        finally:
            self._running = False

    async def _follow(self) -> NoReturn:
        """Handle the newest leadership value, each until the next one, until the stream closes."""
        leadership = self._leadership
        # Never act on what a driver that is gone said last.
        while not leadership.is_closed:
            state = leadership.borrow_and_update()
            self._transitions += 1
            self._set_gate(_closed_gate(state))
            await self._until_changed(state, functools.partial(self._handle, state))
        _log.warning("leadership_stream_closed")
        raise LeadershipStreamClosed(
            "the leadership channel closed (its driver is gone); the gate is closed"
        )

    async def _until_changed(
        self, handled: LeaderState, call: Callable[[anyio.CancelScope], Awaitable[None]]
    ) -> None:
        """Run ``call(scope)`` and return once the leadership differs from ``handled``.

        At that moment (or when the stream closes) the gate is closed for the
        newer value (``NotServing()`` on close) and ``scope``, the cancel
        scope ``call`` runs in, is cancelled: ``call`` ends if it still runs,
        and ``scope.cancel_called`` tells it that ``handled`` was superseded.
        An exception raised by ``call`` propagates at once, as itself.
        """
        failure: Exception | None = None
        async with anyio.create_task_group() as watcher:
            with anyio.CancelScope() as scope:
                watcher.start_soon(self._close_gate_on_change, handled, scope)
                try:
                    await call(scope)
                except Exception as error:
                    failure = error
                    watcher.cancel_scope.cancel()
        if failure is not None:
            raise failure
        # The change may have come together with a cancellation: it wins over the next value.
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def _close_gate_on_change(self, handled: LeaderState, scope: anyio.CancelScope) -> None:
        try:
            newest = await self._leadership.wait_for(lambda value: value != handled)
        except ChannelClosed:
            self._set_gate(NotServing())
        else:
            self._set_gate(_closed_gate(newest))
        scope.cancel()

    async def _handle(self, state: LeaderState, scope: anyio.CancelScope) -> None:
        handler = self._handler
        match state:
            case Leader():
                await self._fence(state, scope)
            case Follower(leader_endpoint=endpoint, leader_epoch=leader_epoch):
                await self._call("on_follower", lambda: handler.on_follower(endpoint, leader_epoch))
            case _:
                await self._call("on_unknown", handler.on_unknown)

    async def _fence(self, state: Leader, scope: anyio.CancelScope) -> None:
        """Await ``on_leader``; open the gate only if ``state`` is still current when it returns."""
        epoch = state.epoch
        observed = self._clock()
        try:
            await self._call("on_leader", lambda: self._handler.on_leader(epoch))
        except anyio.get_cancelled_exc_class():
            if scope.cancel_called:
                self._fence_superseded(epoch)
            raise
        leadership = self._leadership
        if scope.cancel_called or leadership.is_closed or leadership.borrow() != state:
            self._fence_superseded(epoch)
            return
        self._set_gate(Serving(epoch=epoch))
        latency = max(0.0, self._clock() - observed)
        self._fences_completed += 1
        self._last_fence_latency = latency
        if self._max_fence_latency is None or latency > self._max_fence_latency:
            self._max_fence_latency = latency
        self._fence_latency_sum += latency
        bucket = bisect.bisect_left(FENCE_LATENCY_BUCKETS, latency)
        if bucket < len(self._fence_buckets):
            self._fence_buckets[bucket] += 1
        _log.info("leadership_fence_completed", epoch=epoch, latency_s=latency)

    def _fence_superseded(self, epoch: int) -> None:
        self._fences_superseded += 1
        _log.info("leadership_fence_superseded", epoch=epoch)

    async def _call(self, name: str, call: Callable[[], Awaitable[None]]) -> None:
        """Await ``call`` until it succeeds, retrying transient errors after a backoff delay.

        Any other exception closes the gate, is logged and propagates.
        """
        retry = self._retry
        retry.start(name)
        while True:
            try:
                await _call_once(call)
                return
            except TransientLeadershipError as error:
                delay = retry.transient_failure(error)
            except Exception as error:
                self._set_gate(NotServing())
                retry.failure(error)
                raise
            await anyio.sleep(delay)
