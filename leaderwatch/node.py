"""One object a replicated server holds: :class:`LeaderNode` (DESIGN contracts 8, 9 and 11).

A :class:`LeaderNode` enters a driver, runs a :class:`~leaderwatch.serving.LeaderWatchTask`
over its leadership, and answers, for every request, whether this node may do
leader-only work *now*: the serving gate **and** the driver's lease proof.
It admits work (:meth:`LeaderNode.admit`), runs leader-only background jobs
(:meth:`LeaderNode.run_as_leader`) and hands leadership over in the safe order
(:meth:`LeaderNode.step_down`). Adapters (:mod:`leaderwatch.asgi`,
:mod:`leaderwatch.uvicorn`) are thin layers over it.

Everything runs on the event loop that entered the node; it is not thread-safe.
On asyncio, admitted work is cancelled through its asyncio task directly (see
``_Ticket``): the per-request cost of an anyio cancel scope is the whole
admission budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Literal, Self

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from pydantic import BaseModel, ConfigDict

from leaderwatch import _registry
from leaderwatch._backoff import Backoff
from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.channel import ChannelClosed, WatchReceiver, WatchSender
from leaderwatch.drivers._base import LeadershipDriver
from leaderwatch.errors import LeaderwatchError
from leaderwatch.hint import NoLeaderYet
from leaderwatch.redirect import Redirect, Serve, decide
from leaderwatch.serving import (
    BaseLeadershipHandler,
    LeadershipHandler,
    LeaderWatchTask,
    NotServing,
    RetryBackoff,
    Serving,
)
from leaderwatch.state import (
    Endpoint,
    Epoch,
    Follower,
    Leader,
    LeaderState,
    parse_endpoint,
    same_endpoint,
)

__all__ = [
    "ADMISSION_REFUSAL_REASONS",
    "EVENT_NAMES",
    "InvalidNodeConfig",
    "LeaderNode",
    "LeaderNodeStats",
    "NodeStatus",
    "NotLeader",
]

_log = get_logger("leaderwatch.node")

EVENT_NAMES: Final = (
    "leader_node_started",
    "leader_node_step_down_started",
    "leader_node_drain_timeout",
    "leader_node_work_cancelled",
    "leader_node_still_waiting",
    "leader_node_stepped_down",
    "leader_node_failed",
    "leader_node_terminating_process",
    "leader_node_stopped",
    "leader_job_started",
    "leader_job_finished",
    "leader_job_failed",
    "leader_job_cancelled",
)
"""Every log event this module emits (stable names)."""

ADMISSION_REFUSAL_REASONS: Final = (
    "leader_elsewhere",
    "no_leader",
    "fencing",
    "lease_expired",
    "stepping_down",
)
"""Why a :class:`LeaderNode` refused an admission (keys of :attr:`LeaderNodeStats.refused`).

``leader_elsewhere``: another node leads (a :class:`~leaderwatch.redirect.Redirect`,
HTTP 307). The others are :class:`~leaderwatch.hint.NoLeaderYet` (HTTP 503):
``no_leader`` (no leader known, or none this node can name), ``fencing`` (this
node leads but its ``on_leader`` has not completed), ``lease_expired`` (the
gate is open but the driver's lease proof ran out), ``stepping_down`` (the
node is handing over, failed or stopped).
"""

_INF: Final = math.inf
_NOT_SERVING: Final = NotServing()
_LEASE_RECHECK: Final = 0.05
"""Seconds between checks while the gate says Serving but the lease proof has run out."""
_DEFAULT_JOB_BACKOFF: Final = RetryBackoff(initial=0.1, maximum=5.0)
_CANCEL_MESSAGE: Final = "leaderwatch: admitted work cancelled (leadership lost or drain timeout)"

_IDLE: Final = "idle"
_RUNNING: Final = "running"
_STOPPED: Final = "stopped"

Job = Callable[[int], Awaitable[object]]
"""A leader-only job: called with the epoch this node serves at."""


class NotLeader(LeaderwatchError):
    """This node may not do leader-only work now; :attr:`decision` says what to tell the client.

    ``decision`` is a :class:`~leaderwatch.redirect.Redirect` (another node
    leads: send the client there) or a :class:`~leaderwatch.hint.NoLeaderYet`
    (no leader can serve yet: the client retries with backoff).
    """

    def __init__(self, decision: Redirect | NoLeaderYet, reason: str | None = None) -> None:
        self.decision = decision
        super().__init__(reason or _refusal_text(decision))


def _refusal_text(decision: Redirect | NoLeaderYet) -> str:
    if isinstance(decision, Redirect):
        hint = decision.hint
        epoch = "" if hint.leader_epoch is None else f" at epoch {hint.leader_epoch}"
        return (
            f"this node is not the leader; the leader is {hint.leader_endpoint}{epoch}: "
            "send the request there"
        )
    known = decision.leader_epoch
    epoch = "" if known is None else f" (newest epoch known: {known})"
    return f"no leader can serve yet{epoch}; retry shortly with backoff"


class InvalidNodeConfig(LeaderwatchError, ValueError):
    """A :class:`LeaderNode` argument breaks a rule; the message names it."""


class LeaderNodeStats(BaseModel):
    """What a :class:`LeaderNode` did, as a snapshot."""

    model_config = ConfigDict(frozen=True)

    admitted: dict[int, int]
    """Units of leader-only work admitted, per epoch."""
    in_flight: int
    """Admitted work not finished yet."""
    redirected: int
    """Admissions refused with a :class:`~leaderwatch.redirect.Redirect`."""
    unavailable: int
    """Admissions refused with :class:`~leaderwatch.hint.NoLeaderYet`."""
    lease_expired: int
    """Admissions refused although the gate said ``Serving``: the lease proof had run out."""
    cancelled: int
    """Admitted work cancelled: drain timeout, leadership lost, or node failure."""
    last_drain_s: float | None
    """Seconds the last step-down spent waiting for admitted work."""
    job_starts: int
    """Leader-only job runs started (restarts included)."""
    job_failures: int
    """Leader-only job runs that raised."""
    refused: dict[str, int] = {}
    """Admissions refused, by reason (see :data:`ADMISSION_REFUSAL_REASONS`)."""


class NodeStatus(FrozenValue):
    """What a node says about itself to probes and load balancers.

    ``state`` is its leadership kind; ``gate`` whether it serves right now
    (fenced, lease proven, not stepping down); ``epoch`` the newest epoch it
    knows; ``leader_endpoint`` the leader it knows of (itself when it leads).
    """

    state: Literal["leader", "follower", "unknown"]
    gate: Literal["serving", "not_serving"]
    epoch: Epoch | None
    leader_endpoint: Endpoint | None
    node_endpoint: Endpoint | None


class _Ticket:
    """One unit of admitted work: its epoch, and how the node cancels it.

    On asyncio the work's own task is cancelled natively, with the same
    ``cancelling()`` bookkeeping anyio and ``asyncio.timeout`` use: a cancel
    scope per request would cost more than all the rest of the admission. On
    other backends the work runs in an anyio cancel scope.
    """

    __slots__ = ("baseline", "cancel_requested", "epoch", "scope", "task")

    def __init__(
        self,
        epoch: int,
        task: asyncio.Task[Any] | None,
        baseline: int,
        scope: anyio.CancelScope | None,
    ) -> None:
        self.epoch = epoch
        self.task = task
        self.baseline = baseline
        self.scope = scope
        self.cancel_requested = False

    def cancel(self) -> bool:
        """Ask the work to stop; whether this call asked (first time only)."""
        if self.cancel_requested:
            return False
        self.cancel_requested = True
        if self.scope is not None:
            self.scope.cancel()
        elif self.task is not None:
            self.task.cancel(_CANCEL_MESSAGE)
        return True

    async def finish(self, error: BaseException | None) -> bool:
        """Close the ticket once the work ended, with ``error`` if it raised.

        True when the node's cancellation ended the work: the caller then
        swallows ``error``. Otherwise the caller re-raises ``error``.
        """
        scope = self.scope
        if scope is not None:
            if error is None:
                scope.__exit__(None, None, None)
                return False
            return bool(scope.__exit__(type(error), error, error.__traceback__))
        task = self.task
        if not self.cancel_requested or task is None:
            return False
        remaining = task.uncancel()
        if isinstance(error, asyncio.CancelledError):
            if remaining > self.baseline:
                return False  # another cancellation is pending too: let it propagate
            if anyio.current_effective_deadline() == -_INF:
                # An enclosing anyio scope was cancelled meanwhile and has not delivered
                # yet: let it, so the cancellation is its own, not turned into NotLeader.
                await anyio.lowlevel.checkpoint()
            return True
        if remaining <= self.baseline:
            # The work ended before our cancellation reached it: take the cancellation
            # here, or it would hit whatever the task awaits next.
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                if task.cancelling() > self.baseline:
                    raise
        return False


class _Admit:
    """The context manager :meth:`LeaderNode.admit` returns."""

    __slots__ = ("_node", "_ticket")

    def __init__(self, node: LeaderNode) -> None:
        self._node = node
        self._ticket: _Ticket | None = None

    async def __aenter__(self) -> int:
        node = self._node
        ticket = node._admission()
        if ticket is None:
            raise NotLeader(node._refusal())
        self._ticket = ticket
        return ticket.epoch

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        ticket = self._ticket
        if ticket is None:
            return False
        self._ticket = None
        node = self._node
        try:
            cancelled = await ticket.finish(exc)
        finally:
            node._release(ticket)
        if cancelled:
            raise NotLeader(
                node._refusal(count=False),
                f"leader-only work admitted at epoch {ticket.epoch} was cancelled: this node "
                "stopped leading at that epoch, or stepped down and the drain timeout "
                f"({node.drain_timeout} s) passed; it may have been partly done",
            ) from None
        return False


class LeaderNode:
    """A server's leadership, serving gate, lease proof, admission and hand-over in one object.

    ``async with node:`` enters ``driver`` and runs a
    :class:`~leaderwatch.serving.LeaderWatchTask` with ``handler`` (the fence;
    :class:`~leaderwatch.serving.BaseLeadershipHandler` when ``None``).

    Guarantees:

    - :attr:`gate` is :attr:`LeaderWatchTask.current_gate
      <leaderwatch.serving.LeaderWatchTask.current_gate>`, except that a
      ``Serving(e)`` is shown as ``NotServing(leader_epoch=e)`` once the
      driver's lease proof (:attr:`~leaderwatch.drivers.LeadershipDriver.proven_until`)
      has run out, and from the moment the node steps down, fails or stops.
      A process frozen past its lease therefore admits nothing when it
      resumes, even before any of its tasks has run.
    - :meth:`admit` enters only while :attr:`gate` is ``Serving(e)``, and
      raises :class:`NotLeader` otherwise. Admitted work is cancelled the
      moment the node can no longer prove it leads at ``e`` (leadership moved
      on, the lease proof ran out, the driver or the task failed); on
      :meth:`step_down` it is drained first.
    - :meth:`run_as_leader` runs a job once per term on the leader only.
    - :meth:`step_down`, and leaving ``async with``, hand over in this order:
      the gate closes; admitted work finishes (at most ``drain_timeout``
      seconds, then it is cancelled); leader-only jobs are stopped; only then
      does the driver resign. The node keeps observing, so it keeps
      redirecting clients to the successor until it exits.
    - If the driver or the task fails after start-up, the gate closes, all
      admitted work and jobs are cancelled at once, and ``async with`` raises
      the error (as itself when it is the only one).
    - :attr:`gate` and :meth:`decide` allocate nothing per call (they return
      objects cached per gate value); an admission allocates one small ticket.

    ``self_endpoint`` defaults to the driver's ``node_endpoint`` (when it has
    one); it must be a valid endpoint and name the same node as the driver's.
    Raises :class:`~leaderwatch.state.InvalidEndpoint`,
    :class:`InvalidNodeConfig` or ``TypeError`` for bad arguments.

    With ``exit_on_failure`` (the default), a failure under :meth:`lifespan`
    also sends ``SIGTERM`` to this process, so whichever ASGI server runs it
    shuts down instead of answering 503 forever (:mod:`leaderwatch.uvicorn`
    exits non-zero by itself and needs no signal).
    """

    def __init__(
        self,
        driver: LeadershipDriver,
        handler: LeadershipHandler | None = None,
        self_endpoint: str | None = None,
        drain_timeout: float = 5.0,
        *,
        retry_backoff: RetryBackoff | None = None,
        job_backoff: RetryBackoff | None = None,
        exit_on_failure: bool = True,
    ) -> None:
        if not isinstance(driver, LeadershipDriver):
            raise TypeError(
                f"driver must be a leadership driver (got {type(driver).__name__}); "
                "use one of leaderwatch.drivers or subclass DriverBase"
            )
        if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, int | float):
            raise InvalidNodeConfig(
                f"drain_timeout must be a number of seconds (got {type(drain_timeout).__name__})"
            )
        if not (math.isfinite(drain_timeout) and drain_timeout >= 0):
            raise InvalidNodeConfig(
                f"drain_timeout must be finite and >= 0 seconds (got {drain_timeout!r})"
            )
        if job_backoff is not None and not isinstance(job_backoff, RetryBackoff):
            raise TypeError(
                f"job_backoff must be a RetryBackoff (got {type(job_backoff).__name__})"
            )
        self._self_endpoint = _self_endpoint(driver, self_endpoint)
        self._driver = driver
        self._drain_timeout = float(drain_timeout)
        self._job_backoff = _DEFAULT_JOB_BACKOFF if job_backoff is None else job_backoff
        self._exit_on_failure = bool(exit_on_failure)
        self._leadership = driver.leadership()
        node_id = getattr(driver, "node_id", None)
        node_id = node_id if isinstance(node_id, str) else None
        self._task = LeaderWatchTask(
            self._leadership,
            BaseLeadershipHandler() if handler is None else handler,
            retry_backoff=retry_backoff,
            node_id=node_id,
        )
        self._phase: str = _IDLE
        self._admitting = False
        self._failure: BaseException | None = None
        self._lifecycle: contextlib.AbstractAsyncContextManager[None] | None = None
        self._new_scope: Callable[[], anyio.CancelScope] = anyio.CancelScope
        self._native = False
        # Channels the watcher keeps current: the request gate (node.serving), the jobs' gate.
        self._gate_out: WatchSender[Serving | NotServing] = WatchSender(_NOT_SERVING)
        self._jobs: WatchSender[Serving | NotServing] = WatchSender(_NOT_SERVING)
        self._pokes: WatchSender[None] = WatchSender(None)
        self._in_flight: set[_Ticket] = set()
        self._drained: anyio.Event | None = None
        self._terms_running = 0
        self._terms_ended: anyio.Event | None = None
        self._hand_over_done: anyio.Event | None = None
        # Values cached by the identity of what they were computed from.
        self._closed_view: tuple[object, NotServing] = (None, _NOT_SERVING)
        self._decision: tuple[object, Serve | Redirect | NoLeaderYet] = (None, NoLeaderYet())
        self._admitted: dict[int, int] = {}
        self._redirected = 0
        self._unavailable = 0
        self._lease_expired = 0
        self._cancelled = 0
        self._last_drain: float | None = None
        self._job_starts = 0
        self._job_failures = 0
        self._refused: dict[str, int] = {}
        _registry.track("node", self, "node" if node_id is None else node_id)

    # -- what the node knows ---------------------------------------------------------

    @property
    def driver(self) -> LeadershipDriver:
        """The driver this node runs."""
        return self._driver

    @property
    def task(self) -> LeaderWatchTask:
        """The leadership task (its :attr:`~LeaderWatchTask.stats` has the fence latencies)."""
        return self._task

    @property
    def self_endpoint(self) -> str | None:
        """This node's endpoint (never named in a redirect), if known."""
        return self._self_endpoint

    @property
    def drain_timeout(self) -> float:
        """Seconds a step-down waits for admitted work before cancelling it."""
        return self._drain_timeout

    @property
    def leadership(self) -> LeaderState:
        """The current leadership value, as the driver published it."""
        return self._leadership.borrow()

    @property
    def gate(self) -> Serving | NotServing:
        """Whether this node serves right now: the task's gate, lease proof and step-down applied.

        Allocation-free: equal answers are the same object while nothing changes.
        """
        gate = self._task.current_gate
        if type(gate) is Serving and not (self._admitting and self._proven()):
            return self._closed(gate)
        return gate

    def decide(self) -> Serve | Redirect | NoLeaderYet:
        """What to do with a request now (:func:`~leaderwatch.redirect.decide` on :attr:`gate`).

        Never a redirect naming this node. Allocation-free: the decision is
        cached per gate value.
        """
        gate = self.gate
        cached = self._decision
        if cached[0] is gate:
            return cached[1]
        decision = decide(gate, self_endpoint=self._self_endpoint)
        self._decision = (gate, decision)
        return decision

    @property
    def serving(self) -> WatchReceiver[Serving | NotServing]:
        """A new receiver of :attr:`gate` values as the node observes them (first value at once).

        It follows :attr:`gate` within a few scheduling steps; admission
        always reads :attr:`gate` itself.
        """
        return self._gate_out.subscribe()

    def status(self) -> NodeStatus:
        """This node's state for probes (what :func:`leaderwatch.asgi.leader_status_app` serves)."""
        gate = self.gate
        leadership = self.leadership
        state: Literal["leader", "follower", "unknown"] = "unknown"
        epoch: int | None = None
        leader: str | None = None
        if isinstance(leadership, Leader):
            state, epoch, leader = "leader", leadership.epoch, self._self_endpoint
        elif isinstance(leadership, Follower):
            state, epoch, leader = "follower", leadership.leader_epoch, leadership.leader_endpoint
        serving = isinstance(gate, Serving)
        if isinstance(gate, Serving):
            epoch = gate.epoch
        return NodeStatus(
            state=state,
            gate="serving" if serving else "not_serving",
            epoch=epoch,
            leader_endpoint=leader,
            node_endpoint=self._self_endpoint,
        )

    @property
    def stats(self) -> LeaderNodeStats:
        """Counts so far (cheap to keep; read them for metrics)."""
        return LeaderNodeStats(
            admitted=dict(self._admitted),
            in_flight=len(self._in_flight),
            redirected=self._redirected,
            unavailable=self._unavailable,
            lease_expired=self._lease_expired,
            cancelled=self._cancelled,
            last_drain_s=self._last_drain,
            job_starts=self._job_starts,
            job_failures=self._job_failures,
            refused=dict(self._refused),
        )

    def _proven(self) -> bool:
        until = self._driver.proven_until
        return until == _INF or (until > -_INF and anyio.current_time() < until)

    def _closed(self, gate: Serving) -> NotServing:
        cached = self._closed_view
        if cached[0] is not gate:
            cached = self._closed_view = (gate, NotServing(leader_epoch=gate.epoch))
        return cached[1]

    # -- admission -------------------------------------------------------------------

    def admit(self) -> contextlib.AbstractAsyncContextManager[int]:
        """Admit one unit of leader-only work: ``async with node.admit() as epoch:``.

        Enters only while :attr:`gate` is ``Serving(epoch)`` (fenced, not
        stepping down, and the driver's lease proof still valid at that
        instant) and gives ``epoch``, the fencing token to stamp on what the
        work writes. Otherwise raises :class:`NotLeader` with the decision
        (:class:`~leaderwatch.redirect.Redirect` or
        :class:`~leaderwatch.hint.NoLeaderYet`). If the node cancels the work
        (see the class guarantees), leaving the block raises
        :class:`NotLeader`; the work may have been partly done.
        """
        return _Admit(self)

    def _admission(self) -> _Ticket | None:
        """Register one unit of work if this node serves now, else ``None`` (counts nothing)."""
        gate = self._task.current_gate
        if type(gate) is not Serving or not self._admitting:
            return None
        until = self._driver.proven_until
        if until != _INF and not anyio.current_time() < until:
            self._lease_expired += 1
            return None
        epoch = gate.epoch
        if self._native:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("admit() must run inside a task of the node's event loop")
            ticket = _Ticket(epoch, task, task.cancelling(), None)
        else:
            scope = self._new_scope()
            scope.__enter__()
            ticket = _Ticket(epoch, None, 0, scope)
        self._in_flight.add(ticket)
        admitted = self._admitted
        admitted[epoch] = admitted.get(epoch, 0) + 1
        return ticket

    def _release(self, ticket: _Ticket) -> None:
        in_flight = self._in_flight
        in_flight.discard(ticket)
        if not in_flight and self._drained is not None:
            self._drained.set()

    def _refusal(self, *, count: bool = True) -> Redirect | NoLeaderYet:
        """The decision to send instead of serving (counted as a refusal unless ``count``)."""
        decision = self.decide()
        if count:
            reason = self._refusal_reason(decision)
            self._refused[reason] = self._refused.get(reason, 0) + 1
        if isinstance(decision, Redirect):
            self._redirected += count
            return decision
        self._unavailable += count
        if isinstance(decision, Serve):
            # Only reachable if the gate opened since the admission check: still refuse.
            return NoLeaderYet(leader_epoch=decision.epoch)
        return decision

    def _refusal_reason(self, decision: Serve | Redirect | NoLeaderYet) -> str:
        """Which of :data:`ADMISSION_REFUSAL_REASONS` refuses with ``decision`` now."""
        if isinstance(decision, Redirect):
            return "leader_elsewhere"
        if isinstance(decision, Serve):
            return "fencing"  # the gate opened since the admission check
        if type(self._task.current_gate) is Serving:
            return "lease_expired" if self._admitting else "stepping_down"
        if type(self._leadership.borrow()) is Leader:
            return "fencing" if self._admitting else "stepping_down"
        return "no_leader"

    def _cancel_work(self, epoch: int | None, reason: str) -> None:
        """Cancel admitted work (of ``epoch``, or all of it)."""
        count = 0
        for ticket in self._in_flight:
            if (epoch is None or ticket.epoch == epoch) and ticket.cancel():
                count += 1
        if count:
            self._cancelled += count
            _log.warning("leader_node_work_cancelled", epoch=epoch, count=count, reason=reason)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._phase != _IDLE or self._lifecycle is not None:
            raise RuntimeError("a LeaderNode can be entered only once; build a new one")
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

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        self._phase = _RUNNING
        body_error: BaseException | None = None
        try:
            async with self._driver:
                self._native = _on_asyncio()
                # The backend's own cancel-scope class: built directly, one per admitted
                # request, it skips anyio's backend lookup (about a third of its cost).
                self._new_scope = type(anyio.CancelScope())
                try:
                    async with anyio.create_task_group() as task_group:
                        await task_group.start(self._watch)
                        task_group.start_soon(self._run_task)
                        self._admitting = self._failure is None
                        _log.info(
                            "leader_node_started",
                            node_endpoint=self._self_endpoint,
                            drain_timeout_s=self._drain_timeout,
                        )
                        try:
                            yield
                        except BaseException as error:
                            # Only a cancellation belongs to the task group; anything else
                            # the body raised propagates as itself, after the hand-over.
                            if isinstance(error, anyio.get_cancelled_exc_class()):
                                raise
                            body_error = error
                        finally:
                            with anyio.CancelScope(shield=True):
                                await self._hand_over_once()
                            task_group.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    if body_error is not None:
                        raise BaseExceptionGroup(
                            "LeaderNode: the body and the node failed",
                            [body_error, *group.exceptions],
                        ) from None
                    if len(group.exceptions) == 1 and not isinstance(
                        group.exceptions[0], BaseExceptionGroup
                    ):
                        raise group.exceptions[0] from None
                    raise
                if body_error is not None:
                    raise body_error
        except Exception as error:
            if error is not body_error and self._failure is None:
                self._failure = error
                _log.error("leader_node_failed", error=repr(error), source="driver")
            raise
        finally:
            self._phase = _STOPPED
            self._admitting = False
            for channel in (self._jobs, self._gate_out, self._pokes):
                channel.close()
            _log.info("leader_node_stopped", failed=self._failure is not None)

    async def _run_task(self) -> None:
        try:
            await self._task.run()
        except Exception as error:
            self._fail(error)
            raise

    def _fail(self, error: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = error
        self._admitting = False
        _log.error("leader_node_failed", error=repr(error), source="task")
        self._cancel_work(None, "node_failed")
        self._jobs.close()
        self._poke()

    def _poke(self) -> None:
        if not self._pokes.is_closed:
            self._pokes.send(None)

    async def _watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the published gates current and cancel work whose term ended."""
        pokes = self._pokes.subscribe()
        async with anyio.create_task_group() as forwarders:
            forwarders.start_soon(self._forward, self._task.serving)
            forwarders.start_soon(self._forward, self._leadership.clone())
            task_status.started()
            term: Serving | NotServing = _NOT_SERVING
            try:
                while True:
                    term = self._refresh(term)
                    with anyio.CancelScope(deadline=self._next_check(term)):
                        try:
                            await pokes.changed()
                        except ChannelClosed:
                            await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                if self._hand_over_done is None:
                    # Cancelled from outside before any hand-over: the driver failed (it
                    # cancels the node's body) or the node is being shut down. Either way,
                    # admit nothing more from now on, not only once the body has unwound.
                    self._admitting = False
                    self._gate_out.send_if_changed(self.gate)
                raise
            finally:
                pokes.close()

    async def _forward(self, receiver: WatchReceiver[Any]) -> None:
        try:
            while True:
                await receiver.changed()
                self._poke()
        except ChannelClosed:
            self._poke()
        finally:
            receiver.close()

    def _refresh(self, previous: Serving | NotServing) -> Serving | NotServing:
        gate = self._task.current_gate
        term = gate if type(gate) is Serving and self._proven() else _NOT_SERVING
        same_term = type(term) is Serving and term.epoch == _epoch_of(previous)
        if type(previous) is Serving and not same_term:
            self._cancel_work(previous.epoch, "leadership_lost")
        if not self._jobs.is_closed:
            self._jobs.send_if_changed(term)
        if not self._gate_out.is_closed:
            self._gate_out.send_if_changed(self.gate)
        return term

    def _next_check(self, term: Serving | NotServing) -> float:
        if type(term) is Serving:
            return self._driver.proven_until
        if type(self._task.current_gate) is Serving:
            # Serving but unproven: look again soon, in case the lease is renewed silently.
            return anyio.current_time() + _LEASE_RECHECK
        return _INF

    # -- hand-over -------------------------------------------------------------------

    async def step_down(self) -> None:
        """Hand leadership over gracefully, then keep observing; idempotent.

        In this order: the gate closes (requests now get a redirect or 503);
        admitted work finishes, for at most ``drain_timeout`` seconds, then
        it is cancelled; leader-only jobs are stopped; the driver resigns
        (gives up leadership and stops campaigning). Until the node exits it
        keeps following the leadership, so requests are redirected to the
        successor. Runs shielded from cancellation (it is bounded by the
        drain timeout, except for work or jobs that ignore cancellation,
        which it waits for and warns about). Returns at once on a node that
        is not running; a second call waits for the first.
        """
        if self._phase != _RUNNING and self._hand_over_done is None:
            return
        with anyio.CancelScope(shield=True):
            await self._hand_over_once()

    async def _hand_over_once(self) -> None:
        done = self._hand_over_done
        if done is not None:
            await done.wait()
            return
        done = self._hand_over_done = anyio.Event()
        try:
            await self._hand_over()
        finally:
            done.set()

    async def _hand_over(self) -> None:
        graceful = self._failure is None
        started = anyio.current_time()
        gate = self._task.current_gate
        epoch = gate.epoch if type(gate) is Serving else None
        self._admitting = False
        self._poke()
        _log.info(
            "leader_node_step_down_started",
            epoch=epoch,
            in_flight=len(self._in_flight),
            graceful=graceful,
        )
        if not graceful:
            self._cancel_work(None, "node_failed")
        elif epoch is None or not self._proven():
            self._cancel_work(None, "leadership_lost")
        else:
            # Work of an older term (still unwinding) has nothing to finish for.
            for older in {ticket.epoch for ticket in self._in_flight} - {epoch}:
                self._cancel_work(older, "leadership_lost")
        if self._in_flight:
            with anyio.move_on_after(self._drain_timeout):
                await self._wait_drained()
            if self._in_flight:
                _log.warning(
                    "leader_node_drain_timeout",
                    in_flight=len(self._in_flight),
                    drain_timeout_s=self._drain_timeout,
                )
                self._cancel_work(None, "drain_timeout")
                await self._until(self._wait_drained, "admitted_work")
        self._last_drain = anyio.current_time() - started
        self._jobs.close()
        await self._until(self._wait_terms_ended, "leader_jobs")
        if graceful:
            await self._driver.resign()
        _log.info(
            "leader_node_stepped_down",
            epoch=epoch,
            drain_s=self._last_drain,
            total_s=anyio.current_time() - started,
            resigned=graceful,
        )

    async def _until(self, wait: Callable[[], Awaitable[None]], what: str) -> None:
        """Await ``wait()``, warning every drain timeout while it takes longer."""
        interval = max(self._drain_timeout, 1.0)
        waited = 0.0
        while True:
            with anyio.move_on_after(interval):
                await wait()
                return
            waited += interval
            _log.warning("leader_node_still_waiting", waiting_for=what, waited_s=waited)

    async def _wait_drained(self) -> None:
        while self._in_flight:
            event = self._drained = anyio.Event()
            await event.wait()

    async def _wait_terms_ended(self) -> None:
        while self._terms_running:
            event = self._terms_ended = anyio.Event()
            await event.wait()

    # -- leader-only jobs ------------------------------------------------------------

    async def run_as_leader(self, job: Job, *, backoff: RetryBackoff | None = None) -> None:
        """Run ``await job(epoch)`` in each term this node serves at; return once it never will.

        The job starts when the node serves at a new epoch (fenced, lease
        proven) and is cancelled the moment it no longer does; the next term
        starts it again. A job that returns is done for its term. A job that
        raises an ``Exception`` is logged (``leader_job_failed``) and
        restarted after a capped exponential delay (``backoff``, default 0.1
        s doubling up to 5 s) while the term lasts; a ``BaseException`` other
        than cancellation propagates. Returns after :meth:`step_down` or the
        node's exit stopped the jobs (it may be awaited before the node is
        entered: it waits).
        """
        retry = self._job_backoff if backoff is None else backoff
        delays = Backoff(retry.initial, retry.maximum, retry.multiplier)
        name = getattr(job, "__qualname__", None) or repr(job)
        jobs = self._jobs
        if jobs.is_closed:
            return
        receiver = jobs.subscribe()
        try:
            while True:
                try:
                    term = await receiver.wait_for(_is_serving)
                except ChannelClosed:
                    return
                if jobs.is_closed or not isinstance(term, Serving):
                    return
                delays.reset()
                await self._run_term(job, name, term, receiver, delays)
        finally:
            receiver.close()

    async def _run_term(
        self,
        job: Job,
        name: str,
        term: Serving,
        receiver: WatchReceiver[Serving | NotServing],
        delays: Backoff,
    ) -> None:
        self._terms_running += 1
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._run_job, job, name, term.epoch, delays)
                with contextlib.suppress(ChannelClosed):
                    await receiver.wait_for(lambda value: value != term)
                task_group.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._terms_running -= 1
            if self._terms_running == 0 and self._terms_ended is not None:
                self._terms_ended.set()

    async def _run_job(self, job: Job, name: str, epoch: int, delays: Backoff) -> None:
        while True:
            self._job_starts += 1
            _log.info("leader_job_started", job=name, epoch=epoch)
            try:
                await job(epoch)
            except anyio.get_cancelled_exc_class():
                _log.info("leader_job_cancelled", job=name, epoch=epoch)
                raise
            except Exception as error:
                self._job_failures += 1
                delay = delays.next_delay()
                _log.error(
                    "leader_job_failed", job=name, epoch=epoch, error=repr(error), retry_in_s=delay
                )
                await anyio.sleep(delay)
                continue
            _log.info("leader_job_finished", job=name, epoch=epoch)
            return

    # -- ASGI lifespan ---------------------------------------------------------------

    def lifespan(self, app: object) -> contextlib.AbstractAsyncContextManager[None]:
        """An ASGI lifespan running this node: ``Starlette(lifespan=node.lifespan)``.

        Enters the node for the application's lifetime, unless it is already
        running (under :func:`leaderwatch.uvicorn.serve`, which enters it
        itself); leaving hands over as :meth:`step_down` does. A failure
        after start-up is logged and, with ``exit_on_failure``, ``SIGTERM``
        is sent to this process so the server stops.
        """
        return self._lifespan()

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        if self._phase == _RUNNING:
            yield
            return
        try:
            async with self:
                yield
        except Exception:
            if self._failure is not None and self._exit_on_failure:
                _log.error("leader_node_terminating_process", pid=os.getpid(), signal="SIGTERM")
                os.kill(os.getpid(), signal.SIGTERM)
            raise


def _epoch_of(gate: Serving | NotServing) -> int | None:
    return gate.epoch if type(gate) is Serving else None


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _is_serving(value: Serving | NotServing) -> bool:
    return isinstance(value, Serving)


def _self_endpoint(driver: LeadershipDriver, given: str | None) -> str | None:
    advertised = getattr(driver, "node_endpoint", None)
    if advertised is not None and not isinstance(advertised, str):
        advertised = None
    if given is None:
        return None if advertised is None else parse_endpoint(advertised)
    parse_endpoint(given)
    if advertised is not None and not same_endpoint(given, parse_endpoint(advertised)):
        raise InvalidNodeConfig(
            f"self_endpoint {given!r} must name this node as its driver advertises it "
            f"({advertised!r}); otherwise the node could redirect clients to itself"
        )
    return given
