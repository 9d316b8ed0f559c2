"""The driver conformance kit: what every :class:`LeadershipDriver` must do, checked."""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from leaderwatch._value import FrozenValue
from leaderwatch.channel import WatchReceiver
from leaderwatch.drivers._base import LeadershipDriver
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import (
    Follower,
    InvalidEndpoint,
    Leader,
    LeaderState,
    Unknown,
    leader_state_from_json,
    parse_endpoint,
    same_endpoint,
)
from leaderwatch.testing._history import HistoryReport, LeadershipHistory

__all__ = [
    "CONTRACT_CHECKS",
    "ContractReport",
    "ContractViolated",
    "ContractViolation",
    "assert_driver_contract",
    "check_driver_contract",
]

D = TypeVar("D", bound=LeadershipDriver)

CONTRACT_CHECKS: Final = (
    "driver_runs",
    "first_value_immediate",
    "valid_values",
    "no_repeated_values",
    "epochs_never_decrease",
    "one_leader_per_epoch",
    "no_overlapping_leaders",
    "hints_name_leaders",
    "proven_until",
    "lone_instance_leads",
    "subscribers_come_and_go",
    "resign_gives_up_leadership",
    "successor_takes_over",
    "exit_publishes_unknown_then_closes",
)
"""Every check :func:`check_driver_contract` can report, by name:

- ``driver_runs``: entering, ``resign()`` and leaving never raise and finish in time.
- ``first_value_immediate``: a new receiver yields its first value without
  waiting for a transition (before enter it is ``Unknown()``).
- ``valid_values``: every value is a ``LeaderState`` that survives a JSON
  round trip, every endpoint is a valid ``host:port``; for electing drivers
  a hint names a candidate's endpoint, never the node's own.
- ``no_repeated_values``: no subscriber sees two equal values in a row.
- ``epochs_never_decrease``, ``one_leader_per_epoch``,
  ``no_overlapping_leaders``, ``hints_name_leaders``: the recorded
  :class:`LeadershipHistory` of every instance passes its checks (overlap
  margin ``overlap_margin``; for electing drivers every hint must name an
  epoch some instance led at).
- ``proven_until``: while a node shows ``Leader`` its ``proven_until`` lies
  ahead of ``anyio.current_time()``; otherwise it is ``-math.inf``.
- ``lone_instance_leads``: one instance alone becomes ``Leader``.
- ``subscribers_come_and_go``: while receivers are opened, read, closed and
  dropped, every transition still reaches a long-lived receiver and new
  receivers start from the newest value.
- ``resign_gives_up_leadership``: when ``resign()`` returns the node shows no
  ``Leader``, ``proven_until`` is ``-math.inf``, ``campaigning`` (if the
  driver has it) is false, and the node never leads again; it keeps
  observing (follows the next leader).
- ``successor_takes_over``: after the leader resigns or exits, another
  instance leads at a higher epoch and every other instance follows it,
  within ``takeover_within`` seconds.
- ``exit_publishes_unknown_then_closes``: leaving ``async with`` ends every
  receiver's iteration with ``Unknown()``; a receiver made after exit yields
  ``Unknown()`` and ends.
"""

_IMMEDIATE_ROUNDS: Final = 25

_HISTORY_CHECKS: Final = {
    "epoch_decreased": "epochs_never_decrease",
    "epoch_led_twice": "one_leader_per_epoch",
    "epoch_names_two_leaders": "one_leader_per_epoch",
    "leaders_overlap": "no_overlapping_leaders",
    "hint_unled_epoch": "hints_name_leaders",
    "hint_wrong_endpoint": "hints_name_leaders",
    "not_converged": "successor_takes_over",
}


class ContractViolation(FrozenValue):
    """One broken rule: the check's name (see :data:`CONTRACT_CHECKS`) and what happened."""

    check: str
    message: str


class ContractViolated(LeaderwatchError, AssertionError):
    """A driver broke the contract; the message lists every violation."""


class ContractReport(FrozenValue):
    """The outcome of :func:`check_driver_contract`."""

    violations: tuple[ContractViolation, ...]
    checks: tuple[str, ...]
    """The checks that ran (a check that does not apply to the driver is left out)."""
    history: HistoryReport
    """The leadership history of every instance the kit ran."""

    @property
    def ok(self) -> bool:
        """Whether no check failed."""
        return not self.violations

    def describe(self) -> str:
        """One line per violation, or a summary of what passed."""
        if not self.violations:
            return f"driver contract ok: {len(self.checks)} checks ({', '.join(self.checks)})"
        return f"{len(self.violations)} driver contract violation(s):\n" + "\n".join(
            f"- {violation.check}: {violation.message}" for violation in self.violations
        )

    def raise_for_violations(self) -> None:
        """Raise :class:`ContractViolated` listing every violation, if there is any."""
        if self.violations:
            raise ContractViolated(self.describe())


class _Abort(Exception):
    """A step could not complete; its violation is recorded and the scenario stops."""


class _Node(Generic[D]):
    """One driver instance run by the kit, with every value one subscriber saw."""

    def __init__(self, kit: _Kit[D], name: str, endpoint: str) -> None:
        self.kit = kit
        self.name = name
        self.endpoint = endpoint
        self.driver = kit.make_driver(endpoint)
        self.seen: list[LeaderState] = []
        self.entered = False
        self.stop = anyio.Event()
        self.exited = anyio.Event()
        self.ended = anyio.Event()
        self.probe: WatchReceiver[LeaderState] | None = None

    @property
    def current(self) -> LeaderState:
        return self.seen[-1] if self.seen else Unknown()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        kit = self.kit
        started = False
        try:
            receiver = self.driver.leadership()
            first = await kit.first_value(receiver, f"{self.name} before enter")
            if first is not None and first != Unknown():
                kit.fail(
                    "first_value_immediate",
                    f"{self.name}: before enter the first value is {first!r}, not Unknown()",
                )
            async with anyio.create_task_group() as watchers:
                kit.history.declare(self.name, endpoint=self.endpoint)
                await watchers.start(kit.history.watch, self.name, self.driver.leadership())
                watchers.start_soon(self._collect, receiver)
                try:
                    async with self.driver:
                        self.probe = self.driver.leadership()
                        self.entered = True
                        await kit.first_value(self.driver.leadership(), f"{self.name} after enter")
                        started = True
                        task_status.started()
                        await self.stop.wait()
                except Exception as error:
                    kit.fail("driver_runs", f"{self.name}: the driver raised {error!r}")
                finally:
                    self.exited.set()
                with anyio.move_on_after(kit.takeover_within) as waited:
                    await self.ended.wait()
                if waited.cancelled_caught:
                    kit.fail(
                        "exit_publishes_unknown_then_closes",
                        f"{self.name}: a receiver's iteration did not end within "
                        f"{kit.takeover_within:g}s after exit",
                    )
                    watchers.cancel_scope.cancel()
        finally:
            if not started:
                task_status.started()
        await self._after_exit()

    async def _collect(self, receiver: WatchReceiver[LeaderState]) -> None:
        try:
            async for state in receiver:
                self.seen.append(state)
                self.kit.pulse()
        finally:
            self.ended.set()
            self.kit.pulse()

    async def _after_exit(self) -> None:
        kit = self.kit
        if not self.entered:
            return
        if self.current != Unknown():
            kit.fail(
                "exit_publishes_unknown_then_closes",
                f"{self.name}: the last value before the end is {self.current!r}, not Unknown()",
            )
        receiver = self.driver.leadership()
        first = await kit.first_value(receiver, f"{self.name} after exit")
        if first is not None and first != Unknown():
            kit.fail(
                "exit_publishes_unknown_then_closes",
                f"{self.name}: a receiver made after exit yields {first!r}, not Unknown()",
            )
        rest: list[LeaderState] = []
        with anyio.move_on_after(kit.takeover_within) as waited:
            async for state in receiver:
                rest.append(state)
                if len(rest) > 1:
                    break
        if waited.cancelled_caught or len(rest) > 1:
            kit.fail(
                "exit_publishes_unknown_then_closes",
                f"{self.name}: iterating a receiver made after exit does not end after its "
                f"first value (got {rest!r})",
            )


class _Kit(Generic[D]):
    def __init__(
        self,
        make_driver: Callable[[str], D],
        *,
        elects: bool,
        leads_alone: bool,
        drive: Callable[[D, int], object] | None,
        settle_within: float,
        takeover_within: float,
        overlap_margin: float,
        transitions: int,
        host: str,
        first_port: int,
    ) -> None:
        self.make_driver = make_driver
        self.elects = elects
        self.leads_alone = leads_alone
        self.drive = drive
        self.settle_within = settle_within
        self.takeover_within = takeover_within
        self.overlap_margin = overlap_margin
        self.transitions = transitions
        self.host = host
        self.history = LeadershipHistory()
        self.violations: list[ContractViolation] = []
        self.checks: dict[str, None] = {}
        self.nodes: list[_Node[D]] = []
        self.resigned_at: dict[str, float] = {}
        self._ports = itertools.count(first_port)
        self._changed = anyio.Event()

    # -- bookkeeping ----------------------------------------------------------------

    def ran(self, *checks: str) -> None:
        for check in checks:
            self.checks[check] = None

    def fail(self, check: str, message: str) -> None:
        self.ran(check)
        self.violations.append(ContractViolation(check=check, message=message))

    def pulse(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def abort(self, check: str, message: str) -> _Abort:
        self.fail(check, message)
        return _Abort(message)

    def describe(self, nodes: list[_Node[D]]) -> str:
        return "; ".join(f"{node.name}={node.current!r}" for node in nodes)

    async def until(
        self, condition: Callable[[], bool], within: float, check: str, what: str
    ) -> None:
        """Return once ``condition()`` holds; otherwise record ``check`` failed and abort."""
        deadline = anyio.current_time() + within
        while not condition():
            changed = self._changed
            with anyio.move_on_after(deadline - anyio.current_time()):
                await changed.wait()
            if anyio.current_time() >= deadline and not condition():
                raise self.abort(check, f"{what} within {within:g}s")

    async def first_value(
        self, receiver: WatchReceiver[LeaderState], where: str
    ) -> LeaderState | None:
        """The first value ``receiver`` yields, if it comes without waiting for a transition."""
        self.ran("first_value_immediate")
        got: list[LeaderState] = []

        async def take() -> None:
            async for state in receiver:
                got.append(state)
                return

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(take)
            for _ in range(_IMMEDIATE_ROUNDS):
                if got:
                    break
                await anyio.lowlevel.checkpoint()
            if not got:
                task_group.cancel_scope.cancel()
        if not got:
            self.fail(
                "first_value_immediate",
                f"{where}: a new receiver's first value needs more than {_IMMEDIATE_ROUNDS} "
                "scheduling steps (it must be available at once)",
            )
            return None
        return got[0]

    # -- nodes ----------------------------------------------------------------------

    async def start(self, task_group: TaskGroup) -> _Node[D]:
        index = len(self.nodes) + 1
        endpoint = f"{self.host}:{next(self._ports)}"
        node = _Node(self, f"node{index}", endpoint)
        self.nodes.append(node)
        self.ran("driver_runs", "exit_publishes_unknown_then_closes")
        with anyio.move_on_after(self.settle_within) as waited:
            await task_group.start(node.run)
        if waited.cancelled_caught:
            raise self.abort(
                "driver_runs", f"{node.name}: entering took over {self.settle_within:g}s"
            )
        if not node.entered:
            raise _Abort(f"{node.name} did not start")
        return node

    async def stop(self, node: _Node[D]) -> None:
        node.stop.set()
        with anyio.move_on_after(self.settle_within) as waited:
            await node.exited.wait()
        if waited.cancelled_caught:
            raise self.abort(
                "driver_runs", f"{node.name}: leaving took over {self.settle_within:g}s"
            )

    def check_proven(self, nodes: list[_Node[D]]) -> None:
        self.ran("proven_until")
        now = anyio.current_time()
        for node in nodes:
            probe = node.probe
            if probe is None or node.exited.is_set() or probe.borrow() != node.current:
                continue
            proven = node.driver.proven_until
            if isinstance(node.current, Leader):
                if not proven > now:
                    self.fail(
                        "proven_until",
                        f"{node.name} shows {node.current!r} but proven_until={proven} is not "
                        f"after now ({now})",
                    )
            elif proven != -math.inf:
                self.fail(
                    "proven_until",
                    f"{node.name} shows {node.current!r} but proven_until={proven}, not -math.inf",
                )

    async def resign(self, node: _Node[D]) -> None:
        self.ran("resign_gives_up_leadership")
        self.resigned_at[node.name] = time.monotonic()
        with anyio.move_on_after(self.settle_within) as waited:
            await node.driver.resign()
        if waited.cancelled_caught:
            raise self.abort(
                "resign_gives_up_leadership",
                f"{node.name}: resign() did not return within {self.settle_within:g}s",
            )
        assert node.probe is not None
        now_state = node.probe.borrow()
        if isinstance(now_state, Leader):
            self.fail(
                "resign_gives_up_leadership",
                f"{node.name} still shows {now_state!r} when resign() returned",
            )
        if node.driver.proven_until != -math.inf:
            self.fail(
                "resign_gives_up_leadership",
                f"{node.name}: proven_until={node.driver.proven_until} after resign(), "
                "not -math.inf",
            )
        if getattr(node.driver, "campaigning", False) is not False:
            self.fail(
                "resign_gives_up_leadership",
                f"{node.name}: campaigning is still true after resign()",
            )

    def stable(self, nodes: list[_Node[D]]) -> _Node[D] | None:
        """The one leader every other node of ``nodes`` follows, if the group is stable."""
        leaders = [node for node in nodes if isinstance(node.current, Leader)]
        if len(leaders) != 1:
            return None
        leader = leaders[0]
        state = leader.current
        assert isinstance(state, Leader)
        wanted = Follower(leader_endpoint=leader.endpoint, leader_epoch=state.epoch)
        if all(node is leader or node.current == wanted for node in nodes):
            return leader
        return None

    async def settle(
        self, nodes: list[_Node[D]], within: float, check: str, *, above: int | None = None
    ) -> tuple[_Node[D], int]:
        """Wait until one node of ``nodes`` leads (above epoch ``above``) and the others follow."""

        def settled() -> bool:
            leader = self.stable(nodes)
            if leader is None:
                return False
            state = leader.current
            return isinstance(state, Leader) and (above is None or state.epoch > above)

        await self.until(
            settled,
            within,
            check,
            "one instance leading"
            + (f" above epoch {above}" if above is not None else "")
            + f" and every other following it ({self.describe(nodes)})",
        )
        leader = self.stable(nodes)
        assert leader is not None
        assert isinstance(leader.current, Leader)
        return leader, leader.current.epoch

    # -- the subscriber churn -------------------------------------------------------

    async def churn(
        self, node: _Node[D], transition: Callable[[], Awaitable[Callable[[LeaderState], bool]]]
    ) -> None:
        """Open, read, close and drop receivers of ``node`` around one ``transition``."""
        self.ran("subscribers_come_and_go", "no_repeated_values")
        driver = node.driver
        live: list[LeaderState] = []
        ended = anyio.Event()

        async def follow(receiver: WatchReceiver[LeaderState]) -> None:
            try:
                async for state in receiver:
                    live.append(state)
                    self.pulse()
            finally:
                ended.set()

        async with anyio.create_task_group() as task_group:
            long_lived = driver.leadership()
            task_group.start_soon(follow, long_lived)
            read_once = driver.leadership()
            await self.first_value(read_once, f"{node.name} churn")
            read_once.close()
            dropped = driver.leadership()
            del dropped
            expected = await transition()
            await self.until(
                lambda: expected(node.current),
                self.takeover_within,
                "subscribers_come_and_go",
                f"{node.name}: the expected transition reached a subscriber (now {node.current!r})",
            )
            fresh = await self.first_value(driver.leadership(), f"{node.name} after a transition")
            newest = node.probe.borrow() if node.probe is not None else node.current
            if fresh is not None and fresh != newest:
                self.fail(
                    "subscribers_come_and_go",
                    f"{node.name}: a new receiver starts from {fresh!r}, not the newest {newest!r}",
                )
            await self.until(
                lambda: bool(live) and expected(live[-1]),
                self.takeover_within,
                "subscribers_come_and_go",
                f"{node.name}: a long-lived receiver saw the transition while others came "
                f"and went (it saw {live!r})",
            )
            long_lived.close()
            with anyio.move_on_after(self.takeover_within):
                await ended.wait()
            if not ended.is_set():
                self.fail(
                    "subscribers_come_and_go",
                    f"{node.name}: iterating a receiver did not end after it was closed",
                )
                task_group.cancel_scope.cancel()
        self.check_repeats(f"{node.name} churn receiver", live)

    def check_repeats(self, where: str, values: list[LeaderState]) -> None:
        for before, after in itertools.pairwise(values):
            if before == after:
                self.fail("no_repeated_values", f"{where} saw {after!r} twice in a row")
                return

    # -- scenarios ------------------------------------------------------------------

    async def scenario(self, body: Callable[[TaskGroup], Awaitable[None]]) -> None:
        async with anyio.create_task_group() as task_group:
            aborted = False
            try:
                await body(task_group)
            except* _Abort:
                # Its violation is on record; the scenario's remaining steps depend on it.
                aborted = True
            if aborted:
                task_group.cancel_scope.cancel()
            for node in self.nodes:
                node.stop.set()

    async def lone(self, task_group: TaskGroup) -> None:
        # The first instance leaves while it leads, the second resigns first.
        first = await self.start(task_group)
        await self.lead_alone(first)
        for step in range(1, self.transitions + 1 if self.drive is not None else 1):
            await self.churn(first, self.driven(first, step))
            self.check_proven([first])
        await self.stop(first)

        second = await self.start(task_group)
        await self.lead_alone(second)
        if self.drive is not None:
            await self.churn(second, self.driven(second, 1))

        async def resigned() -> Callable[[LeaderState], bool]:
            await self.resign(second)
            return lambda state: not isinstance(state, Leader)

        await self.churn(second, resigned)
        self.check_proven([second])
        await self.stop(second)

    async def lead_alone(self, node: _Node[D]) -> None:
        if self.leads_alone:
            self.ran("lone_instance_leads")
            await self.until(
                lambda: isinstance(node.current, Leader),
                self.settle_within,
                "lone_instance_leads",
                f"{node.name} alone becoming Leader (it shows {node.current!r})",
            )
        self.check_proven([node])

    def driven(
        self, node: _Node[D], step: int
    ) -> Callable[[], Awaitable[Callable[[LeaderState], bool]]]:
        drive = self.drive
        assert drive is not None

        async def transition() -> Callable[[LeaderState], bool]:
            before = node.current
            done = drive(node.driver, step)
            if inspect.isawaitable(done):
                await done
            return lambda state: state != before

        return transition

    async def handover(self, task_group: TaskGroup) -> None:
        self.ran("successor_takes_over")
        nodes = [await self.start(task_group) for _ in range(3)]
        first, epoch = await self.settle(nodes, self.settle_within, "successor_takes_over")
        self.check_proven(nodes)
        await self.resign(first)
        second, epoch = await self.settle(
            nodes, self.takeover_within, "successor_takes_over", above=epoch
        )
        if second is first:
            raise self.abort("resign_gives_up_leadership", f"{first.name} led again after resign()")
        self.check_proven(nodes)
        await self.stop(second)
        rest = [node for node in nodes if node is not second]
        third, epoch = await self.settle(
            rest, self.takeover_within, "successor_takes_over", above=epoch
        )
        self.check_proven(rest)
        await self.resign(third)
        await self.until(
            lambda: all(
                isinstance(node.current, Unknown)
                or (isinstance(node.current, Follower) and node.current.leader_endpoint is None)
                for node in rest
            ),
            self.takeover_within,
            "resign_gives_up_leadership",
            f"every instance showing no leader once all had resigned ({self.describe(rest)})",
        )
        self.check_proven(rest)
        for node in rest:
            await self.stop(node)

    async def observed_churn(self, task_group: TaskGroup) -> None:
        observer = await self.start(task_group)
        await self.until(
            lambda: isinstance(observer.current, Leader),
            self.settle_within,
            "lone_instance_leads",
            f"{observer.name} alone becoming Leader (it shows {observer.current!r})",
        )

        async def resigned() -> Callable[[LeaderState], bool]:
            await self.resign(observer)
            return lambda state: not isinstance(state, Leader)

        await self.churn(observer, resigned)
        joined: list[_Node[D]] = []
        for _ in range(self.transitions):

            async def join() -> Callable[[LeaderState], bool]:
                node = await self.start(task_group)
                joined.append(node)
                # Its own Leader must be on record before it leaves, or the
                # observer's hint would name an epoch nobody was seen to lead at.
                await self.until(
                    lambda: isinstance(node.current, Leader),
                    self.settle_within,
                    "lone_instance_leads",
                    f"{node.name} alone among candidates becoming Leader "
                    f"(it shows {node.current!r})",
                )
                return lambda state: (
                    isinstance(state, Follower)
                    and state.leader_endpoint is not None
                    and same_endpoint(state.leader_endpoint, node.endpoint)
                )

            async def leave() -> Callable[[LeaderState], bool]:
                await self.stop(joined[-1])
                return lambda state: (
                    isinstance(state, Unknown)
                    or (isinstance(state, Follower) and state.leader_endpoint is None)
                )

            await self.churn(observer, join)
            self.check_proven([observer, *joined])
            await self.churn(observer, leave)
        await self.stop(observer)

    # -- final checks ---------------------------------------------------------------

    def judge(self) -> HistoryReport:
        self.ran("valid_values", "no_repeated_values")
        endpoints = {node.endpoint for node in self.nodes}
        for node in self.nodes:
            self.check_repeats(f"{node.name}'s subscriber", node.seen)
            for state in node.seen:
                self.check_value(node, state, endpoints)
            resigned = self.resigned_at.get(node.name)
            if resigned is None:
                continue
            for event in self.history.events:
                if (
                    event.node == node.name
                    and event.t > resigned
                    and isinstance(event.state, Leader)
                ):
                    self.fail(
                        "resign_gives_up_leadership",
                        f"{node.name} showed {event.state!r} after it resigned",
                    )
                    break
        self.ran("epochs_never_decrease", "one_leader_per_epoch", "no_overlapping_leaders")
        self.ran("hints_name_leaders")
        if self.elects:
            report = self.history.check(overlap_margin=self.overlap_margin, complete=True)
        else:
            # Instances that do not elect are each a group of their own.
            parts = [
                self.history.select([node.name]).check(overlap_margin=self.overlap_margin)
                for node in self.nodes
            ]
            report = HistoryReport(
                violations=tuple(v for part in parts for v in part.violations),
                nodes=sum(part.nodes for part in parts),
                events=sum(part.events for part in parts),
                terms=sum(part.terms for part in parts),
            )
        for violation in report.violations:
            self.fail(_HISTORY_CHECKS[violation.kind], violation.describe())
        return report

    def check_value(self, node: _Node[D], state: object, endpoints: set[str]) -> None:
        if not isinstance(state, Leader | Follower | Unknown):
            self.fail("valid_values", f"{node.name} published {state!r}, not a LeaderState")
            return
        try:
            again = leader_state_from_json(state.model_dump_json())
        except ValueError as error:
            self.fail("valid_values", f"{node.name}: {state!r} does not survive JSON: {error}")
            return
        if again != state:
            self.fail("valid_values", f"{node.name}: {state!r} comes back from JSON as {again!r}")
        if not isinstance(state, Follower) or state.leader_endpoint is None:
            return
        hinted = state.leader_endpoint
        try:
            parse_endpoint(hinted)
        except InvalidEndpoint as error:
            self.fail("valid_values", f"{node.name} hints an invalid endpoint: {error}")
            return
        if not self.elects:
            return
        if same_endpoint(hinted, node.endpoint):
            self.fail("valid_values", f"{node.name} hints its own endpoint: {state!r}")
        elif not any(same_endpoint(hinted, endpoint) for endpoint in endpoints):
            self.fail("valid_values", f"{node.name} hints {hinted}, which no instance advertises")


async def check_driver_contract(
    make_driver: Callable[[str], D],
    *,
    elects: bool = True,
    leads_alone: bool = True,
    drive: Callable[[D, int], object] | None = None,
    settle_within: float = 20.0,
    takeover_within: float = 5.0,
    overlap_margin: float = 0.0,
    transitions: int = 3,
    host: str = "127.0.0.1",
    first_port: int = 27001,
) -> ContractReport:
    """Run a driver through the contract every driver must keep; return what broke.

    ``make_driver(endpoint)`` builds a new, not yet entered driver that
    advertises ``endpoint`` (a distinct ``host:port`` per call, never bound).
    It is called once per instance (nine times for an electing driver,
    twice otherwise), so electing instances must share one election (a directory,
    an election name) that nothing else uses.

    Describe the driver with flags:

    - ``elects`` (default true): instances compete, exactly one leads and
      the others follow it (local file, etcd, PostgreSQL). Runs the
      multi-instance checks: hand-over on ``resign()`` and on exit, and
      receivers that come and go on an observer while instances join and
      leave. Static and manual drivers pass ``elects=False``.
    - ``leads_alone`` (default true): an instance left alone becomes
      ``Leader`` by itself. A manual driver passes ``False``.
    - ``drive(driver, step)``: for scripted drivers, make ``driver``
      publish a new value (it may return an awaitable); called for steps
      ``1..transitions`` while receivers come and go.

    Bounds: the first election and every start or exit must finish within
    ``settle_within`` seconds; a successor must lead, and every value be
    delivered, within ``takeover_within`` seconds; two instances may show
    ``Leader`` at once for at most ``overlap_margin`` seconds (in one
    process none should). Every wait is bounded by one of these. The
    checks are listed in :data:`CONTRACT_CHECKS`. Never raises for a broken
    contract (see :func:`assert_driver_contract`); a cancellation from
    outside propagates.
    """
    for name, value in (
        ("settle_within", settle_within),
        ("takeover_within", takeover_within),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number of seconds > 0 (got {value!r})")
    if not 1 <= transitions <= 100:
        raise ValueError(f"transitions must be in 1..100 (got {transitions!r})")
    kit = _Kit(
        make_driver,
        elects=elects,
        leads_alone=leads_alone,
        drive=drive,
        settle_within=settle_within,
        takeover_within=takeover_within,
        overlap_margin=overlap_margin,
        transitions=transitions,
        host=host,
        first_port=first_port,
    )
    await kit.scenario(kit.lone)
    if elects:
        await kit.scenario(kit.handover)
        await kit.scenario(kit.observed_churn)
    history = kit.judge()
    ran = tuple(check for check in CONTRACT_CHECKS if check in kit.checks)
    return ContractReport(violations=tuple(kit.violations), checks=ran, history=history)


async def assert_driver_contract(
    make_driver: Callable[[str], D],
    *,
    elects: bool = True,
    leads_alone: bool = True,
    drive: Callable[[D, int], object] | None = None,
    settle_within: float = 20.0,
    takeover_within: float = 5.0,
    overlap_margin: float = 0.0,
    transitions: int = 3,
    host: str = "127.0.0.1",
    first_port: int = 27001,
) -> ContractReport:
    """:func:`check_driver_contract`, raising :class:`ContractViolated` (an ``AssertionError``).

    The error lists every violation, so a pytest test is one line::

        @pytest.mark.anyio
        async def test_my_driver_keeps_the_contract(tmp_path):
            await assert_driver_contract(lambda endpoint: MyDriver(tmp_path, endpoint))
    """
    report = await check_driver_contract(
        make_driver,
        elects=elects,
        leads_alone=leads_alone,
        drive=drive,
        settle_within=settle_within,
        takeover_within=takeover_within,
        overlap_margin=overlap_margin,
        transitions=transitions,
        host=host,
        first_port=first_port,
    )
    report.raise_for_violations()
    return report
